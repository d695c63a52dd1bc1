"""`ov-sd deepcache`: add step-caching (DeepCache) UNet IRs to an OpenVINO pipeline folder.

Two extra IRs go next to the plain UNet (which stays untouched, so optimum-intel loads the folder as before):

    unet_deepcache/full.xml|.bin     (sample, timestep, encoder_hidden_states) -> out_sample, deep_feature
    unet_deepcache/shallow.xml|.bin  (sample, timestep, encoder_hidden_states, deep_feature) -> out_sample
    unet_deepcache/config.json       the UNet's config (as unet/config.json)
    unet_deepcache/deepcache.json    what they were built from, FakeQuantize / int8 counts, the parity check

From a QAT run both are converted from the same NNCF student (`run_dir/final`, loaded with
`export.openvino.load_student_from_checkpoint`), so they keep its trained quantizers (int8 weights) exactly as the
folder's plain UNet does; from a diffusers folder (`--fp32`) they are the FP32 UNet. The full IR is checked against
the folder's plain UNet IR on random inputs before anything is written (a folder exported from another run fails).
The folder `unet_deepcache/` is written to a temporary sibling and renamed (`outputs.atomic_output_dir`).
`eval.deepcache_pipeline.OVDeepCacheStableDiffusionPipeline` runs them.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..compress import quantize
from ..compress.convert import (
    UNET_OUTPUT_NAME,
    count_fake_quantize,
    int8_constant_stats,
    torchscript_decoder,
    unet_example_inputs,
    unet_trace_inputs,
)
from ..compress.deepcache import DEEP_FEATURE_NAME, DeepCacheUNet, FullUNet, ShallowUNet, deep_feature_channels
from ..errors import UserError
from ..outputs import atomic_output_dir
from ..pipeline_folder import UNET_XML, check_openvino_folder, is_diffusers_folder, written_by

logger = logging.getLogger(__name__)

DEEPCACHE_DIR = "unet_deepcache"
FULL_XML = Path(DEEPCACHE_DIR) / "full.xml"
SHALLOW_XML = Path(DEEPCACHE_DIR) / "shallow.xml"
INFO_FILE = Path(DEEPCACHE_DIR) / "deepcache.json"
FORMAT = "ov-sd-trainer/deepcache"
# Relative L2 distance allowed between the full IR's out_sample and the folder's plain UNet IR on the same inputs.
# Both are converted from the same module with the same ops, so they agree to float rounding (measured ~1e-7 on the
# tiny test model; int8 IRs can round a tie differently in one FakeQuantize, still far below this); a UNet from
# another run or another checkpoint differs by percents.
PARITY_TOLERANCE = 1e-3


def has_deepcache(folder: str | Path) -> bool:
    folder = Path(folder)
    return all((folder / x).is_file() and (folder / x).with_suffix(".bin").is_file() for x in (FULL_XML, SHALLOW_XML))


def read_info(folder: str | Path) -> dict:
    try:
        return json.loads((Path(folder) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------------


def _convert(module: torch.nn.Module, example: tuple, inputs: list, input_names, output_names):
    """`openvino.convert_model` through the project's TorchScript decoder (convert.py), with named ports."""
    import openvino as ov

    decoder = torchscript_decoder(module, example)
    if decoder is module:
        ov_model = ov.convert_model(module, example_input=example, input=inputs)
    else:
        ov_model = ov.convert_model(decoder, input=inputs)
    for port, name in zip(ov_model.inputs, input_names, strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, output_names, strict=True):
        port.get_tensor().set_names({name})
    return ov_model


def convert_deepcache_unet(unet: torch.nn.Module, batch: int = 2, height: int = 16, width: int = 16):
    """(full, shallow) `openvino.Model`s of an FP32 or NNCF-quantized UNet, with optimum-intel's UNet input names
    and dynamic shapes (a quantized UNet keeps its FakeQuantize ops in both)."""
    import openvino as ov

    cache = DeepCacheUNet(unet)
    model = cache.unet
    x = unet_example_inputs(model, batch, height, width)
    example, base_inputs = unet_trace_inputs(model, x)
    feature_input = (ov.PartialShape([-1, deep_feature_channels(model), -1, -1]), ov.Type.f32)
    names = list(quantize.UNET_INPUT_NAMES)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, feature = cache.full(*example)  # also records NNCF's op counters for the shallow path
            full = _convert(FullUNet(cache), example, base_inputs, names, [UNET_OUTPUT_NAME, DEEP_FEATURE_NAME])
            shallow = _convert(ShallowUNet(cache), (*example, feature), [*base_inputs, feature_input],
                               [*names, DEEP_FEATURE_NAME], [UNET_OUTPUT_NAME])  # fmt: skip
    finally:
        model.train(was_training)
    return full, shallow


def _random_inputs(config: dict, batch: int = 2, side: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((batch, int(config.get("in_channels", 4)), side, side), dtype=np.float32),
        "timestep": np.array([rng.integers(0, 1000)], dtype=np.int64),  # [1]: what optimum's own UNet IRs take
        "encoder_hidden_states": rng.standard_normal((batch, 77, int(config["cross_attention_dim"])), dtype=np.float32),
    }


def full_ir_parity(folder: Path, full_model) -> float:
    """Relative L2 distance between the full IR's out_sample and the folder's plain UNet IR on random inputs."""
    import openvino as ov

    core = ov.Core()
    config = json.loads((folder / "unet" / "config.json").read_text())
    side = 2 ** (len(config["block_out_channels"]) - 1) * 4
    inputs = _random_inputs(config, side=side)
    plain = core.compile_model(core.read_model(folder / UNET_XML), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    full = core.compile_model(full_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ref = plain(inputs)[plain.output(0)]
    got = full(inputs)[full.output(UNET_OUTPUT_NAME)]
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))


# --------------------------------------------------------------------------------------------------------------------
# Writing into a folder
# --------------------------------------------------------------------------------------------------------------------


def check_target(folder: str | Path, overwrite: bool, flag: str = "--model") -> Path:
    """An OpenVINO pipeline folder that may receive unet_deepcache/ (one-line errors)."""
    folder = check_openvino_folder(str(folder), flag)
    target = folder / DEEPCACHE_DIR
    if target.exists() and not overwrite:
        raise UserError(f"{flag} {str(folder)!r} already holds {DEEPCACHE_DIR}/; pass --overwrite to replace it")
    return folder


def write_deepcache_irs(folder: str | Path, unet: torch.nn.Module, *, source: dict, overwrite: bool = False,
                        check_parity: bool = True) -> Path:  # fmt: skip
    """Convert `unet` (the student the folder's UNet was exported from, or its FP32 UNet) to the full and shallow
    IRs and write them to `folder/unet_deepcache/` atomically. Returns that folder."""
    import openvino as ov
    from tqdm.auto import tqdm

    folder = check_target(folder, overwrite)
    t0 = time.perf_counter()
    with tqdm(total=3, desc="deepcache IRs", unit="step", leave=False) as bar:
        bar.set_postfix_str("converting full + shallow")
        full, shallow = convert_deepcache_unet(unet)
        bar.update()
        bar.set_postfix_str("checking full vs unet/")
        parity = full_ir_parity(folder, full) if check_parity else None
        if parity is not None and parity > PARITY_TOLERANCE:
            raise UserError(
                f"the UNet given differs from {str(folder / UNET_XML)!r} (relative L2 {parity:.3g} on random inputs, "
                f"limit {PARITY_TOLERANCE}); pass the run (or diffusers folder) this OpenVINO folder was exported from"
            )
        bar.update()
        bar.set_postfix_str("saving")
        with atomic_output_dir(folder / DEEPCACHE_DIR, overwrite=overwrite) as tmp:
            ov.save_model(full, tmp / FULL_XML.name, compress_to_fp16=False)
            ov.save_model(shallow, tmp / SHALLOW_XML.name, compress_to_fp16=False)
            shutil.copy2(folder / "unet" / "config.json", tmp / "config.json")
            stats = {}
            for name in (FULL_XML.name, SHALLOW_XML.name):
                saved = ov.Core().read_model(tmp / name)
                n_int8, int8_bytes = int8_constant_stats(saved)
                stats[name] = {
                    "fake_quantize_ops": count_fake_quantize(saved),
                    "int8_constants": n_int8,
                    "int8_constant_bytes": int8_bytes,
                    "bin_bytes": (tmp / name).with_suffix(".bin").stat().st_size,
                }
            info = {
                "format": FORMAT,
                "version": 1,
                "cached": "output of up_blocks[-2] (the input hidden state of the last up block)",
                "shallow_path": "conv_in, time embedding, down_blocks[0] (no downsampler), up_blocks[-1], conv_out",
                "deep_feature_channels": deep_feature_channels(unet),
                "quantized": quantize.is_quantized(unet),
                "source": source,
                "full_vs_unet_relative_l2": parity,
                "irs": stats,
                "export_s": round(time.perf_counter() - t0, 1),
            }
            (tmp / INFO_FILE.name).write_text(json.dumps(info, indent=2, default=str))
        bar.update()
    return folder / DEEPCACHE_DIR


def add_from_run(run_dir: str | Path, folder: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """unet_deepcache/ for a QAT run's export (`run_dir/openvino` unless `folder`), from `run_dir/final`."""
    from ..run_folder import FINAL_DIR, OPENVINO_DIR, is_checkpoint
    from .openvino import load_student_from_checkpoint

    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"--run {str(run_dir)!r} does not exist; pass the output_dir of `ov-sd train`")
    final = run_dir / FINAL_DIR
    if not is_checkpoint(final):
        raise UserError(
            f"--run {str(run_dir)!r} is not a finished QAT run (no {FINAL_DIR}/ with the trained student); "
            "pass the output_dir of a completed `ov-sd train`, or --fp32 DIFFUSERS_FOLDER for an FP32 folder"
        )
    target = check_target(folder if folder is not None else run_dir / OPENVINO_DIR, overwrite)
    student, _, base, _ = load_student_from_checkpoint(final)
    return write_deepcache_irs(
        target, student, overwrite=overwrite, source={"kind": "qat", "checkpoint": str(final.resolve()), "base": base}
    )


def add_from_diffusers(diffusers_folder: str | Path, folder: str | Path, *, overwrite: bool = False) -> Path:
    """unet_deepcache/ for an FP32 OpenVINO folder (e.g. optimum's export) from its diffusers pipeline folder."""
    from ..assets import resolve_model_path
    from ..pipeline_folder import load_pipeline

    source = resolve_model_path(str(diffusers_folder))
    if not is_diffusers_folder(source):
        raise UserError(f"--fp32 {str(diffusers_folder)!r} is not a diffusers pipeline folder (no unet weights)")
    target = check_target(folder, overwrite)
    if written_by(target) == "qat":
        raise UserError(f"--model {str(folder)!r} is a QAT export; build its IRs from the run with --run RUN_DIR")
    unet = load_pipeline(source).unet.eval()
    return write_deepcache_irs(target, unet, overwrite=overwrite, source={"kind": "fp32", "diffusers": source})


# --------------------------------------------------------------------------------------------------------------------
# `ov-sd deepcache`
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="output_dir of a QAT run (`ov-sd train`): IRs from its final/ student")
    src.add_argument("--fp32", help="a diffusers pipeline folder (or `reference`): FP32 IRs of its UNet")
    p.add_argument("--model", help="the OpenVINO pipeline folder to add them to (default: RUN/openvino)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing unet_deepcache/")


def main(args) -> int:
    if args.run is not None:
        out = add_from_run(args.run, args.model, overwrite=args.overwrite)
    else:
        if args.model is None:
            raise UserError("--fp32 needs --model OPENVINO_FOLDER (the folder to add the IRs to)")
        out = add_from_diffusers(args.fp32, args.model, overwrite=args.overwrite)
    info = read_info(out.parent)
    print(
        f"step-caching IRs written to {out} (full vs unet/ relative L2 {info.get('full_vs_unet_relative_l2'):.2g}); "
        "run them with ov_sd_trainer.eval.deepcache_pipeline.OVDeepCacheStableDiffusionPipeline"
    )
    return 0
