"""NNCF 3.x quantization-aware training helpers for diffusers UNets (see shared/FINDINGS.md section 2).

The flow: `quantize_unet` inserts NNCF quantizers into a deep copy of the FP32 UNet (the original stays the
teacher); an ordinary training loop then trains the student's weights and/or quantizer ranges
(`quantizer_parameters` / `weight_parameters`); `save_quantized` / `load_quantized` checkpoint it exactly;
`enable_gradient_checkpointing` makes activation checkpointing work through NNCF's hooks; and
`convert_unet_to_openvino` exports an IR with optimum-intel's SD UNet interface whose FakeQuantize ops
OpenVINO runs (and stores) as int8.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

PRESETS = ("mixed", "performance")
OVERFLOW_FIX = ("disable", "enable", "first_layer_only")
UNET_INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states")
UNET_OUTPUT_NAME = "out_sample"

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


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
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


def _calibration_transform(item: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict:
    sample = item["sample"].to(device=device, dtype=dtype)
    timestep = item["timestep"].to(device=device)
    if timestep.dim() == 0:
        timestep = timestep.expand(sample.shape[0])
    return {
        "sample": sample,
        "timestep": timestep,
        "encoder_hidden_states": item["encoder_hidden_states"].to(device=device, dtype=dtype),
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


def quantize_unet(
    unet: torch.nn.Module,
    calibration_inputs: Sequence[dict[str, torch.Tensor]],
    preset: str = "mixed",
    overflow_fix: str = "disable",
    ignored_scope: Any = None,
    subset_size: int | None = None,
    smooth_quant: bool = False,
    bias_correction: bool = True,
) -> torch.nn.Module:
    """Return an NNCF-quantized deep copy of `unet` (8-bit weights and activations, ranges from the calibration data).

    `calibration_inputs`: list of dicts with `sample` [B,4,h,w], `timestep` [B] and `encoder_hidden_states`
    [B,77,D] (real UNet inputs). `preset`: "mixed" (symmetric weights, asymmetric activations) or
    "performance" (all symmetric). `overflow_fix`: "disable" (the default: right for VNNI/AMX CPUs),
    "enable" or "first_layer_only" (7-bit weights against int8 overflow on pre-VNNI CPUs).
    `ignored_scope`: an `nncf.IgnoredScope` or a list of regex patterns over NNCF node names.
    `subset_size`: how many calibration items to use (default: all). `smooth_quant`: NNCF's SmoothQuant for
    matmuls (NNCF's default for transformers; off here: measured on the tiny UNet, the OpenVINO IR of a
    SmoothQuant-ed student drifted 7% from its PyTorch fake-quant outputs, 0.2% without it, and QAT tunes the
    ranges anyway). `bias_correction`: NNCF's fast bias correction.
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
    if not isinstance(unet, torch.nn.Module):
        raise UserError(f"quantize_unet needs a torch UNet module, got {type(unet).__name__}")
    unet = _unwrap(unet)
    if is_quantized(unet):
        raise UserError("the UNet is already quantized; pass the FP32 UNet to quantize_unet")
    items = _check_calibration_inputs(calibration_inputs)
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

    was_training = unet.training
    unet.eval()
    try:
        with torch.no_grad():
            quantized = nncf.quantize(
                unet,
                nncf.Dataset(items, lambda item: _calibration_transform(item, device, dtype)),
                preset=nncf.QuantizationPreset(preset),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=subset_size,
                ignored_scope=_ignored_scope(ignored_scope),
                advanced_parameters=advanced,
            )
    finally:
        unet.train(was_training)
    quantized.train(was_training)
    return quantized


# --------------------------------------------------------------------------------------------------------------------
# Inspection helpers
# --------------------------------------------------------------------------------------------------------------------


def _hook_storage(model: torch.nn.Module):
    from nncf.torch.function_hook.wrapper import is_wrapped

    model = _unwrap(model)
    if not is_wrapped(model):
        return None
    return getattr(model, HOOK_STORAGE_ATTR, None)


def _quantizer_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from nncf.torch.quantization.layers import BaseQuantizer

    storage = _hook_storage(model)
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
    return [(n, p) for n, p in _unwrap(model).named_parameters() if _is_hook_parameter(n) and p.is_floating_point()]


def weight_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """All parameters that are not NNCF hook parameters (the UNet's own weights and biases)."""
    return [(n, p) for n, p in _unwrap(model).named_parameters() if not _is_hook_parameter(n)]


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

    model = _unwrap(model)
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
    fp32_unet = _unwrap(fp32_unet)
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
    model = nncf.torch.load_from_config(model, config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(
            f"the quantized checkpoint {str(directory)!r} does not fit this UNet ({str(e).splitlines()[0]}); "
            "load it on the FP32 UNet of the same architecture it was trained from"
        ) from e
    return model


# --------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing through NNCF's hooks
# --------------------------------------------------------------------------------------------------------------------


def _active_hook_mode():
    """The innermost NNCF FunctionHookMode on torch's function-mode stack, or None."""
    from nncf.torch.function_hook.hook_executor_mode import FunctionHookMode

    for mode in reversed(torch.overrides._get_current_function_mode_stack()):
        if isinstance(mode, FunctionHookMode):
            return mode
    return None


class _RecomputeInHookMode:
    """Recompute context: re-enters NNCF's FunctionHookMode for the same model and hook storage, positioned
    where the original forward was when the checkpoint was taken (module call stack and op-call counters;
    NNCF names each hooked op by module path + call counter, so both decide which hooks fire)."""

    def __init__(self, mode) -> None:
        self.model = mode.model
        self.hook_storage = mode.hook_storage
        self.module_call_stack = list(mode.module_call_stack)
        self.op_calls = dict(mode.op_calls)
        self.enabled = mode.enabled
        self._mode = None

    def __enter__(self):
        from nncf.torch.function_hook.hook_executor_mode import FunctionHookMode

        mode = FunctionHookMode(model=self.model, hook_storage=self.hook_storage)
        mode.__enter__()
        mode.module_call_stack = list(self.module_call_stack)
        mode.op_calls = defaultdict(int, self.op_calls)
        mode.enabled = self.enabled
        self._mode = mode
        return mode

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(exc_type, exc_val, exc_tb)


def nncf_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`torch.utils.checkpoint.checkpoint` (non-reentrant) whose recomputation runs NNCF's hooks as the original
    forward did. Without an active NNCF hook mode (an FP32 UNet) it is the ordinary non-reentrant checkpoint.
    Module-level (not a closure) so that deep copies of a model (EMA, teacher) stay correct."""
    from torch.utils.checkpoint import checkpoint, noop_context_fn

    mode = _active_hook_mode()
    if mode is None:
        context_fn = noop_context_fn
    else:
        recompute = _RecomputeInHookMode(mode)

        def context_fn():
            return contextlib.nullcontext(), recompute

    return checkpoint(function, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def enable_gradient_checkpointing(unet: torch.nn.Module) -> torch.nn.Module:
    """Turn on diffusers' gradient checkpointing with `nncf_checkpoint`; works for quantized and FP32 UNets."""
    model = _unwrap(unet)
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise UserError(f"{type(model).__name__} does not support gradient checkpointing")
    model.enable_gradient_checkpointing(gradient_checkpointing_func=nncf_checkpoint)
    return unet


def disable_gradient_checkpointing(unet: torch.nn.Module) -> torch.nn.Module:
    """Turn diffusers' gradient checkpointing off again."""
    model = _unwrap(unet)
    if getattr(model, "_supports_gradient_checkpointing", False):
        model.disable_gradient_checkpointing()
    return unet


# --------------------------------------------------------------------------------------------------------------------
# OpenVINO export
# --------------------------------------------------------------------------------------------------------------------


class _UNetForExport(torch.nn.Module):
    """Positional (sample, timestep, encoder_hidden_states) -> noise prediction tensor."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def unet_example_inputs(
    unet: torch.nn.Module, batch: int = 2, height: int = 16, width: int = 16, text_len: int = 77
) -> dict[str, torch.Tensor]:
    """Random UNet inputs of the right shapes and dtypes (for tracing and parity checks)."""
    config = _unwrap(unet).config
    generator = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(batch, config.in_channels, height, width, generator=generator),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator, dtype=torch.long),
        "encoder_hidden_states": torch.randn(batch, text_len, config.cross_attention_dim, generator=generator),
    }


def convert_unet_to_openvino(
    unet: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor] | None = None,
    batch: int = 2,
    height: int = 16,
    width: int = 16,
    text_len: int = 77,
):
    """Convert an FP32 or NNCF-quantized UNet to an `openvino.Model` with optimum-intel's SD UNet interface:
    inputs `sample` (f32 [-1,C,-1,-1]), `timestep` (i64 [-1]), `encoder_hidden_states` (f32 [-1,-1,D]); output
    `out_sample`. A quantized UNet keeps its FakeQuantize ops (`openvino.save_model` stores their weights as int8)."""
    import openvino as ov

    model = _unwrap(unet)
    config = model.config
    if example_inputs is None:
        example_inputs = unet_example_inputs(model, batch, height, width, text_len)
    missing = [k for k in UNET_INPUT_NAMES if k not in example_inputs]
    if missing:
        raise UserError(f"example_inputs lacks {missing}; it needs {list(UNET_INPUT_NAMES)}")
    param = next(model.parameters())
    example = (
        example_inputs["sample"].to(param.device, torch.float32),
        example_inputs["timestep"].to(param.device, torch.long).reshape(-1),
        example_inputs["encoder_hidden_states"].to(param.device, torch.float32),
    )
    inputs = [
        (ov.PartialShape([-1, config.in_channels, -1, -1]), ov.Type.f32),
        (ov.PartialShape([-1]), ov.Type.i64),
        (ov.PartialShape([-1, -1, config.cross_attention_dim]), ov.Type.f32),
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            wrapper = _UNetForExport(model)
            decoder = _torchscript_decoder(wrapper, example)
            if decoder is wrapper:
                ov_model = ov.convert_model(wrapper, example_input=example, input=inputs)
            else:
                ov_model = ov.convert_model(decoder, input=inputs)
    finally:
        model.train(was_training)
    for port, name in zip(ov_model.inputs, UNET_INPUT_NAMES, strict=True):
        port.get_tensor().set_names({name})
    ov_model.outputs[0].get_tensor().set_names({UNET_OUTPUT_NAME})
    return ov_model


def _torchscript_decoder(module: torch.nn.Module, example: tuple):
    """OpenVINO's TorchScript decoder with torch.jit.trace's check_trace off: the check re-runs the model twice
    (slow through NNCF's hooks) and, for a quantized UNet, only reports that NNCF's export-time FakeQuantize
    rounds a few ties differently from its training-time quantizer."""
    try:
        from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

        return TorchScriptPythonDecoder(module, example_input=example, trace_kwargs={"check_trace": False})
    except (ImportError, TypeError):  # older/newer OpenVINO without trace_kwargs: let convert_model trace
        return module


def count_fake_quantize(ov_model) -> int:
    """Number of FakeQuantize ops in an `openvino.Model`."""
    return sum(op.get_type_name() == "FakeQuantize" for op in ov_model.get_ops())


def int8_constant_stats(ov_model) -> tuple[int, int]:
    """(count, total bytes) of 8-bit integer Constants in an `openvino.Model`. Meaningful on an IR read back
    after `openvino.save_model`, which is where FakeQuantize-fed weights are compressed to int8."""
    import openvino as ov

    count = nbytes = 0
    for op in ov_model.get_ops():
        if op.get_type_name() == "Constant" and op.get_output_element_type(0) in (ov.Type.i8, ov.Type.u8):
            count += 1
            nbytes += op.get_byte_size()
    return count, nbytes


def count_int8_constants(ov_model) -> int:
    """Number of 8-bit integer Constants in an `openvino.Model` (see `int8_constant_stats`)."""
    return int8_constant_stats(ov_model)[0]
