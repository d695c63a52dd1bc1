"""optimum-intel's own 8-bit post-training quantization (PTQ) of a Stable Diffusion pipeline's UNet: the peers that QAT
must beat (`ov-sd ptq --mode hybrid|full`).

Two modes, both optimum-intel's:

- `hybrid` (`OVWeightQuantizationConfig(bits=8, quant_method="hybrid")`, optimum's recommended 8-bit mode for
  diffusion models): int8 weights with float activations on MatMul/Linear and Embedding layers, full int8 (weights
  and activations) on the convolutions;
- `full` (`OVQuantizationConfig(bits=8)`, `optimum-cli export openvino --quant-mode int8`): int8 weights and
  activations everywhere NNCF quantizes.

This is what a user of optimum-intel 2.2 does offline: load (or export) the pipeline as
an `OVStableDiffusionPipeline`, run it over calibration prompts while optimum's `InferRequestWrapper` records every
UNet call, and hand the recorded inputs to `OVQuantizer.quantize` (NNCF on the IR). optimum's named calibration datasets download at run time, so prompts are passed
in. Its own collector (`OVCalibrationDatasetBuilder._prepare_diffusion_calibration_data`) always runs diffusers'
default 50 steps at min(native size, 512) px with an unseeded generator; the collection here is the same code path
(the same `InferRequestWrapper` on the compiled UNet request) with the steps, size and seed exposed, so the peer can
be calibrated exactly like the runs it is compared with.

A few-step model (a consistency student's export, or any latent consistency folder) is calibrated on its own
sampling: its `LCMScheduler` at the steps and guidance it was trained for (`pipeline_folder.trained_sampling`), one
UNet call per step with the guidance embedding as an input; the peer folder keeps that record (results.json
`few_step`), so `ov-sd generate` and `ov-sd eval` sample it as they sample the student.

Defaults are optimum-intel's for a diffusion pipeline: 200 calibration samples (UNet calls), 50 steps, guidance 7.5;
for `full`, `OVQuantizationConfig(bits=8)` i.e. preset mixed (symmetric weights, asymmetric activations),
`model_type="transformer"`, fast bias correction, overflow fix off, NNCF's default SmoothQuant alpha for matmuls.
The text encoder and VAE stay as optimum exports them (FP32) unless `other_components="int8-weights"`, which is what
`OVQuantizationConfig` on a whole pipeline (and `optimum-cli export openvino --quant-mode int8`) also does: 8-bit
weight-only compression of the other models.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..assets import resolve_model_path
from ..errors import UserError
from ..outputs import atomic_output_dir, check_output_dir
from ..pipeline_folder import (
    FEW_STEP_KEY,
    PTQ_INFO_FILE,
    RESULTS_FILE,
    UNET_XML,
    check_image_size,
    check_model_source,
    few_step_record,
    hub_load_errors,
    is_openvino_folder,
    trained_sampling,
    write_genai_files,
)
from .generate import DEFAULT_GUIDANCE
from .prompts import calibration_prompts

logger = logging.getLogger(__name__)

DEFAULT_NUM_SAMPLES = 200  # optimum-intel: `config.num_samples or 200` in _prepare_diffusion_calibration_data
DEFAULT_STEPS = 50  # the diffusers default that optimum's collector runs (it passes no num_inference_steps)
OTHER_COMPONENTS = ("fp32", "int8-weights")
MODES = ("hybrid", "full")
DEFAULT_MODE = "hybrid"  # optimum-intel's recommended 8-bit mode for diffusion models: the stronger peer
METHODS = {
    "hybrid": 'optimum-intel OVQuantizer hybrid (OVWeightQuantizationConfig(bits=8, quant_method="hybrid")) of the UNet',
    "full": "optimum-intel OVQuantizer full int8 (OVQuantizationConfig(bits=8)) of the UNet",
}


def _check_args(calibration_prompts, num_samples, steps, height, width, guidance_scale, other_components) -> list[str]:
    if isinstance(calibration_prompts, str) or not isinstance(calibration_prompts, Sequence):
        raise UserError("calibration_prompts must be a list of prompt strings")
    prompts = list(calibration_prompts)
    if not prompts:
        raise UserError("calibration_prompts is empty; pass at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise UserError(f"calibration_prompts[{bad[0]}] is not a non-empty string ({len(bad)} such prompts)")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise UserError(f"num_samples must be a positive integer (UNet calls to record), got {num_samples!r}")
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    check_image_size(height, width)
    if guidance_scale < 0:
        raise UserError(f"guidance_scale must be >= 0, got {guidance_scale}")
    if other_components not in OTHER_COMPONENTS:
        raise UserError(f"other_components={other_components!r}: choose one of {', '.join(OTHER_COMPONENTS)}")
    return prompts


def load_ov_pipeline_for_ptq(model: str | Path, ov_config: dict | None = None):
    """An uncompiled optimum-intel pipeline with dynamic shapes, of the class the folder's model_index.json names
    (`OVDiffusionPipeline` picks it: `OVStableDiffusionPipeline`, `OVStableDiffusionXLPipeline`, ...): an OpenVINO
    folder as it is, a diffusers folder or Hub id exported by optimum-intel (FP32 IR: `load_in_8bit=False`, else
    optimum compresses the weights of a model over 1 B parameters, SDXL's UNet, to int8)."""
    model = str(model)
    check_model_source(model)  # missing folder, not a pipeline, uncached Hub id: one line before the slow load
    from optimum.intel import OVDiffusionPipeline

    path = Path(model).expanduser()
    if is_openvino_folder(path):
        return OVDiffusionPipeline.from_pretrained(str(path.resolve()), compile=False, ov_config=ov_config)
    source = str(path.resolve()) if path.exists() else model  # a relative folder must not read as a Hub id
    with hub_load_errors(model):
        return OVDiffusionPipeline.from_pretrained(source, export=True, compile=False, ov_config=ov_config,
                                                   load_in_8bit=False)  # fmt: skip


def default_calibration_size(pipe) -> tuple[int, int]:
    """optimum's rule: the UNet's native size in pixels, at most 512."""
    size = int(pipe.unet.config.get("sample_size", 64)) * int(pipe.vae_scale_factor)
    size = min(size, 512)
    return size, size


def collect_unet_inputs(
    pipe,
    prompts: list[str],
    num_samples: int,
    *,
    steps: int = DEFAULT_STEPS,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Run the compiled pipeline over `prompts` (cycled) and record the first `num_samples` UNet calls, each a dict
    `sample` [2B,4,h,w], `timestep` [1], `encoder_hidden_states` [2B,77,D] (with CFG), through optimum-intel's own
    `InferRequestWrapper`. The VAE decode is skipped (`output_type="latent"`): it does not change UNet inputs."""
    import numpy as np
    from optimum.intel.openvino.quantization import InferRequestWrapper
    from tqdm.auto import tqdm

    if height is None or width is None:
        height, width = default_calibration_size(pipe)
    pipe.compile()
    data: list = []
    pipe.unet.request = InferRequestWrapper(pipe.unet.request, data)
    pipe.set_progress_bar_config(disable=True)

    def stop_when_full(p, step, timestep, callback_kwargs):
        bar.update(min(len(data), num_samples) - bar.n)
        if len(data) >= num_samples:  # diffusers skips the remaining steps once interrupted
            p._interrupt = True
        return callback_kwargs

    try:
        with tqdm(total=num_samples, desc="PTQ calibration (UNet calls)", disable=not progress) as bar:
            i = 0
            while len(data) < num_samples:
                pipe(
                    prompts[i % len(prompts)],
                    num_inference_steps=steps,
                    height=height,
                    width=width,
                    guidance_scale=guidance_scale,
                    generator=np.random.RandomState(seed + i),
                    output_type="latent",
                    callback_on_step_end=stop_when_full,
                )
                i += 1
    finally:
        pipe.unet.request = pipe.unet.request.request
        pipe._interrupt = False
    return data[:num_samples]


def quantize_pipeline_int8(
    model: str | Path,
    output_dir: str | Path,
    calibration_prompts: Sequence[str],
    num_samples: int = DEFAULT_NUM_SAMPLES,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    *,
    guidance_scale: float | None = None,
    smooth_quant_alpha: float | None = None,
    other_components: str = "fp32",
    mode: str = DEFAULT_MODE,
    overwrite: bool = False,
    ov_config: dict | None = None,
    progress: bool = True,
) -> Path:
    """Quantize `model`'s UNet to full int8 with optimum-intel's PTQ and write an OpenVINO pipeline folder that
    `OVStableDiffusionPipeline.from_pretrained` and OpenVINO GenAI's `Text2ImagePipeline` load (atomically: a failure
    leaves no half-written folder).

    `model`: an optimum-intel OpenVINO folder (FP32 UNet), a diffusers folder or a Hub id (exported first).
    `calibration_prompts`: prompts run through the pipeline (cycled) until `num_samples` UNet calls are recorded,
    `steps` denoising steps each at `height` x `width` (default: the model's size, at most 512) from seed
    `seed + i`; `steps` / `guidance_scale` None: what a few-step folder was trained for, else `DEFAULT_STEPS` and
    `DEFAULT_GUIDANCE`. `smooth_quant_alpha`: None keeps NNCF's default for `model_type="transformer"`.
    `other_components`: "fp32" (text encoder and VAE untouched) or "int8-weights" (optimum's pipeline default).
    `ov_config`: OpenVINO compile properties for the calibration runs (e.g. {"INFERENCE_NUM_THREADS": 1}).
    The settings, timings and sizes go to `ptq_info.json` in the folder. Returns the folder."""
    trained = trained_sampling(model)  # a few-step folder: its own steps and guidance (None otherwise)
    if steps is None:
        steps = trained["steps"] if trained else DEFAULT_STEPS
    if guidance_scale is None:
        guidance_scale = trained["guidance_scale"] if trained else DEFAULT_GUIDANCE
    prompts = _check_args(calibration_prompts, num_samples, steps, height, width, guidance_scale, other_components)
    if mode not in MODES:
        raise UserError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "hybrid" and smooth_quant_alpha is not None:
        raise UserError("smooth_quant_alpha applies to mode=full only (hybrid keeps the linear layers' inputs float)")
    if smooth_quant_alpha is not None and smooth_quant_alpha != -1 and not 0 <= smooth_quant_alpha <= 1:
        raise UserError(f"smooth_quant_alpha={smooth_quant_alpha}: must be -1 (off) or between 0 and 1")
    check_output_dir(output_dir, overwrite)  # fail before the slow imports, load and calibration
    check_model_source(str(model))  # (the load checks it too; here before the imports)
    import nncf
    import openvino as ov
    from optimum.intel import (
        OVConfig,
        OVPipelineQuantizationConfig,
        OVQuantizationConfig,
        OVQuantizer,
        OVWeightQuantizationConfig,
    )
    from optimum.intel.openvino.quantization import OVCalibrationDataset

    t0 = time.perf_counter()
    pipe = load_ov_pipeline_for_ptq(model, ov_config)
    if "nncf" in pipe.unet.model.get_rt_info():
        raise UserError(f"the UNet of {str(model)!r} is already quantized or compressed; pass the FP32 pipeline")
    if height is None or width is None:
        height, width = default_calibration_size(pipe)
    if height % pipe.vae_scale_factor or width % pipe.vae_scale_factor:
        raise UserError(f"{height}x{width} is not divisible by the VAE factor {pipe.vae_scale_factor}")
    load_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    data = collect_unet_inputs(
        pipe,
        prompts,
        num_samples,
        steps=steps,
        height=height,
        width=width,
        guidance_scale=guidance_scale,
        seed=seed,
        progress=progress,
    )
    collect_s = time.perf_counter() - t1
    # Free the compiled models before NNCF runs: its statistics and bias-correction passes compile their own copies,
    # and for SD 1.5 keeping the calibration copy too (~4 GB) pushed the peak past 13 GB.
    pipe.clear_requests()
    gc.collect()

    if mode == "full":
        unet_config = OVQuantizationConfig(bits=8, num_samples=len(data), smooth_quant_alpha=smooth_quant_alpha)
    else:  # optimum turns this into weight-only int8 for MatMul/Embedding + full int8 (no SmoothQuant) for the rest
        unet_config = OVWeightQuantizationConfig(bits=8, quant_method="hybrid", num_samples=len(data))
    default_config = OVWeightQuantizationConfig(bits=8) if other_components == "int8-weights" else None
    pipeline_config = OVPipelineQuantizationConfig({"unet": unet_config}, default_config=default_config)
    t2 = time.perf_counter()
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        OVQuantizer(pipe).quantize(
            calibration_dataset=OVCalibrationDataset({"unet": nncf.Dataset(data)}),
            ov_config=OVConfig(quantization_config=pipeline_config),
            save_directory=tmp,
        )
        quantize_s = time.perf_counter() - t2
        del pipe, data
        write_genai_files(tmp)  # as `ov-sd export` does: OpenVINO GenAI loads the peer too
        saved = ov.Core().read_model(tmp / UNET_XML)
        from ..compress.convert import count_fake_quantize, int8_constant_stats

        n_int8, int8_bytes = int8_constant_stats(saved)
        info: dict[str, Any] = {
            "method": METHODS[mode],
            "mode": mode,
            "source_model": str(model),
            "calibration": {
                "num_samples": num_samples,
                "num_prompts_available": len(prompts),
                "steps": steps,
                "height": height,
                "width": width,
                "guidance_scale": guidance_scale,
                "seed": seed,
                "collector": "optimum.intel InferRequestWrapper on the compiled UNet request, output_type=latent",
            },
            "quantization": _quantization_info(unet_config, mode, other_components),
            "versions": _versions(),
            "unet_bytes": (tmp / UNET_XML).with_suffix(".bin").stat().st_size,
            "fake_quantize_ops": count_fake_quantize(saved),
            "int8_constants": n_int8,
            "int8_constant_bytes": int8_bytes,
            "load_s": round(load_s, 2),
            "collect_s": round(collect_s, 2),
            "quantize_s": round(quantize_s, 2),
        }
        del saved
        info["total_bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        (tmp / PTQ_INFO_FILE).write_text(json.dumps(info, indent=2))
        few_step = few_step_record(model)
        if few_step is not None:  # the source's record: generate / eval sample the peer as they sample the student
            few_step["quantization_scheme"] = f"optimum-intel {mode} PTQ of {few_step.get('quantization_scheme')}"
            (tmp / RESULTS_FILE).write_text(json.dumps({FEW_STEP_KEY: few_step}, indent=2))
    logger.info("int8 PTQ pipeline written to %s (%d FakeQuantize ops)", output_dir, info["fake_quantize_ops"])
    return Path(output_dir)


def _quantization_info(unet_config, mode: str, other_components: str) -> dict[str, Any]:
    """What the UNet's quantization config resolves to (None in a config leaves NNCF's own default: recorded here)."""
    if mode == "hybrid":
        return {
            "bits": 8,
            "weights": "int8 " + ("symmetric" if unet_config.sym else "asymmetric") + " on MatMul/Embedding",
            "activations": "int8 on the other layers (convolutions), float on MatMul/Embedding",
            "overflow_fix": "disable",
            "other_components": other_components,
        }
    nncf_dict = unet_config.to_nncf_dict()
    return {
        "bits": 8,
        "sym_activations": unet_config.sym,
        "preset": nncf_dict["preset"].value,
        "model_type": nncf_dict["model_type"].value,
        "subset_size": nncf_dict["subset_size"],
        "fast_bias_correction": nncf_dict["fast_bias_correction"],
        "overflow_fix": unet_config.overflow_fix,
        "smooth_quant_alpha_matmul": nncf_dict["advanced_parameters"].smooth_quant_alphas.matmul,
        "smooth_quant_alpha_convolution": nncf_dict["advanced_parameters"].smooth_quant_alphas.convolution,
        "other_components": other_components,
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("optimum-intel", "nncf", "openvino", "diffusers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def add_arguments(p) -> None:
    p.add_argument(
        "--model", required=True, help="diffusers folder, Hub id, optimum-intel OpenVINO folder (FP32) or 'reference'"
    )
    p.add_argument("--output", required=True)
    p.add_argument("--prompts-file", default=None, help="one prompt a line (default: the synthetic captions)")
    p.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"denoising steps per calibration image (default {DEFAULT_STEPS}; a few-step folder: its own)",
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help=f"calibration guidance (default {DEFAULT_GUIDANCE}; a few-step folder: its own)",
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE, help="hybrid (optimum's recommended) or full int8")
    p.add_argument("--smooth-quant-alpha", type=float, default=None, help="--mode full only")
    p.add_argument("--other-components", choices=OTHER_COMPONENTS, default="fp32")
    p.add_argument("--threads", type=int, default=None, help="OpenVINO INFERENCE_NUM_THREADS for calibration")
    p.add_argument("--overwrite", action="store_true")


def main(args) -> int:
    """`ov-sd ptq --model DIR --output DIR [...]`: the PTQ peer as a command."""
    if args.prompts_file is None:
        prompts = calibration_prompts(args.seed)
    else:
        try:
            prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise UserError(f"cannot read --prompts-file {args.prompts_file!r}: {e.strerror}") from e
    out = quantize_pipeline_int8(
        resolve_model_path(args.model),
        args.output,
        prompts,
        num_samples=args.num_samples,
        height=args.height,
        width=args.width,
        steps=args.steps,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        smooth_quant_alpha=args.smooth_quant_alpha,
        other_components=args.other_components,
        mode=args.mode,
        overwrite=args.overwrite,
        ov_config={"INFERENCE_NUM_THREADS": args.threads} if args.threads else None,
    )
    print(f"{args.mode} int8 PTQ pipeline written to {out}")
    return 0
