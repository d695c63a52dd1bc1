"""Measuring one variant: UNet step latency on fixed inputs, full-pipeline latency, load time, and (`--profile`)
OpenVINO's per-node counters summarised by op type and execution precision."""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

from ...pipeline_folder import folder_bytes, load_pipeline, match_vae_decoder_batch, unet_bytes
from .monitor import PhaseMonitor, free_memory
from .settings import BenchSettings
from .variants import Variant

MERGE_OP_TYPES = ("TopK", "Gather", "GatherElements", "ScatterElementsUpdate", "ScatterUpdate", "ScatterNDUpdate")


def unet_inputs(settings: BenchSettings, geo: dict[str, int], height: int, width: int) -> dict:
    """Fixed UNet inputs shared by every variant: sample [B,C,h,w], timestep [1], encoder_hidden_states [B,77,D]."""
    import torch

    gen = torch.Generator().manual_seed(settings.seed)
    f = geo["vae_factor"]
    return {
        "sample": torch.randn(settings.batch_size, geo["in_channels"], height // f, width // f, generator=gen),
        "timestep": torch.tensor([500], dtype=torch.long),  # optimum's static reshape fixes timestep to shape [1]
        "encoder_hidden_states": torch.randn(settings.batch_size, 77, geo["text_dim"], generator=gen),
    }


def _time_calls(fn, warmup: int, repeats: int, desc: str, progress: bool) -> list[float]:
    from tqdm.auto import tqdm

    times = []
    for i in tqdm(range(warmup + repeats), desc=desc, leave=False, disable=not progress):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _pipeline_call(pipe, settings: BenchSettings, height: int, width: int, generator) -> None:
    """One timed pipeline run: batch_size // 2 prompts (CFG doubles them in the UNet), K steps, VAE decode."""
    pipe(
        [settings.prompt] * (settings.batch_size // 2),
        num_inference_steps=settings.steps_pipeline,
        guidance_scale=settings.guidance_scale,
        height=height,
        width=width,
        generator=generator,
    )


def measure_pytorch(folder, settings: BenchSettings, inputs: dict, height: int, width: int, bf16: bool, progress):
    import torch

    t0 = time.perf_counter()
    pipe = load_pipeline(str(folder))
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    unet = pipe.unet.eval()

    def step():
        with torch.inference_mode(), autocast:
            unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], return_dict=False)

    times = _time_calls(step, settings.warmup, settings.repeats, "UNet steps", progress)

    def run_pipeline():
        with torch.inference_mode(), autocast:
            _pipeline_call(pipe, settings, height, width, torch.Generator().manual_seed(settings.seed))

    pipe_times = _time_calls(run_pipeline, 0, settings.pipeline_repeats, "pipeline runs", progress)
    return {"load_compile_s": load_s, "unet_times": times, "pipeline_times": pipe_times, "ov_config": None}


def load_openvino(folder, settings: BenchSettings, ov_config: dict, height: int, width: int):
    """from_pretrained (uncompiled) -> static reshape to (batch, height, width) -> compile, as the README does."""
    from optimum.intel import OVStableDiffusionPipeline

    pipe = OVStableDiffusionPipeline.from_pretrained(str(folder), compile=False, ov_config=ov_config)
    if settings.static_shapes:
        images = settings.batch_size // 2
        pipe.reshape(batch_size=images, height=height, width=width, num_images_per_prompt=1)
        match_vae_decoder_batch(pipe, images, height, width)
    pipe.compile()
    return pipe


def measure_openvino(folder, settings: BenchSettings, ov_config: dict, inputs: dict, height, width, progress):
    import numpy as np

    t0 = time.perf_counter()
    pipe = load_openvino(folder, settings, ov_config, height, width)
    load_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    feed = {k: v.numpy() for k, v in inputs.items()}
    times = _time_calls(lambda: pipe.unet(**feed), settings.warmup, settings.repeats, "UNet steps", progress)

    def run_pipeline():
        _pipeline_call(pipe, settings, height, width, np.random.RandomState(settings.seed))

    pipe_times = _time_calls(run_pipeline, 0, settings.pipeline_repeats, "pipeline runs", progress)
    compiled = pipe.unet.request
    result = {
        "load_compile_s": load_s,
        "unet_times": times,
        "pipeline_times": pipe_times,
        "ov_config": {k: str(v) for k, v in ov_config.items()},
        "unet_execution": {
            k: _prop_str(compiled.get_property(k))
            for k in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT", "NUM_STREAMS")
        },
    }
    if settings.profile:
        request = compiled.create_infer_request()
        request.infer(feed)  # the first call of a fresh request allocates: profile the second
        request.infer(feed)
        result["profile"] = summarize_profile(request.profiling_info)
    return result  # the pipeline is freed with this frame


def _prop_str(value) -> str:
    """OpenVINO property values as short strings: Type f32 -> 'f32', hints -> 'LATENCY'."""
    if hasattr(value, "to_string"):  # openvino.Type
        return value.to_string()
    return getattr(value, "name", None) or str(value)


def exec_precision(exec_type: str) -> str:
    """'jit_avx2_I8' -> 'i8', 'brgemm_avx512_bf16' -> 'bf16', 'ref_any_f32' -> 'f32' (the suffix OpenVINO reports)."""
    tail = exec_type.rsplit("_", 1)[-1].lower()
    return tail if tail in ("i8", "u8", "bf16", "f16", "f32", "i32", "i64") else "other"


def summarize_profile(profiling_info) -> dict[str, Any]:
    """Per-op-type and per-precision time of one UNet inference (OpenVINO PERF_COUNT, executed nodes only)."""
    by_type: dict[str, dict[str, float]] = {}
    by_precision: dict[str, float] = {}
    compute_fp: dict[str, int] = {}
    total = 0.0
    for p in profiling_info:
        if str(p.status).split(".")[-1] != "EXECUTED":
            continue
        ms = p.real_time.total_seconds() * 1000
        prec = exec_precision(p.exec_type)
        total += ms
        entry = by_type.setdefault(p.node_type, {"ms": 0.0, "count": 0})
        entry["ms"] += ms
        entry["count"] += 1
        key = f"{p.node_type}/{prec}"
        by_precision[prec] = by_precision.get(prec, 0.0) + ms
        entry[prec] = entry.get(prec, 0.0) + ms
        # which heavy ops did not run in int8: "which ops stay FP"
        if p.node_type in ("Convolution", "MatMul", "FullyConnected", "GroupConvolution") and prec in (
            "f32",
            "bf16",
            "f16",
        ):
            compute_fp[key] = compute_fp.get(key, 0) + 1
    types = sorted(by_type.items(), key=lambda kv: -kv[1]["ms"])
    merge_ms = sum(v["ms"] for k, v in by_type.items() if k in MERGE_OP_TYPES)
    return {
        "total_ms": round(total, 2),
        "by_type": [{"node_type": k, **{kk: round(vv, 3) for kk, vv in v.items()}} for k, v in types],
        "by_precision_ms": {k: round(v, 2) for k, v in sorted(by_precision.items(), key=lambda kv: -kv[1])},
        "fp_compute_ops": compute_fp,
        "merge_ops_ms": round(merge_ms, 2),
    }


def _ov_config_for(variant: Variant, settings: BenchSettings) -> dict[str, Any]:
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}  # optimum-intel's default for its models
    if settings.threads:
        config["INFERENCE_NUM_THREADS"] = settings.threads
    config.update(settings.ov_config)
    if variant.f32:  # the FP32 row stays FP32 whatever --ov-config says
        config["INFERENCE_PRECISION_HINT"] = "f32"
    if settings.profile:
        config["PERF_COUNT"] = "YES"
    return config


def measure_variant(variant: Variant, folder: Path, settings: BenchSettings, inputs: dict, height, width, progress):
    with PhaseMonitor() as mon:
        if variant.is_pytorch:
            raw = measure_pytorch(folder, settings, inputs, height, width, bf16=variant.bf16, progress=progress)
        else:
            config = _ov_config_for(variant, settings)
            raw = measure_openvino(folder, settings, config, inputs, height, width, progress)
        free_memory()
    row = {
        "name": variant.name,
        "label": variant.label,
        "runtime": variant.runtime,
        "folder": str(folder),
        "unet_step_s": statistics.median(raw["unet_times"]),
        "unet_step_times_s": [round(t, 4) for t in raw["unet_times"]],
        "pipeline_s": statistics.median(raw["pipeline_times"]) if raw["pipeline_times"] else None,
        "pipeline_times_s": [round(t, 3) for t in raw["pipeline_times"]],
        "pipeline_steps": settings.steps_pipeline,
        "load_compile_s": round(raw["load_compile_s"], 2),
        "unet_bytes": unet_bytes(folder),
        "total_bytes": folder_bytes(folder),
        **mon.as_dict(),
        "ov_config": raw["ov_config"],
    }
    if "unet_execution" in raw:
        row["unet_execution"] = raw["unet_execution"]
    if "profile" in raw:
        row["profile"] = raw["profile"]
    return row
