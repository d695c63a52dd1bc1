"""NNCF 3.x quantization of a diffusers UNet for quantization-aware training.

`quantize_unet` inserts NNCF quantizers into a deep copy of the FP32 UNet (the original stays the teacher) with
ranges from real UNet inputs; an ordinary training loop then trains the student's weights and/or quantizer ranges
(`quantizer_parameters` / `weight_parameters`); `save_quantized` / `load_quantized` checkpoint it exactly
(`nncf.torch.get_config` + the state dict, since NNCF 3 has no compressed-model object to pickle).
Gradient checkpointing through NNCF's hooks lives in `checkpointing`, the OpenVINO conversion in `convert`.
"""

from __future__ import annotations

import copy
import enum
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import families
from ..errors import UserError

PRESETS = ("mixed", "performance")
DEFAULT_PRESET = "mixed"  # symmetric weights, asymmetric activations (NNCF's and optimum-intel's default)
OVERFLOW_FIX = ("disable", "enable", "first_layer_only")
# "enable" stores 7-bit weights. Measured on an AMD Zen 4 host: with "disable" the exported int8 UNet drifted
# 31-37 % (relative L2) from the PyTorch student, with "enable" 3.6 %, so 7-bit weights are what keep the export exact.
DEFAULT_OVERFLOW_FIX = "enable"
# What is quantized (int8 in the OpenVINO export):
#   full:   weights and activations of every op NNCF quantizes (convolutions, linear layers, attention inputs);
#   hybrid: optimum-intel's hybrid scheme: linear layers get int8 weights only (their inputs stay float), everything
#           else as in full. Measured with optimum's PTQ, the linear layers' int8 activations cost the most fidelity.
SCHEMES = ("full", "hybrid")
DEFAULT_SCHEME = "full"
LINEAR_TYPES = ("linear",)  # NNCF torch graph node types of the layers `hybrid` keeps float at the input
CONV_TYPES = ("conv2d",)
UNET_INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states")

# The first NNCF call compiles a CPU extension (~30-40 s on an idle 2-core machine); NNCF's 60 s load timeout is
# too short when other work shares the cores. A user's own setting wins.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")

HOOK_STORAGE_ATTR = "__nncf_hooks"  # nncf.torch.function_hook.wrapper.ATR_HOOK_STORAGE

CHECKPOINT_FORMAT = "ov-sd-trainer/nncf-quantized-unet"
CHECKPOINT_VERSION = 1
META_FILE = "quantization.json"
CONFIG_JSON = "nncf_config.json"
STATE_SAFETENSORS = "quantized_state.safetensors"


# --------------------------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------------------------


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying module of DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        else:
            return model


def _check_calibration_inputs(calibration_inputs: Any) -> list[dict[str, torch.Tensor]]:
    if isinstance(calibration_inputs, dict) or not isinstance(calibration_inputs, Iterable):
        raise UserError(
            "calibration_inputs must be a list of dicts with keys "
            f"{', '.join(UNET_INPUT_NAMES)} (the UNet inputs collected from the training data)"
        )
    items = list(calibration_inputs)
    if not items:
        raise UserError("calibration_inputs is empty; collect at least one batch of UNet inputs for calibration")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UserError(f"calibration_inputs[{i}] is a {type(item).__name__}, expected a dict of UNet inputs")
        missing = [k for k in UNET_INPUT_NAMES if k not in item]
        if missing:
            raise UserError(f"calibration_inputs[{i}] lacks {missing}; each item needs {list(UNET_INPUT_NAMES)}")
        for key in UNET_INPUT_NAMES:
            if not isinstance(item[key], torch.Tensor):
                raise UserError(f"calibration_inputs[{i}][{key!r}] must be a torch.Tensor")
        if item["sample"].dim() != 4:
            raise UserError(
                f"calibration_inputs[{i}]['sample'] has shape {tuple(item['sample'].shape)}, expected [B, C, h, w]"
            )
    return items


def _calibration_transform(item: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                           extra_names: tuple[str, ...] = ()) -> dict:  # fmt: skip
    sample = item["sample"].to(device=device, dtype=dtype)
    timestep = item["timestep"].to(device=device)
    if timestep.dim() == 0:
        timestep = timestep.expand(sample.shape[0])
    extra = {k: item[k].to(device=device, dtype=dtype) for k in extra_names}
    return {
        "sample": sample,
        "timestep": timestep,
        "encoder_hidden_states": item["encoder_hidden_states"].to(device=device, dtype=dtype),
        **families.unet_kwargs(extra),  # a family's extra inputs (LCM: timestep_cond)
        # a plain tuple output traces more simply than diffusers' UNet2DConditionOutput
        "return_dict": False,
    }


def _ignored_scope(ignored_scope: Any):
    import nncf

    if ignored_scope is None or isinstance(ignored_scope, nncf.IgnoredScope):
        return ignored_scope
    if isinstance(ignored_scope, str):
        ignored_scope = [ignored_scope]
    if isinstance(ignored_scope, Sequence) and all(isinstance(p, str) for p in ignored_scope):
        # regular expressions over NNCF node names, e.g. ".*conv_in.*"; strict=False: a pattern may match nothing
        return nncf.IgnoredScope(patterns=list(ignored_scope), validate=False)
    raise UserError(
        f"ignored_scope must be None, an nncf.IgnoredScope or a list of regex patterns over NNCF node names, "
        f"got {type(ignored_scope).__name__}"
    )


def _merge_scopes(a, b):
    """The union of two `nncf.IgnoredScope`s (either may be None)."""
    import nncf

    if a is None:
        return b
    if b is None:
        return a
    return nncf.IgnoredScope(
        names=[*a.names, *b.names], patterns=[*a.patterns, *b.patterns], types=[*a.types, *b.types],
        subgraphs=[*a.subgraphs, *b.subgraphs], validate=False,
    )  # fmt: skip


def quantize_unet(
    unet: torch.nn.Module,
    calibration_inputs: Sequence[dict[str, torch.Tensor]],
    preset: str = DEFAULT_PRESET,
    overflow_fix: str = DEFAULT_OVERFLOW_FIX,
    ignored_scope: Any = None,
    subset_size: int | None = None,
    smooth_quant: bool = False,
    bias_correction: bool = True,
    scheme: str = DEFAULT_SCHEME,
) -> torch.nn.Module:
    """Return an NNCF-quantized deep copy of `unet` (8-bit weights and activations, ranges from the calibration data).

    `calibration_inputs`: list of dicts with `sample` [B,4,h,w], `timestep` [B] and `encoder_hidden_states`
    [B,77,D] (real UNet inputs). `preset`: "mixed" (symmetric weights, asymmetric activations) or
    "performance" (all symmetric). `overflow_fix`: "enable" (the default: 7-bit weights, so the OpenVINO int8
    export matches the PyTorch student on any CPU), "first_layer_only" or "disable" (8-bit weights).
    `ignored_scope`: an `nncf.IgnoredScope` or a list of regex patterns over NNCF node names.
    `subset_size`: how many calibration items to use (default: all). `smooth_quant`: NNCF's SmoothQuant for
    matmuls (NNCF's default for transformers; off here: measured on the tiny UNet, the OpenVINO IR of a
    SmoothQuant-ed student drifted 7% from its PyTorch fake-quant outputs, 0.2% without it, and QAT tunes the
    ranges anyway). `bias_correction`: NNCF's fast bias correction. `scheme`: "full" or "hybrid" (`SCHEMES`); hybrid
    quantizes everything but the linear layers with `nncf.quantize`, then gives the linear layers trainable int8
    weight fake-quantizers (`nncf.compress_weights`, INT8_SYM, per output channel, `CompressionFormat.FQ`), so they
    export as int8 weights with float activations.
    The input model is left unchanged (it stays the FP32 teacher).
    """
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )

    if preset not in PRESETS:
        raise UserError(f"unknown quantization preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if overflow_fix not in OVERFLOW_FIX:
        raise UserError(f"unknown overflow_fix {overflow_fix!r}; choose one of {', '.join(OVERFLOW_FIX)}")
    if scheme not in SCHEMES:
        raise UserError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if not isinstance(unet, torch.nn.Module):
        raise UserError(f"quantize_unet needs a torch UNet module, got {type(unet).__name__}")
    unet = unwrap_model(unet)
    if is_quantized(unet):
        raise UserError("the UNet is already quantized; pass the FP32 UNet to quantize_unet")
    items = _check_calibration_inputs(calibration_inputs)
    extra_names = families.extra_input_names(getattr(unet, "config", None))
    lacking = [k for k in extra_names if k not in items[0]]
    if lacking:
        raise UserError(f"calibration_inputs[0] lacks {lacking}, which this UNet takes; collect them with the inputs")
    if subset_size is None:
        subset_size = len(items)
    if not isinstance(subset_size, int) or subset_size < 1:
        raise UserError(f"subset_size must be a positive integer, got {subset_size!r}")
    subset_size = min(subset_size, len(items))

    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    advanced = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix(overflow_fix),
        disable_bias_correction=not bias_correction,
    )
    if not smooth_quant:
        advanced.smooth_quant_alphas = AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)

    ignored = _ignored_scope(ignored_scope)
    if scheme == "hybrid":
        ignored = _merge_scopes(ignored, nncf.IgnoredScope(types=list(LINEAR_TYPES), validate=False))
    dataset = nncf.Dataset(items, lambda item: _calibration_transform(item, device, dtype, extra_names))
    was_training = unet.training
    unet.eval()
    try:
        with torch.no_grad():
            quantized = nncf.quantize(
                unet,
                dataset,
                preset=nncf.QuantizationPreset(preset),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=subset_size,
                ignored_scope=ignored,
                advanced_parameters=advanced,
            )
            if scheme == "hybrid":
                weights_scope = _merge_scopes(
                    _ignored_scope(ignored_scope), nncf.IgnoredScope(types=list(CONV_TYPES), validate=False)
                )
                quantized = nncf.compress_weights(
                    quantized,
                    mode=nncf.CompressWeightsMode.INT8_SYM,
                    group_size=-1,  # per output channel, as optimum's 8-bit weight compression
                    compression_format=nncf.CompressionFormat.FQ,  # trainable fake quantizers, exported as int8
                    ignored_scope=weights_scope,
                    dataset=dataset,
                )
    finally:
        unet.train(was_training)
    quantized.train(was_training)
    return quantized


# --------------------------------------------------------------------------------------------------------------------
# Inspection helpers
# --------------------------------------------------------------------------------------------------------------------


def hook_storage(model: torch.nn.Module):
    """NNCF's hook storage of `model` (where its quantizers live), or None if NNCF has not wrapped it."""
    from nncf.torch.function_hook.wrapper import is_wrapped

    model = unwrap_model(model)
    if not is_wrapped(model):
        return None
    return getattr(model, HOOK_STORAGE_ATTR, None)


def _quantizer_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from nncf.torch.quantization.layers import BaseQuantizer

    storage = hook_storage(model)
    if storage is None:
        return []
    seen: dict[int, torch.nn.Module] = {}
    for module in storage.modules():
        if isinstance(module, BaseQuantizer):
            seen.setdefault(id(module), module)
    return list(seen.values())


def count_quantizers(model: torch.nn.Module) -> int:
    """Number of NNCF quantizer modules (weight and activation FakeQuantizers) attached to `model`."""
    return len(_quantizer_modules(model))


def is_quantized(model: torch.nn.Module) -> bool:
    """True when `model` carries NNCF quantizers (made by `quantize_unet` or `load_quantized`)."""
    return count_quantizers(model) > 0


def _is_hook_parameter(name: str) -> bool:
    return HOOK_STORAGE_ATTR in name.split(".")


def quantizer_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Learnable parameters of NNCF's hook modules: quantizer ranges (`_scale_value`, `input_low`,
    `_input_range_value`, ...) and SmoothQuant scales. Train these alone for `tune_quantizers_only`;
    keep them out of weight decay. (NNCF's integer state such as `_num_bits` and `signed_tensor` is also held
    in Parameters; it is in neither list and must not be given to an optimizer.)"""
    return [
        (n, p) for n, p in unwrap_model(model).named_parameters() if _is_hook_parameter(n) and p.is_floating_point()
    ]


def weight_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """All parameters that are not NNCF hook parameters (the UNet's own weights and biases)."""
    return [(n, p) for n, p in unwrap_model(model).named_parameters() if not _is_hook_parameter(n)]


# --------------------------------------------------------------------------------------------------------------------
# Exact checkpoints of the quantized student
# --------------------------------------------------------------------------------------------------------------------


def _encode_config(value: Any) -> Any:
    """NNCF config -> JSON-safe data; tuples and enums are tagged so that decoding restores them exactly."""
    if isinstance(value, enum.Enum):
        cls = type(value)
        return {"__enum__": f"{cls.__module__}:{cls.__qualname__}", "value": _encode_config(value.value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode_config(v) for v in value]}
    if isinstance(value, list):
        return [_encode_config(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value) or "__enum__" in value or "__tuple__" in value:
            raise TypeError("unsupported dict keys in the NNCF config")
        return {k: _encode_config(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot encode {type(value).__name__} in the NNCF config")


def _decode_config(value: Any) -> Any:
    """Inverse of `_encode_config`; enums are only imported from NNCF's own modules."""
    if isinstance(value, list):
        return [_decode_config(v) for v in value]
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(_decode_config(v) for v in value["__tuple__"])
        if "__enum__" in value:
            import importlib

            module_name, _, qualname = value["__enum__"].partition(":")
            if module_name.split(".")[0] != "nncf":
                raise UserError(f"the quantized checkpoint names an enum outside NNCF ({value['__enum__']!r})")
            obj: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            if not (isinstance(obj, type) and issubclass(obj, enum.Enum)):
                raise UserError(f"the quantized checkpoint names {value['__enum__']!r}, which is not an enum")
            return obj(_decode_config(value["value"]))
        return {k: _decode_config(v) for k, v in value.items()}
    return value


def _dedup_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state_dict into unique tensors and aliases (NNCF shares one hook module, e.g. a SmoothQuant scale,
    between q/k/v, so its tensors appear under several names; safetensors refuses shared storage)."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        view = (ptr, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and view in by_view:
            aliases[name] = by_view[view]
            continue
        if tensor.numel() and ptr in storages:  # another view of a shared storage: store its own copy
            tensor = tensor.clone()
        elif tensor.numel():
            storages.add(ptr)
            by_view[view] = name
        unique[name] = tensor
    return unique, aliases


def save_quantized(model: torch.nn.Module, directory: str | Path) -> Path:
    """Write a quantized UNet exactly: NNCF config (`nncf.torch.get_config`, tagged JSON) and the full state_dict
    (safetensors; tensors shared between hook names stored once) plus `quantization.json` to `directory`."""
    import nncf.torch
    from safetensors.torch import save_file

    model = unwrap_model(model)
    if not is_quantized(model):
        raise UserError("save_quantized needs a quantized UNet (from quantize_unet or load_quantized)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = nncf.torch.get_config(model)
    encoded = _encode_config(config)
    if _decode_config(json.loads(json.dumps(encoded))) != config:  # guard against a lossy encoding
        raise RuntimeError("the NNCF config does not round-trip through JSON")
    (directory / CONFIG_JSON).write_text(json.dumps(encoded, indent=1))

    unique, aliases = _dedup_state(model.state_dict())
    save_file(unique, str(directory / STATE_SAFETENSORS), metadata={"format": CHECKPOINT_FORMAT})
    meta: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": CONFIG_JSON,
        "state_dict": STATE_SAFETENSORS,
        "aliases": aliases,
        "num_quantizers": count_quantizers(model),
        "model_class": type(model).__name__,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))
    return directory


def _read_meta(directory: Path) -> dict[str, Any]:
    hint = "pass a folder written by save_quantized (it holds quantization.json, the NNCF config and the weights)"
    if not directory.is_dir():
        raise UserError(f"quantized checkpoint folder {str(directory)!r} does not exist; {hint}")
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{str(directory)!r} is not a quantized checkpoint; it has no {META_FILE}; {hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{str(meta_path)!r} is not valid JSON ({e}); {hint}") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{str(directory)!r} is not a quantized checkpoint (unknown format in {META_FILE}); {hint}")
    if meta.get("version", 0) > CHECKPOINT_VERSION:
        raise UserError(
            f"{str(directory)!r} was written by a newer ov-sd-trainer (format version {meta['version']}); upgrade"
        )
    for key in ("config", "state_dict"):
        if not (directory / str(meta.get(key))).is_file():
            raise UserError(f"{str(directory)!r} is not a complete quantized checkpoint: {meta.get(key)} is missing")
    return meta


def load_quantized(fp32_unet: torch.nn.Module, directory: str | Path, inplace: bool = False) -> torch.nn.Module:
    """Rebuild the quantized UNet saved by `save_quantized` on top of an FP32 UNet of the same architecture.

    The result equals the saved model exactly (weights, quantizer ranges, outputs). `fp32_unet` is deep-copied
    first unless `inplace=True` (then it is turned into the quantized model)."""
    import nncf.torch

    directory = Path(directory)
    meta = _read_meta(directory)
    fp32_unet = unwrap_model(fp32_unet)
    if is_quantized(fp32_unet):
        raise UserError("load_quantized needs the FP32 UNet; the given one is already quantized")
    from safetensors.torch import load_file

    config = _decode_config(json.loads((directory / meta["config"]).read_text()))
    state = load_file(str(directory / meta["state_dict"]))
    for alias, name in meta.get("aliases", {}).items():
        if name not in state:
            raise UserError(f"{str(directory)!r} is a damaged quantized checkpoint: {name} is missing")
        state[alias] = state[name]

    model = fp32_unet if inplace else copy.deepcopy(fp32_unet)
    saved = next((v.dtype for v in state.values() if v.is_floating_point()), None)
    if saved is not None and next(model.parameters()).dtype != saved:
        model.to(saved)  # e.g. rebuilt on a bfloat16 teacher (teacher_dtype): the saved float32 state, not rounded
    model = nncf.torch.load_from_config(model, config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(
            f"the quantized checkpoint {str(directory)!r} does not fit this UNet ({str(e).splitlines()[0]}); "
            "load it on the FP32 UNet of the same architecture it was trained from"
        ) from e
    return model
