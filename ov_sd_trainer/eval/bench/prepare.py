"""The folders the bench's variants load, built once per run (or reused from `--work-dir`, or given by a flag)."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...outputs import atomic_output_dir
from ...pipeline_folder import (
    UNET_XML,
    check_pipeline_source,
    geometry,
    is_openvino_folder,
    unet_rt_info,
    write_genai_files,
)
from .monitor import PhaseMonitor, free_memory
from .settings import BenchSettings
from .variants import BY_NAME, VARIANTS

PTQ_MODES = {"ptq-full": "full", "ptq-hybrid": "hybrid"}  # source -> `ptq.quantize_pipeline_int8(mode=...)`


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
    write_genai_files(out)  # as every OpenVINO folder the project writes (the qat-* folders start from this one)


def build_qat_folder(
    diffusers_dir: Path,
    ov_fp32_dir: Path,
    out: Path,
    *,
    latent_hw: tuple[int, int],
    batch: int,
    tome: dict[str, Any] | None = None,
    calibration_samples: int = 2,
    scheme: str = "full",
) -> dict[str, Any]:
    """The OpenVINO folder QAT exports, from random calibration (speed only): the FP32 UNet, ToMe applied first if
    `tome` (`tome.apply_tome` keyword arguments; as training applies it to the student before quantization),
    `quantize_unet` with the training defaults, `convert_unet_to_openvino`, saved over the UNet of optimum's FP32
    export as `export/openvino.py` does (text encoder / VAE stay optimum's)."""
    import openvino as ov
    import torch
    from diffusers import UNet2DConditionModel

    from ...compress.convert import convert_unet_to_openvino, count_fake_quantize
    from ...compress.quantize import quantize_unet

    unet = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet").eval()
    info: dict[str, Any] = {"calibration": f"{calibration_samples} random inputs (speed only)"}
    if tome:
        from ...compress.tome import apply_tome

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
    student = quantize_unet(unet, calib, scheme=scheme)
    info["scheme"] = scheme
    del unet
    free_memory()
    # traced at the benchmark's latent size: a merge whose token count were fixed at trace time would still be right
    ov_unet = convert_unet_to_openvino(student, example_inputs=calib[0])
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
    ov.save_model(ov_unet, out / UNET_XML, compress_to_fp16=False)
    info["fake_quantize_ops"] = count_fake_quantize(ov_unet)
    del ov_unet
    return info


@dataclass
class Prepared:
    diffusers_dir: Path | None = None
    ov_fp32_dir: Path | None = None
    folders: dict[str, Path] = field(default_factory=dict)  # source -> folder (see variants.Variant.source)
    notes: dict[str, str] = field(default_factory=dict)  # source -> why its variants cannot run
    log: dict[str, Any] = field(default_factory=dict)  # what was built / reused, with times


def _threads_config(settings: BenchSettings) -> dict[str, Any] | None:
    return {"INFERENCE_NUM_THREADS": settings.threads} if settings.threads else None


def prepare(
    variants: list[str],
    settings: BenchSettings,
    work_dir: Path,
    *,
    model: str | None = None,
    arch: str | None = None,
    given: dict[str, Path] | None = None,
    progress: bool = True,
) -> Prepared:
    """Build or locate the folder of every source the named variants need; a source that cannot be had gets a note.

    `given`: source -> an existing folder passed on the command line (`--qat`, `--ptq`, ...)."""
    from tqdm.auto import tqdm

    from ...assets.builders import build_sd15_pipeline
    from .. import ptq as ptq_module
    from ..prompts import calibration_prompts

    given = given or {}
    prep = Prepared()
    sources = {BY_NAME[v].source for v in variants}
    need_ov = any(s != "diffusers" for s in sources)
    built = [s for s in ("ptq-hybrid", "ptq-full", "qat", "qat-hybrid", "qat-tome") if s in sources]
    bar = tqdm(total=1 + need_ov + len(built), desc="bench: preparing", disable=not progress)

    # the source pipeline
    if arch == "sd15":
        prep.diffusers_dir = _cached(
            work_dir / "sd15-diffusers", lambda d: build_sd15_pipeline(d, seed=0), "sd15-diffusers", prep.log
        )
    else:
        path = Path(model).expanduser()
        if path.exists() and is_openvino_folder(path):
            prep.ov_fp32_dir = path
            if "nncf" in unet_rt_info(path):
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
    if prep.diffusers_dir is not None:
        prep.folders["diffusers"] = prep.diffusers_dir
    else:
        prep.notes["diffusers"] = "omitted: --model is an OpenVINO folder (no PyTorch weights)"

    if need_ov:
        if prep.ov_fp32_dir is None:
            bar.set_description("bench: optimum-intel FP32 export")
            prep.ov_fp32_dir = _cached(
                work_dir / "openvino-fp32",
                lambda d: export_openvino_fp32(str(prep.diffusers_dir), d),
                "openvino-fp32 export",
                prep.log,
            )
        prep.folders["openvino-fp32"] = prep.ov_fp32_dir
        bar.update()

    geo = geometry(prep.ov_fp32_dir or Path(prep.diffusers_dir))
    height = settings.height or geo["size"]
    width = settings.width or geo["size"]

    for source in built:
        if source in given:
            prep.folders[source] = given[source]
            prep.log[source] = {"given": str(given[source])}
        elif source in PTQ_MODES:
            mode = PTQ_MODES[source]
            bar.set_description(f"bench: optimum-intel {mode} PTQ")
            prep.folders[source] = _cached(
                work_dir / f"optimum-{mode}-ptq-{height}x{width}-n{settings.ptq_samples}-s{settings.ptq_steps}",
                lambda d, mode=mode: ptq_module.quantize_pipeline_int8(
                    prep.ov_fp32_dir,
                    d,
                    calibration_prompts(settings.seed),
                    num_samples=settings.ptq_samples,
                    height=height,
                    width=width,
                    steps=settings.ptq_steps,
                    seed=settings.seed,
                    mode=mode,
                    overwrite=True,
                    ov_config=_threads_config(settings),
                    progress=progress,
                ),
                source,
                prep.log,
            )
        elif arch == "sd15":
            tome = settings.tome_kwargs() if source == "qat-tome" else None
            scheme = "hybrid" if source == "qat-hybrid" else "full"
            bar.set_description(f"bench: QAT graph ({source})")
            lh, lw = height // geo["vae_factor"], width // geo["vae_factor"]
            tag = "-".join(f"{k}{v}" for k, v in tome.items()) if tome else ""
            name = "-".join(filter(None, (source, tag, f"{height}x{width}-b{settings.batch_size}")))
            info: dict[str, Any] = {}

            def build(d, tome=tome, scheme=scheme, info=info, lh=lh, lw=lw):
                info.update(
                    build_qat_folder(
                        prep.diffusers_dir,
                        prep.ov_fp32_dir,
                        d,
                        latent_hw=(lh, lw),
                        batch=settings.batch_size,
                        tome=tome,
                        scheme=scheme,
                    )  # fmt: skip
                )

            prep.folders[source] = _cached(work_dir / name, build, source, prep.log)
            prep.log[source].update(info)
        else:
            flag = next(v.flag for v in VARIANTS if v.source == source)
            prep.notes[source] = f"omitted: pass {flag} OV_DIR (an exported QAT folder, a run's output_dir/openvino)"
        bar.update()
    bar.close()
    return prep
