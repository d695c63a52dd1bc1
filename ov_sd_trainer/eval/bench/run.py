"""`ov-sd bench`: inference speed, size and memory of a Stable Diffusion pipeline in seven forms, side by side.

One process measures every variant on the same inputs, one variant at a time (each is loaded, measured and freed
before the next):

    a  pytorch-fp32       diffusers, FP32 eager
    b  pytorch-bf16       diffusers under torch.autocast("cpu", bfloat16)
    c  openvino-fp32      optimum-intel export, INFERENCE_PRECISION_HINT=f32
    d  openvino-default   the same IR at OpenVINO's default precision (bf16 where the CPU has it, else f32)
    e  optimum-int8-ptq   optimum-intel's own full-int8 post-training quantization of the UNet (`ptq.py`)
    f  qat-int8           this project's QAT int8 UNet (`--qat` folder; under `--arch sd15` built as QAT builds it)
    g  qat-int8-tome      the same with token merging (`--qat-tome`; under `--arch sd15` ToMe ratio 0.4 + QAT graph)

For each: UNet step latency (warm-up, then the median of N calls with fixed inputs), full pipeline latency for K
steps (text encoder + K CFG UNet steps + VAE decode), UNet and folder size on disk, load+compile time, peak RSS, and
speed-ups vs (a) and vs (e). OpenVINO pipelines are reshaped to static shapes (batch, height, width) as the README's
usage does, unless `--dynamic-shapes`.

Peak RSS: a thread samples the process RSS (psutil) every 20 ms while a variant is loaded and measured; `peak_rss`
is the maximum, `rss_start` the RSS when the variant's phase began (after the previous variant was freed and
`malloc_trim` returned freed heap to the OS), so `peak_rss - rss_start` is what the variant itself added. The same
thread's CPU accounting gives `other_load_cores`: the CPU time other processes used per second of the phase.

`--arch sd15` builds the SD 1.5 architecture with random weights (`models.build_sd15_pipeline`) once into the work
folder: latency does not depend on weight values, quality does, so (f)/(g) there are the QAT graph with untrained
weights (NNCF quantizers calibrated on two random inputs, exactly the graph QAT exports), speed only.
`--profile` compiles the OpenVINO variants with PERF_COUNT and writes time per op type and per execution precision.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .outputs import atomic_output_dir, check_output_dir

logger = logging.getLogger(__name__)

# id -> (name, label)
VARIANTS: dict[str, tuple[str, str]] = {
    "a": ("pytorch-fp32", "PyTorch FP32 eager (diffusers)"),
    "b": ("pytorch-bf16", "PyTorch bf16 autocast"),
    "c": ("openvino-fp32", "OpenVINO FP32 (INFERENCE_PRECISION_HINT=f32)"),
    "d": ("openvino-default", "OpenVINO default precision"),
    "e": ("optimum-int8-ptq", "optimum-intel INT8 PTQ (full int8 UNet)"),
    "f": ("qat-int8", "QAT INT8 (this project)"),
    "g": ("qat-int8-tome", "QAT INT8 + ToMe"),
}
NAME_TO_ID = {name: vid for vid, (name, _) in VARIANTS.items()}
ARCHS = ("sd15",)
MERGE_OP_TYPES = ("TopK", "Gather", "GatherElements", "ScatterElementsUpdate", "ScatterUpdate", "ScatterNDUpdate")
# Published anchors (shared/FINDINGS.md section 5) that issue 8 sets as targets for SD 1.5 at 512 px, batch 2.
TARGETS = {
    "qat_int8_vs_pytorch_fp32": 3.9,
    "qat_int8_unet_size_vs_fp32": 0.26,
    "qat_tome_vs_pytorch_fp32": 5.1,
    "qat_tome_vs_optimum_int8": 1.3,
}
GiB = 1024**3
MiB = 1024**2


@dataclass
class BenchSettings:
    height: int | None = None  # default: the model's native size (512 for --arch sd15)
    width: int | None = None
    batch_size: int = 2  # UNet batch: with classifier-free guidance, batch_size // 2 images per pipeline call
    steps_pipeline: int = 3  # K: denoising steps of each full-pipeline run
    repeats: int = 5  # N: timed UNet calls (median reported)
    pipeline_repeats: int = 2  # timed full-pipeline runs (median reported)
    warmup: int = 1  # untimed UNet calls first (first inference allocates and tunes)
    threads: int | None = None  # torch threads and OpenVINO INFERENCE_NUM_THREADS; None: the libraries' choice
    static_shapes: bool = True
    ov_config: dict[str, str] = field(default_factory=dict)  # extra OpenVINO properties for every OV variant
    profile: bool = False
    seed: int = 0
    prompt: str = "a red circle on a blue background"
    guidance_scale: float = 7.5
    ptq_samples: int = 4  # UNet calls recorded for the PTQ peer when bench builds it (speed does not depend on it)
    ptq_steps: int = 4
    tome_ratio: float = 0.4  # (g) under --arch sd15: `tome.apply_tome` arguments (the published setting: 0.4)
    tome_max_downsample: int = 1
    tome_mode: str = "tome"
    tome_merge_mlp: bool = False

    def tome_kwargs(self) -> dict[str, Any]:
        return {
            "ratio": self.tome_ratio,
            "max_downsample": self.tome_max_downsample,
            "mode": self.tome_mode,
            "merge_mlp": self.tome_merge_mlp,
        }


def parse_variants(spec: str | None) -> list[str]:
    """'a,c,e' or 'pytorch-fp32,optimum-int8-ptq' (or a mix) -> sorted variant ids; None -> all."""
    if spec is None:
        return list(VARIANTS)
    ids = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        vid = item if item in VARIANTS else NAME_TO_ID.get(item)
        if vid is None:
            known = ", ".join(f"{k} ({n})" for k, (n, _) in VARIANTS.items())
            raise UserError(f"unknown variant {item!r}; choose from {known}")
        if vid not in ids:
            ids.append(vid)
    if not ids:
        raise UserError("--variants is empty; name at least one of a-g")
    return sorted(ids)


def native_bf16(machine: dict) -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX); without them torch autocast emulates bf16."""
    isa = set(machine.get("isa", []))
    return bool(isa & {"avx512_bf16", "amx_bf16"}) or "BF16" in machine.get("openvino_cpu_capabilities", [])


def default_skips(variant_ids: list[str], explicit: bool, machine: dict) -> dict[str, str]:
    """Variants left out of a default run (no --variants) on this machine, with the reason shown in the report."""
    skips = {}
    if not explicit and "b" in variant_ids and not native_bf16(machine):
        skips["b"] = (
            "skipped by default: this CPU has no bf16 instructions, so autocast emulates bf16 far slower than FP32 "
            "(tens of minutes per SD 1.5 UNet step on 2 cores); name b in --variants to measure it anyway"
        )
    return skips


def parse_ov_config(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"--ov-config {item!r}: expected KEY=VALUE, e.g. PERFORMANCE_HINT=LATENCY")
        out[key.strip()] = value.strip()
    return out


# --------------------------------------------------------------------------------------------------------------------
# Process memory and CPU load during one phase
# --------------------------------------------------------------------------------------------------------------------


def _malloc_trim() -> None:
    """Give freed heap back to the OS so the next phase starts from a true baseline (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def free_memory() -> None:
    gc.collect()
    _malloc_trim()


class PhaseMonitor:
    """Samples this process's RSS every `interval` s between __enter__ and __exit__ (max = peak RSS), and the CPU
    time the rest of the machine used meanwhile."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self.proc.memory_info().rss)

    def _busy(self) -> tuple[float, float]:
        import psutil

        sys_t = psutil.cpu_times()
        busy = sum(sys_t) - sys_t.idle - getattr(sys_t, "iowait", 0.0)
        own = self.proc.cpu_times()
        return busy, own.user + own.system + own.children_user + own.children_system

    def __enter__(self) -> PhaseMonitor:
        self.start = self.peak = self.proc.memory_info().rss
        self._t0 = time.perf_counter()
        self._busy0 = self._busy()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        wall = time.perf_counter() - self._t0
        busy, own = self._busy()
        self.wall_s = wall
        self.own_cores = (own - self._busy0[1]) / wall if wall > 0 else 0.0
        self.other_cores = max(0.0, (busy - self._busy0[0]) - (own - self._busy0[1])) / wall if wall > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_rss_bytes": self.peak,
            "rss_start_bytes": self.start,
            "own_cores": round(self.own_cores, 2),
            "other_load_cores": round(self.other_cores, 2),
        }


# --------------------------------------------------------------------------------------------------------------------
# Folders: sizes and shapes
# --------------------------------------------------------------------------------------------------------------------


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def unet_bytes(folder: Path) -> int:
    """Bytes of the UNet on disk: the OpenVINO IR (.xml + .bin) or the diffusers weights (+ config)."""
    unet = Path(folder) / "unet"
    ov_files = [unet / "openvino_model.xml", unet / "openvino_model.bin"]
    if ov_files[0].is_file():
        return sum(f.stat().st_size for f in ov_files if f.is_file())
    return sum(f.stat().st_size for f in unet.glob("diffusion_pytorch_model*") if f.is_file())


def _is_ov(folder: Path) -> bool:
    return (Path(folder) / "unet" / "openvino_model.xml").is_file()


def _is_diffusers(folder: Path) -> bool:
    unet = Path(folder) / "unet"
    return (Path(folder) / "model_index.json").is_file() and any(unet.glob("diffusion_pytorch_model*"))


def pipeline_geometry(folder: Path) -> dict[str, int]:
    """Native image size, VAE factor and text width, from the folder's configs (diffusers or OpenVINO)."""
    folder = Path(folder)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae_dir = folder / ("vae_decoder" if _is_ov(folder) else "vae")
        vae = json.loads((vae_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{str(folder)!r} lacks a readable unet/vae config.json ({e}); is it an SD pipeline?") from e
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return {
        "size": int(unet.get("sample_size", 64)) * factor,
        "vae_factor": factor,
        "in_channels": int(unet.get("in_channels", 4)),
        "text_dim": int(unet["cross_attention_dim"]),
    }


# --------------------------------------------------------------------------------------------------------------------
# Preparation: the folders each variant loads
# --------------------------------------------------------------------------------------------------------------------


def _cached(path: Path, build, what: str, prep_log: dict) -> Path:
    """Build `path` with `build(tmp_folder)` unless a complete one exists (folders are written atomically)."""
    if path.is_dir() and any(path.iterdir()):
        prep_log[what] = {"reused": str(path)}
        return path
    t0 = time.perf_counter()
    with PhaseMonitor() as mon:
        with atomic_output_dir(path) as tmp:
            build(tmp)
    prep_log[what] = {"build_s": round(time.perf_counter() - t0, 1), "peak_rss_bytes": mon.peak}
    free_memory()
    return path


def export_openvino_fp32(source: str, out: Path) -> None:
    """optimum-intel's FP32 export of a diffusers pipeline (what `ov-sd export` starts from)."""
    from optimum.intel import OVStableDiffusionPipeline

    pipe = OVStableDiffusionPipeline.from_pretrained(source, export=True, compile=False)
    pipe.save_pretrained(out)
    del pipe


def build_qat_folder(
    diffusers_dir: Path,
    ov_fp32_dir: Path,
    out: Path,
    *,
    latent_hw: tuple[int, int],
    batch: int,
    tome: dict[str, Any] | None = None,
    calibration_samples: int = 2,
) -> dict[str, Any]:
    """The OpenVINO folder QAT exports, from random calibration (speed only): the FP32 UNet, ToMe applied first if
    `tome` (`tome.apply_tome` keyword arguments; as training applies it to the student before quantization), `quantization.quantize_unet` with the
    training defaults (preset mixed, overflow fix on), `quantization.convert_unet_to_openvino`, saved over the UNet
    of optimum's FP32 export as `export.py` does (text encoder / VAE stay optimum's)."""
    import openvino as ov
    import torch
    from diffusers import UNet2DConditionModel

    from . import quantization

    unet = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet").eval()
    info: dict[str, Any] = {"calibration": f"{calibration_samples} random inputs (speed only)"}
    if tome:
        from .tome import apply_tome  # ImportError is handled by the caller (variant skipped with a note)

        apply_tome(unet, **tome)
        info["tome"] = tome
    h, w = latent_hw
    gen = torch.Generator().manual_seed(0)
    dim = unet.config.cross_attention_dim
    calib = [
        {
            "sample": torch.randn(batch, unet.config.in_channels, h, w, generator=gen),
            "timestep": torch.randint(0, 1000, (batch,), generator=gen),
            "encoder_hidden_states": torch.randn(batch, 77, dim, generator=gen),
        }
        for _ in range(calibration_samples)
    ]
    student = quantization.quantize_unet(unet, calib, preset="mixed", overflow_fix="enable")
    del unet
    free_memory()
    # traced at the benchmark's latent size: a merge whose token count were fixed at trace time would still be right
    ov_unet = quantization.convert_unet_to_openvino(student, example_inputs=calib[0])
    del student, calib
    free_memory()
    shutil.copytree(ov_fp32_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("openvino_model.*"))
    for sub in Path(ov_fp32_dir).iterdir():  # the non-UNet IRs: hard links when possible (same bytes, no copy)
        if sub.is_dir() and sub.name != "unet":
            for f in sub.glob("openvino_model.*"):
                try:
                    os.link(f, out / sub.name / f.name)
                except OSError:
                    shutil.copy2(f, out / sub.name / f.name)
    ov.save_model(ov_unet, out / "unet" / "openvino_model.xml", compress_to_fp16=False)
    info["fake_quantize_ops"] = quantization.count_fake_quantize(ov_unet)
    del ov_unet
    return info


@dataclass
class Prepared:
    diffusers_dir: Path | None = None
    ov_fp32_dir: Path | None = None
    folders: dict[str, Path] = field(default_factory=dict)  # variant id -> folder to load
    notes: dict[str, str] = field(default_factory=dict)  # variant id -> why it was skipped
    log: dict[str, Any] = field(default_factory=dict)  # what was built / reused, with times


def prepare(
    variant_ids: list[str],
    settings: BenchSettings,
    work_dir: Path,
    *,
    model: str | None = None,
    arch: str | None = None,
    qat: Path | None = None,
    qat_tome: Path | None = None,
    ptq: Path | None = None,
    progress: bool = True,
) -> Prepared:
    """Build or locate the folder of every requested variant; variants that cannot run get a note instead."""
    from tqdm.auto import tqdm

    from . import ptq as ptq_module
    from .models import build_sd15_pipeline, check_pipeline_source

    prep = Prepared()
    need_ov = any(v in variant_ids for v in "cdefg")
    steps = ["source"] + (["openvino-fp32"] if need_ov else []) + [v for v in "efg" if v in variant_ids]
    bar = tqdm(total=len(steps), desc="bench: preparing", disable=not progress)

    # the source pipeline
    if arch == "sd15":
        prep.diffusers_dir = _cached(
            work_dir / "sd15-diffusers", lambda d: build_sd15_pipeline(d, seed=0), "sd15-diffusers", prep.log
        )
    else:
        path = Path(model).expanduser()
        if path.exists() and _is_ov(path):
            prep.ov_fp32_dir = path
            if "nncf" in _unet_rt_info(path):
                raise UserError(f"{model!r} has a quantized UNet; pass the FP32 pipeline (diffusers or OpenVINO)")
        elif path.exists():
            check_pipeline_source(str(path))
            prep.diffusers_dir = path.resolve()
        else:  # a Hub id: diffusers' own download (its cache), so that configs and weights are local folders
            from diffusers import StableDiffusionPipeline

            try:
                prep.diffusers_dir = Path(StableDiffusionPipeline.download(model))
            except Exception as e:  # offline, unknown repo, gated: one line, not a traceback
                raise UserError(f"cannot get pipeline {model!r} from the Hub: {str(e).splitlines()[0]}") from e
    bar.update()

    for vid in ("a", "b"):
        if vid in variant_ids and prep.diffusers_dir is None:
            prep.notes[vid] = "omitted: --model is an OpenVINO folder (no PyTorch weights)"
    if prep.diffusers_dir is not None:
        for vid in ("a", "b"):
            prep.folders[vid] = prep.diffusers_dir

    if need_ov:
        if prep.ov_fp32_dir is None:
            bar.set_description("bench: optimum-intel FP32 export")
            prep.ov_fp32_dir = _cached(
                work_dir / "openvino-fp32",
                lambda d: export_openvino_fp32(str(prep.diffusers_dir), d),
                "openvino-fp32 export",
                prep.log,
            )
        bar.update()
        for vid in ("c", "d"):
            prep.folders[vid] = prep.ov_fp32_dir

    geo = pipeline_geometry(prep.ov_fp32_dir or Path(prep.diffusers_dir))
    height = settings.height or geo["size"]
    width = settings.width or geo["size"]

    if "e" in variant_ids:
        if ptq:
            prep.folders["e"] = ptq
            prep.log["optimum-int8-ptq"] = {"given": str(ptq)}
        else:
            bar.set_description("bench: optimum-intel int8 PTQ")
            prep.folders["e"] = _cached(
                work_dir / f"optimum-int8-ptq-{height}x{width}-n{settings.ptq_samples}-s{settings.ptq_steps}",
                lambda d: ptq_module.quantize_pipeline_int8(
                    prep.ov_fp32_dir,
                    d,
                    ptq_module.synthetic_prompts(settings.seed),
                    num_samples=settings.ptq_samples,
                    height=height,
                    width=width,
                    steps=settings.ptq_steps,
                    seed=settings.seed,
                    overwrite=True,
                    ov_config=_threads_config(settings),
                    progress=progress,
                ),
                "optimum-int8-ptq",
                prep.log,
            )
        bar.update()

    for vid, given, tome in (("f", qat, None), ("g", qat_tome, settings.tome_kwargs())):
        if vid not in variant_ids:
            continue
        if given:
            prep.folders[vid] = given
        elif arch == "sd15":
            if tome is not None and not _tome_available():
                prep.notes[vid] = "omitted: ov_sd_trainer.tome is not importable yet (token merging not available)"
                bar.update()
                continue
            bar.set_description(f"bench: QAT graph ({VARIANTS[vid][0]})")
            lh, lw = height // geo["vae_factor"], width // geo["vae_factor"]
            tag = "-".join(f"{k}{v}" for k, v in tome.items()) if tome else ""
            name = "-".join(filter(None, (VARIANTS[vid][0], tag, f"{height}x{width}-b{settings.batch_size}")))
            built: dict[str, Any] = {}

            def build(d, tome=tome, built=built, lh=lh, lw=lw):
                built.update(
                    build_qat_folder(
                        prep.diffusers_dir,
                        prep.ov_fp32_dir,
                        d,
                        latent_hw=(lh, lw),
                        batch=settings.batch_size,
                        tome=tome,
                    )
                )

            prep.folders[vid] = _cached(work_dir / name, build, VARIANTS[vid][0], prep.log)
            prep.log[VARIANTS[vid][0]].update(built)
        else:
            flag = "--qat" if vid == "f" else "--qat-tome"
            prep.notes[vid] = f"omitted: pass {flag} OV_DIR (an exported QAT folder, train.py's output_dir/openvino)"
        bar.update()
    bar.close()
    return prep


def _tome_available() -> bool:
    try:
        from .tome import apply_tome  # noqa: F401
    except ImportError:
        return False
    return True


def _unet_rt_info(folder: Path) -> dict:
    import openvino as ov

    model = ov.Core().read_model(Path(folder) / "unet" / "openvino_model.xml")
    return dict(model.get_rt_info())


def _check_ov_folder(path: str, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"{flag} {path!r} does not exist; pass an exported OpenVINO pipeline folder")
    if not _is_ov(p):
        raise UserError(f"{flag} {path!r} is not an OpenVINO pipeline folder (no unet/openvino_model.xml)")
    return p.resolve()


def _threads_config(settings: BenchSettings) -> dict[str, Any] | None:
    return {"INFERENCE_NUM_THREADS": settings.threads} if settings.threads else None


# --------------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------------


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

    from .models import load_pipeline

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

    from .generate import _match_vae_decoder_batch

    pipe = OVStableDiffusionPipeline.from_pretrained(str(folder), compile=False, ov_config=ov_config)
    if settings.static_shapes:
        images = settings.batch_size // 2
        pipe.reshape(batch_size=images, height=height, width=width, num_images_per_prompt=1)
        _match_vae_decoder_batch(pipe, images, height, width)
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


def _ov_config_for(vid: str, settings: BenchSettings) -> dict[str, Any]:
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}  # optimum-intel's default for its models
    if vid == "c":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    if settings.threads:
        config["INFERENCE_NUM_THREADS"] = settings.threads
    config.update(settings.ov_config)
    if vid == "c":  # the FP32 row stays FP32 whatever --ov-config says
        config["INFERENCE_PRECISION_HINT"] = "f32"
    if settings.profile:
        config["PERF_COUNT"] = "YES"
    return config


def measure_variant(vid: str, folder: Path, settings: BenchSettings, inputs: dict, height, width, progress):
    with PhaseMonitor() as mon:
        if vid in ("a", "b"):
            raw = measure_pytorch(folder, settings, inputs, height, width, bf16=vid == "b", progress=progress)
        else:
            raw = measure_openvino(folder, settings, _ov_config_for(vid, settings), inputs, height, width, progress)
        free_memory()
    name, label = VARIANTS[vid]
    row = {
        "id": vid,
        "name": name,
        "label": label,
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


def add_ratios(rows: list[dict]) -> None:
    """Speed-ups vs (a) and vs (e), and UNet size vs the FP32 UNet (a's weights, else c's IR)."""
    by_id = {r["id"]: r for r in rows}
    fp32_size = (by_id.get("a") or by_id.get("c") or {}).get("unet_bytes")
    for r in rows:
        for ref, key in (("a", "speedup_vs_pytorch_fp32"), ("e", "speedup_vs_optimum_int8")):
            base = by_id.get(ref)
            r[key] = base["unet_step_s"] / r["unet_step_s"] if base else None
            pkey = "pipeline_" + key
            ok = base and base.get("pipeline_s") and r.get("pipeline_s")
            r[pkey] = base["pipeline_s"] / r["pipeline_s"] if ok else None
        r["unet_size_vs_fp32"] = r["unet_bytes"] / fp32_size if fp32_size else None


def check_targets(rows: list[dict]) -> list[dict]:
    by_id = {r["id"]: r for r in rows}
    f, g = by_id.get("f"), by_id.get("g")
    checks = []

    def add(key, value, ok):
        checks.append({"target": key, "goal": TARGETS[key], "measured": round(value, 3), "met": bool(ok)})

    if f and f["speedup_vs_pytorch_fp32"] is not None:
        add("qat_int8_vs_pytorch_fp32", f["speedup_vs_pytorch_fp32"], f["speedup_vs_pytorch_fp32"] >= 3.9)
    if f and f["unet_size_vs_fp32"] is not None:
        add("qat_int8_unet_size_vs_fp32", f["unet_size_vs_fp32"], f["unet_size_vs_fp32"] <= 0.26)
    if g and g["speedup_vs_pytorch_fp32"] is not None:
        add("qat_tome_vs_pytorch_fp32", g["speedup_vs_pytorch_fp32"], g["speedup_vs_pytorch_fp32"] >= 5.1)
    if g and g["speedup_vs_optimum_int8"] is not None:
        add("qat_tome_vs_optimum_int8", g["speedup_vs_optimum_int8"], g["speedup_vs_optimum_int8"] >= 1.3)
    return checks


# --------------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import psutil

    flags: list[str] = []
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")
    info = {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "isa": [f for f in wanted if f in flags],
        "ram_gib": round(psutil.virtual_memory().total / GiB, 1),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }
    with contextlib.suppress(Exception):
        import openvino as ov

        info["openvino_cpu_capabilities"] = list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return info


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / MiB:,.1f}"


def _ratio(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def markdown_report(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# ov-sd bench: {result['source']}",
        "",
        f"{s['height']}x{s['width']} px, UNet batch {s['batch_size']} (CFG), UNet step = median of {s['repeats']} "
        f"after {s['warmup']} warm-up; pipeline = median of {s['pipeline_repeats']} runs of {s['steps_pipeline']} "
        f"steps (text encoder + UNet + VAE decode); threads: {s['threads'] or 'library default'}; "
        f"{'static' if s['static_shapes'] else 'dynamic'} OpenVINO shapes.",
        "",
        "| variant | UNet s/step | vs PyTorch FP32 | vs optimum int8 | pipeline s | pipeline vs FP32 | UNet MB "
        "| UNet vs FP32 | total MB | load+compile s | peak RSS GiB | other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["variants"]:
        lines.append(
            f"| ({r['id']}) {r['label']} | {r['unet_step_s']:.3f} | {_x(r['speedup_vs_pytorch_fp32'])} "
            f"| {_x(r['speedup_vs_optimum_int8'])} | {r['pipeline_s']:.2f} | {_x(r['pipeline_speedup_vs_pytorch_fp32'])} "
            f"| {_mb(r['unet_bytes'])} | {_ratio(r['unet_size_vs_fp32'])} "
            f"| {_mb(r['total_bytes'])} | {r['load_compile_s']:.1f} | {r['peak_rss_bytes'] / GiB:.2f} "
            f"| {r['other_load_cores']:.2f} |"
        )
    for vid, note in result["skipped"].items():
        lines.append(f"| ({vid}) {VARIANTS[vid][1]} | {note} |||||||||||")
    if result.get("notes"):
        lines += [""] + [f"- {n}" for n in result["notes"]]
    if result["targets"]:
        lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
        for t in result["targets"]:
            op = "<=" if "size" in t["target"] else ">="
            lines.append(f"| {t['target']} | {op} {t['goal']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
    profiled = [r for r in result["variants"] if "profile" in r]
    if profiled:
        lines += ["", "## Where the time goes (OpenVINO PERF_COUNT, one UNet inference)", ""]
        for r in profiled:
            p = r["profile"]
            prec = ", ".join(f"{k} {v / 1000:.2f} s" for k, v in p["by_precision_ms"].items())
            lines += [
                f"**({r['id']}) {r['label']}**: {p['total_ms'] / 1000:.2f} s summed over nodes; by execution "
                f"precision: {prec}; merge ops (TopK/Gather/Scatter): {p['merge_ops_ms'] / 1000:.3f} s; "
                f"conv/matmul nodes left in floating point: {p['fp_compute_ops'] or 'none'}",
                "",
                "| op type | s | share | nodes | by precision (s) |",
                "|---|---|---|---|---|",
            ]
            for t in p["by_type"][:12]:
                precs = ", ".join(
                    f"{k} {v / 1000:.3f}" for k, v in t.items() if k not in ("node_type", "ms", "count") and v
                )
                share = t["ms"] / p["total_ms"] if p["total_ms"] else 0
                lines.append(f"| {t['node_type']} | {t['ms'] / 1000:.3f} | {share:.1%} | {t['count']} | {precs} |")
            lines.append("")
    m = result["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, ISA {', '.join(m['isa']) or 'n/a'}, "
        f"OpenVINO CPU capabilities {m.get('openvino_cpu_capabilities')}, {m['ram_gib']} GiB RAM; load average "
        f"{m['loadavg_start']} at start, {m.get('loadavg_end')} at end. Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["variants"]
    labels = [f"({r['id']}) {r['name']}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.6 * len(rows) + 2.0))
    panels = (
        ("unet_step_s", "UNet step (s)", "speedup_vs_pytorch_fp32"),
        ("pipeline_s", f"pipeline, {result['settings']['steps_pipeline']} steps (s)", None),
        ("unet_bytes", "UNet on disk (MB)", "unet_size_vs_fp32"),
    )
    for ax, (key, title, ratio) in zip(axes, panels, strict=True):
        values = [(r[key] or 0) / (MiB if key == "unet_bytes" else 1) for r in rows]
        bars = ax.barh(labels, values, color=["#888" if r["id"] in "ab" else "#2a7" for r in rows])
        ax.invert_yaxis()
        ax.set_title(title)
        for bar, r in zip(bars, rows, strict=True):
            text = f" {r[ratio]:.2f}x" if ratio and r.get(ratio) is not None else ""
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=8)
        if ax is not axes[0]:
            ax.set_yticklabels([])
    s = result["settings"]
    fig.suptitle(f"{result['source']}: {s['height']}x{s['width']}, UNet batch {s['batch_size']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "diffusers", "openvino", "optimum-intel", "nncf"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------


def _check_settings(settings: BenchSettings) -> None:
    for name in ("batch_size", "steps_pipeline", "repeats", "pipeline_repeats"):
        value = getattr(settings, name)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if settings.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {settings.warmup}")
    if settings.batch_size % 2:
        raise UserError(f"--batch-size {settings.batch_size}: must be even (the UNet batch with CFG is 2 x images)")
    if settings.threads is not None and settings.threads < 1:
        raise UserError(f"--threads must be >= 1, got {settings.threads}")
    for name in ("height", "width"):
        value = getattr(settings, name)
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"--{name} {value}: must be a positive multiple of 8")
    if not 0 < settings.tome_ratio <= 0.75:
        raise UserError(f"--tome-ratio {settings.tome_ratio}: must be in (0, 0.75]")
    if settings.tome_mode not in ("tome", "todo"):
        raise UserError(f"--tome-mode {settings.tome_mode!r}: use tome or todo")


def run_bench(
    output: str | Path,
    settings: BenchSettings,
    *,
    model: str | None = None,
    arch: str | None = None,
    variants: list[str] | None = None,
    qat: str | None = None,
    qat_tome: str | None = None,
    ptq: str | None = None,
    work_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Run the benchmark and write bench.json, bench.md, bench.png (and profile.json with `settings.profile`) to
    `output` atomically. Returns the result dict (what bench.json holds)."""
    import torch
    from tqdm.auto import tqdm

    if (model is None) == (arch is None):
        raise UserError("pass exactly one of --model DIR_or_hub_id and --arch sd15")
    if arch is not None and arch not in ARCHS:
        raise UserError(f"--arch {arch!r} is unknown; choose one of {', '.join(ARCHS)}")
    _check_settings(settings)
    explicit = variants is not None
    variant_ids = variants or list(VARIANTS)
    check_output_dir(output, overwrite)
    if model is not None:
        path = Path(model).expanduser()
        if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
            raise UserError(f"model path {model!r} does not exist; pass a pipeline folder or a Hub id")
    given = {"--qat": qat, "--qat-tome": qat_tome, "--ptq": ptq}
    qat, qat_tome, ptq = (_check_ov_folder(v, flag) if v else None for flag, v in given.items())
    if settings.threads:
        torch.set_num_threads(settings.threads)

    machine = machine_info()
    keep = work_dir is not None
    work = Path(work_dir).expanduser() if keep else Path(tempfile.mkdtemp(prefix="ov-sd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        prep = prepare(
            variant_ids,
            settings,
            work,
            model=model,
            arch=arch,
            qat=qat,
            qat_tome=qat_tome,
            ptq=ptq,
            progress=progress,
        )
        for vid, why in default_skips(variant_ids, explicit, machine).items():
            prep.notes.setdefault(vid, why)
        geo = pipeline_geometry(prep.ov_fp32_dir or Path(prep.diffusers_dir))
        height, width = settings.height or geo["size"], settings.width or geo["size"]
        for name, value in (("height", height), ("width", width)):
            if value % geo["vae_factor"]:
                raise UserError(f"--{name} {value} is not divisible by the VAE factor {geo['vae_factor']}")
        inputs = unet_inputs(settings, geo, height, width)
        rows = []
        todo = [v for v in variant_ids if v in prep.folders and v not in prep.notes]
        bar = tqdm(todo, desc="bench", disable=not progress)
        for vid in bar:
            bar.set_description(f"bench: ({vid}) {VARIANTS[vid][0]}")
            rows.append(measure_variant(vid, prep.folders[vid], settings, inputs, height, width, progress))
            free_memory()
        bar.close()
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    add_ratios(rows)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    resolved = asdict(settings) | {"height": height, "width": width}
    notes = []
    if arch == "sd15" and any(r["id"] in "fg" for r in rows):
        notes.append(
            "(f)/(g) under --arch sd15 are the QAT graph (NNCF int8, ToMe for g) with untrained random weights: "
            "speed and size only, quality meaningless."
        )
    if settings.profile:
        notes.append("timed with PERF_COUNT on (OpenVINO variants): per-node counters add a little overhead.")
    result = {
        "source": f"--arch {arch}" if arch else str(model),
        "settings": resolved,
        "variants": rows,
        "skipped": {vid: prep.notes[vid] for vid in variant_ids if vid in prep.notes},
        "targets": check_targets(rows),
        "notes": notes,
        "preparation": prep.log,
        "machine": machine,
        "versions": _versions(),
        "command": command or " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "rss_method": "psutil RSS sampled every 20 ms per variant phase (load, UNet timing, pipeline runs)",
    }
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        (tmp / "bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (tmp / "bench.md").write_text(markdown_report(result))
        plot(result, tmp / "bench.png")
    return result


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="diffusers folder, Hub id or optimum-intel OpenVINO folder (FP32 UNet)")
    src.add_argument("--arch", choices=ARCHS, help="sd15: SD 1.5 architecture with random weights (speed only)")
    p.add_argument("--output", required=True, help="folder for bench.json, bench.md, bench.png (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument(
        "--variants",
        default=None,
        help="comma list of a-g or names (default: all that apply; b only on CPUs with bf16 instructions)",
    )
    p.add_argument("--qat", default=None, help="exported QAT OpenVINO folder for (f)")
    p.add_argument("--qat-tome", default=None, help="exported QAT+ToMe OpenVINO folder for (g)")
    p.add_argument("--ptq", default=None, help="an optimum int8 PTQ folder for (e) (default: built here)")
    p.add_argument("--work-dir", default=None, help="keep built folders here and reuse them (default: temporary)")
    p.add_argument("--height", type=int, default=None, help="default: the model's size (512 for sd15)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=2, help="UNet batch (CFG: 2 x images per prompt batch)")
    p.add_argument("--steps-pipeline", type=int, default=None, help="K steps per pipeline run (sd15: 2, else 3)")
    p.add_argument("--repeats", type=int, default=None, help="N timed UNet calls, median (sd15: 3, else 5)")
    p.add_argument("--pipeline-repeats", type=int, default=None, help="timed pipeline runs (sd15: 1, else 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads and OpenVINO INFERENCE_NUM_THREADS")
    p.add_argument("--dynamic-shapes", action="store_true", help="do not reshape OpenVINO pipelines to static")
    p.add_argument("--ov-config", action="append", default=None, metavar="KEY=VALUE", help="OpenVINO property")
    p.add_argument("--profile", action="store_true", help="PERF_COUNT: time per op type / precision (OV variants)")
    p.add_argument("--ptq-samples", type=int, default=4, help="calibration UNet calls when (e) is built here")
    p.add_argument("--ptq-steps", type=int, default=4)
    p.add_argument("--tome-ratio", type=float, default=0.4, help="(g) under --arch sd15: merged token share")
    p.add_argument("--tome-max-downsample", type=int, default=1, help="(g): merge at levels up to this downsampling")
    p.add_argument("--tome-mode", choices=("tome", "todo"), default="tome", help="(g): token merging or ToDo")
    p.add_argument("--tome-merge-mlp", action="store_true", help="(g): the MLP sees merged tokens too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a red circle on a blue background")


def _default(value, default):
    return default if value is None else value  # not `or`: an explicit 0 must reach the range check


def settings_from_args(args) -> BenchSettings:
    sd15 = args.arch == "sd15"
    return BenchSettings(
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        steps_pipeline=_default(args.steps_pipeline, 2 if sd15 else 3),
        repeats=_default(args.repeats, 3 if sd15 else 5),
        pipeline_repeats=_default(args.pipeline_repeats, 1 if sd15 else 2),
        warmup=args.warmup,
        threads=args.threads,
        static_shapes=not args.dynamic_shapes,
        ov_config=parse_ov_config(args.ov_config),
        profile=args.profile,
        seed=args.seed,
        prompt=args.prompt,
        ptq_samples=args.ptq_samples,
        ptq_steps=args.ptq_steps,
        tome_ratio=args.tome_ratio,
        tome_max_downsample=args.tome_max_downsample,
        tome_mode=args.tome_mode,
        tome_merge_mlp=args.tome_merge_mlp,
    )


def main(args, argv: list[str] | None = None) -> dict:
    """`ov-sd bench` with parsed arguments (see `add_arguments`); prints the markdown table. `argv`: the command
    line, recorded in the results."""
    result = run_bench(
        args.output,
        settings_from_args(args),
        model=args.model,
        arch=args.arch,
        variants=parse_variants(args.variants) if args.variants is not None else None,
        qat=args.qat,
        qat_tome=args.qat_tome,
        ptq=args.ptq,
        work_dir=args.work_dir,
        overwrite=args.overwrite,
        command="ov-sd " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    print(markdown_report(result))
    return result
