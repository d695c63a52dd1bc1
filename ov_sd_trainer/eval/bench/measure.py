"""Measuring one variant: the parts of an image (UNet step on fixed inputs, the shallow step with step caching, text
encoder, VAE decode), the image latency composed from them, full-pipeline latency (K steps, and the whole image
where cheap, to check the composition), load time, and (`--profile`) OpenVINO's per-node counters summarised by op
type and execution precision."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from ... import families
from ...pipeline_folder import folder_bytes, load_pipeline, match_vae_decoder_batch, unet_bytes
from .monitor import PhaseMonitor, free_memory
from .settings import BenchSettings
from .variants import Variant

MERGE_OP_TYPES = ("TopK", "Gather", "GatherElements", "ScatterElementsUpdate", "ScatterUpdate", "ScatterNDUpdate")


def unet_config(folder: str | Path) -> dict:
    """The UNet's config.json of a diffusers or OpenVINO pipeline folder (which extra inputs it takes)."""
    return json.loads((Path(folder) / "unet" / "config.json").read_text())


def unet_inputs(settings: BenchSettings, geo: dict[str, int], height: int, width: int, config: dict | None = None):
    """Fixed UNet inputs shared by every variant: sample [B,C,h,w], timestep [1], encoder_hidden_states [B,77,D], and
    the extra inputs the UNet `config` takes (`families.extra_input_dims`, in the IR's order): SDXL's text_embeds
    [B,P] (random, as the states) and time_ids [B,6] (original = target = height x width, no crop, as the SDXL
    pipeline builds them), LCM's timestep_cond [B,D]."""
    import torch

    gen = torch.Generator().manual_seed(settings.seed)
    f, batch = geo["vae_factor"], settings.batch_size
    inputs = {
        "sample": torch.randn(batch, geo["in_channels"], height // f, width // f, generator=gen),
        "timestep": torch.tensor([500], dtype=torch.long),  # optimum's static reshape fixes timestep to shape [1]
        "encoder_hidden_states": torch.randn(batch, 77, geo["text_dim"], generator=gen),
    }
    for name, dim in families.extra_input_dims(config or {}).items():
        if name == families.TIME_IDS:
            inputs[name] = families.sdxl_time_ids((height, width), (0, 0), (height, width), batch=batch)
        else:
            inputs[name] = torch.randn(batch, dim, generator=gen)
    return inputs


def extra_inputs(inputs: dict) -> dict:
    """The inputs after (sample, timestep, encoder_hidden_states): SDXL's text_embeds and time_ids, LCM's
    timestep_cond (none for SD 1.x/2.x)."""
    return {k: v for k, v in inputs.items() if k not in ("sample", "timestep", "encoder_hidden_states")}


def time_calls(fn, warmup: int, repeats: int, desc: str, progress: bool, warmup_s: float = 0.0) -> list[float]:
    """`repeats` timed calls of `fn` after untimed ones: at least `warmup` calls and `warmup_s` seconds (the first
    calls after a compile run slow for a while: on a small model ~10 calls of twice the steady time)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    done = 0
    while done < warmup or (warmup and time.perf_counter() - start < warmup_s):
        fn()
        done += 1
    times = []
    for _ in tqdm(range(repeats), desc=desc, leave=False, disable=not progress):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def unet_calls(scheduler, steps: int) -> int:
    """UNet calls of a `steps`-step generation: the scheduler's timesteps (PNDM, SD 1.5's default: 51 for 50 steps)."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def split_calls(calls: int, cache_interval: int) -> tuple[int, int]:
    """(full, shallow) UNet calls with step caching: call k is full when k % interval == 0 (interval 1: all full)."""
    full = math.ceil(calls / cache_interval)
    return full, calls - full


def compose(parts: dict, calls: int, cache_interval: int) -> float:
    """Latency of one pipeline call composed from its measured parts: text encoder + UNet calls + VAE decode."""
    full, shallow = split_calls(calls, cache_interval)
    unet = full * parts["unet_step_s"] + shallow * (parts["shallow_step_s"] or 0.0)
    return parts["text_encoder_s"] + unet + parts["vae_decode_s"]


def _pipeline_call(pipe, settings: BenchSettings, steps: int, height: int, width: int, generator, **extra) -> None:
    """One timed pipeline run: batch_size // 2 prompts (CFG doubles them in the UNet), `steps` steps, VAE decode."""
    pipe(
        [settings.prompt] * (settings.batch_size // 2),
        num_inference_steps=steps,
        guidance_scale=settings.guidance_scale,
        height=height,
        width=width,
        generator=generator,
        **extra,
    )


def _time_parts(pipe, step, shallow, settings: BenchSettings, inputs: dict, run, context, progress) -> dict:
    """Time what one image costs, part by part, on a loaded pipeline (diffusers or optimum-intel, the same calls the
    pipeline makes): the UNet step (`step`; `shallow` too with step caching), the text encoder (`encode_prompt` with
    CFG: the prompts and the empty negative prompts), the VAE decode of the prompt batch's latents with the
    postprocessing to PIL, the K-step pipeline and (`measure_image`) the whole `image_steps` pipeline
    (`run(steps)`). `context()`: entered around every call (torch inference mode / autocast)."""
    import torch

    images = settings.batch_size // 2
    prompts = [settings.prompt] * images
    gen = torch.Generator().manual_seed(settings.seed + 1)
    latents = torch.randn(images, *inputs["sample"].shape[1:], generator=gen)
    scaling = pipe.vae.config.scaling_factor

    def within(fn):
        def call():
            with context():
                fn()

        return call

    def text():  # keywords: SDXL's encode_prompt takes prompt_2 second; it runs both of SDXL's text encoders
        pipe.encode_prompt(prompts, device=pipe._execution_device, num_images_per_prompt=1,
                           do_classifier_free_guidance=True)  # fmt: skip

    def vae():
        image = pipe.vae.decode(latents / scaling, return_dict=False)[0]
        pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * images)

    def timed(fn, desc):
        return time_calls(within(fn), settings.warmup, settings.repeats, desc, progress, settings.warmup_s)

    out = {"unet_times": timed(step, "UNet steps")}
    out["shallow_times"] = timed(shallow, "shallow UNet steps") if shallow else []
    out["text_times"] = timed(text, "text encoder")
    out["vae_times"] = timed(vae, "VAE decode")
    out["pipeline_times"] = time_calls(
        within(lambda: run(settings.steps_pipeline)), 0, settings.pipeline_repeats, "pipeline runs", progress
    )
    out["image_times"] = []
    if settings.measure_image:
        out["image_times"] = time_calls(
            within(lambda: run(settings.image_steps)), 0, settings.pipeline_repeats, "image runs", progress
        )
    out["calls_pipeline"] = unet_calls(pipe.scheduler, settings.steps_pipeline)
    out["calls_image"] = unet_calls(pipe.scheduler, settings.image_steps)
    return out


def measure_pytorch(folder, settings: BenchSettings, inputs: dict, height: int, width: int, bf16: bool, progress):
    import torch

    t0 = time.perf_counter()
    pipe = load_pipeline(str(folder))
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    unet = pipe.unet.eval()

    @contextlib.contextmanager
    def context():
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            yield

    kwargs = families.unet_kwargs(extra_inputs(inputs))  # SDXL: added_cond_kwargs (text_embeds, time_ids)

    def step():
        unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], return_dict=False, **kwargs)

    def run(steps):
        _pipeline_call(pipe, settings, steps, height, width, torch.Generator().manual_seed(settings.seed))

    raw = _time_parts(pipe, step, None, settings, inputs, run, context, progress)
    return {**raw, "load_compile_s": load_s, "ov_config": None}


def load_openvino(folder, settings: BenchSettings, ov_config: dict, height: int, width: int, cache_interval: int = 1):
    """from_pretrained (uncompiled) -> static reshape to (batch, height, width) -> compile, as the README does.
    The folder's optimum-intel class (`OVDiffusionPipeline` picks it from model_index.json: `OVStableDiffusionPipeline`,
    `OVStableDiffusionXLPipeline`, ...). `cache_interval` > 1: `OVDeepCacheStableDiffusionPipeline`, its full /
    shallow IRs compiled and the plain UNet not (it never runs then)."""
    from optimum.intel import OVDiffusionPipeline

    cls = OVDiffusionPipeline
    if cache_interval > 1:
        from ..deepcache_pipeline import OVDeepCacheStableDiffusionPipeline as cls

    pipe = cls.from_pretrained(str(folder), compile=False, ov_config=ov_config)
    if settings.static_shapes:
        images = settings.batch_size // 2
        pipe.reshape(batch_size=images, height=height, width=width, num_images_per_prompt=1)
        match_vae_decoder_batch(pipe, images, height, width)
    if cache_interval > 1:
        pipe.cache_interval = cache_interval
        pipe.text_encoder.compile()
        pipe.vae_decoder.compile()
        for part in pipe._parts().values():
            part.compile(pipe.unet._device, pipe.unet.ov_config)
    else:
        pipe.compile()
    return pipe


def measure_openvino(folder, settings: BenchSettings, ov_config: dict, inputs: dict, height, width, progress,
                     cache_interval: int = 1):  # fmt: skip
    import numpy as np

    t0 = time.perf_counter()
    pipe = load_openvino(folder, settings, ov_config, height, width, cache_interval)
    load_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    feed = {k: v.numpy() for k, v in inputs.items()}
    shallow = None
    if cache_interval > 1:  # the full IR is the step; the shallow one runs on the deep feature it returns
        from ...compress.deepcache import DEEP_FEATURE_NAME

        parts = pipe._parts()
        compiled = parts["full"].request
        feature = np.array(compiled(feed)[DEEP_FEATURE_NAME], copy=True)
        shallow_feed = {**feed, DEEP_FEATURE_NAME: feature}

        def step():
            compiled(feed)

        def shallow():
            parts["shallow"].request(shallow_feed)
    else:
        compiled = pipe.unet.request

        def step():
            pipe.unet(**feed)

    def run(steps):
        _pipeline_call(pipe, settings, steps, height, width, np.random.RandomState(settings.seed))

    raw = _time_parts(pipe, step, shallow, settings, inputs, run, contextlib.nullcontext, progress)
    result = {
        **raw,
        "load_compile_s": load_s,
        "ov_config": {k: str(v) for k, v in ov_config.items()},
        "unet_execution": {
            k: _prop_str(compiled.get_property(k))
            for k in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT", "NUM_STREAMS")
        },
        # the compiled UNet IR's inputs (static shapes unless --dynamic-shapes): SDXL's add text_embeds, time_ids
        "unet_ir_inputs": {port.get_any_name(): str(port.get_partial_shape()) for port in compiled.inputs},
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


def ov_config_for(variant: Variant, settings: BenchSettings) -> dict[str, Any]:
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}  # optimum-intel's default for its models
    if settings.threads:
        config["INFERENCE_NUM_THREADS"] = settings.threads
    config.update(settings.ov_config)
    if variant.f32:  # the FP32 row stays FP32 whatever --ov-config says
        config["INFERENCE_PRECISION_HINT"] = "f32"
    if settings.profile:
        config["PERF_COUNT"] = "YES"
    return config


def median_or_none(times: list[float]) -> float | None:
    return statistics.median(times) if times else None


def measure_variant(variant: Variant, folder: Path, settings: BenchSettings, inputs: dict, height, width, progress):
    with PhaseMonitor() as mon:
        if variant.is_pytorch:
            raw = measure_pytorch(folder, settings, inputs, height, width, bf16=variant.bf16, progress=progress)
        else:
            config = ov_config_for(variant, settings)
            raw = measure_openvino(folder, settings, config, inputs, height, width, progress, variant.cache_interval)
        free_memory()
    parts = {
        "text_encoder_s": median_or_none(raw["text_times"]),
        "unet_step_s": median_or_none(raw["unet_times"]),
        "shallow_step_s": median_or_none(raw["shallow_times"]),
        "vae_decode_s": median_or_none(raw["vae_times"]),
    }
    interval = variant.cache_interval
    full, shallow = split_calls(raw["calls_image"], interval)
    pipeline_s, image_measured_s = median_or_none(raw["pipeline_times"]), median_or_none(raw["image_times"])
    pipeline_composed_s = compose(parts, raw["calls_pipeline"], interval)
    image_s = compose(parts, raw["calls_image"], interval)
    row = {
        "name": variant.name,
        "label": variant.label,
        "runtime": variant.runtime,
        "folder": str(folder),
        "unet_inputs": {k: list(v.shape) for k, v in inputs.items()},  # what the timed UNet step is fed
        **parts,
        "unet_step_times_s": [round(t, 4) for t in raw["unet_times"]],
        "shallow_step_times_s": [round(t, 4) for t in raw["shallow_times"]],
        "text_encoder_times_s": [round(t, 4) for t in raw["text_times"]],
        "vae_decode_times_s": [round(t, 4) for t in raw["vae_times"]],
        "cache_interval": interval,
        "int8_text_vae": variant.int8_text_vae,
        "image_steps": settings.image_steps,
        "unet_calls_per_image": raw["calls_image"],
        "unet_calls_full": full,
        "unet_calls_shallow": shallow,
        "image_s": image_s,  # composed: text encoder + full x step + shallow x shallow step + VAE decode
        "image_measured_s": image_measured_s,
        "image_measured_times_s": [round(t, 3) for t in raw["image_times"]],
        "image_composed_vs_measured": image_s / image_measured_s if image_measured_s else None,
        "pipeline_s": pipeline_s,
        "pipeline_times_s": [round(t, 3) for t in raw["pipeline_times"]],
        "pipeline_steps": settings.steps_pipeline,
        "unet_calls_pipeline": raw["calls_pipeline"],
        "pipeline_composed_s": pipeline_composed_s,
        "pipeline_composed_vs_measured": pipeline_composed_s / pipeline_s if pipeline_s else None,
        # what the composition leaves out (scheduler, guidance arithmetic, tensor conversions), per UNet call: from
        # the whole image where it was timed, else from the K-step pipeline
        "overhead_s_per_call": (
            (image_measured_s - image_s) / raw["calls_image"]
            if image_measured_s
            else (pipeline_s - pipeline_composed_s) / raw["calls_pipeline"]
            if pipeline_s
            else None
        ),
        "load_compile_s": round(raw["load_compile_s"], 2),
        "unet_bytes": unet_bytes(folder),
        "text_vae_bytes": text_vae_bytes(folder),
        "total_bytes": folder_bytes(folder),
        **mon.as_dict(),
        "ov_config": raw["ov_config"],
    }
    for key in ("unet_execution", "unet_ir_inputs"):
        if key in raw:
            row[key] = raw[key]
    if "profile" in raw:
        row["profile"] = raw["profile"]
    return row


def text_vae_bytes(folder: str | Path) -> int:
    """Bytes on disk of the text encoder(s) and VAE weights (OpenVINO IRs, or the diffusers weights)."""
    folder = Path(folder)
    total = 0
    for name in ("text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder", "vae"):
        sub = folder / name
        if sub.is_dir():
            total += sum(f.stat().st_size for f in sub.iterdir() if f.is_file() and f.suffix != ".json")
    return total
