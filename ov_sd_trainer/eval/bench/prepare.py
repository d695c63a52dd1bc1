"""The folders the bench's variants load, built once per run (or reused from `--work-dir`, or given by a flag)."""

from __future__ import annotations

import hashlib
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
    hub_load_errors,
    is_openvino_folder,
    unet_rt_info,
    write_genai_files,
)
from .monitor import PhaseMonitor, free_memory
from .settings import BenchSettings, image_size
from .variants import BY_NAME, VARIANTS, W8TV

PTQ_MODES = {"ptq-full": "full", "ptq-hybrid": "hybrid"}  # source -> `ptq.quantize_pipeline_int8(mode=...)`
QAT_SOURCES = ("qat", "qat-hybrid", "qat-tome", "qat-deepcache")  # built under --arch (the QAT graph)
# the models of a pipeline folder that a `+w8tv` twin compresses: every one but the UNet, as optimum-intel does
TEXT_VAE_MODELS = ("text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder")
# --arch sdxl: step caching (`compress.deepcache`) covers SD 1.x/2.x UNets only, not SDXL's added conditioning
SDXL_NO_DEEPCACHE = (
    "skipped under --arch sdxl: step caching (compress/deepcache.py, export/deepcache.py) supports SD 1.x/2.x UNets "
    "only; SDXL's UNet takes added conditioning (text_embeds, time_ids: addition_embed_type='text_time') that its "
    "shallow / deep split does not carry"
)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def cached(path: Path, build, what: str, prep_log: dict) -> Path:
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
    """optimum-intel's FP32 export of a diffusers pipeline (what `ov-sd export` starts from), of the class its
    model_index.json names (`OVDiffusionPipeline` picks it: SD, SDXL, ...). `load_in_8bit=False`: optimum otherwise
    compresses the weights of any model over 1 B parameters to int8 (SDXL's UNet has 2.6 B), which would leave no FP32
    UNet to compare with or to quantize."""
    from optimum.intel import OVDiffusionPipeline

    pipe = OVDiffusionPipeline.from_pretrained(source, export=True, compile=False, load_in_8bit=False)
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
    deepcache: bool = False,
) -> dict[str, Any]:
    """The OpenVINO folder QAT exports, from random calibration (speed only): the FP32 UNet, ToMe applied first if
    `tome` (`tome.apply_tome` keyword arguments; as training applies it to the student before quantization),
    `quantize_unet` with the training defaults, `convert_unet_to_openvino`, saved over the UNet of optimum's FP32
    export as `export/openvino.py` does (text encoder / VAE stay optimum's). `deepcache`: also the step-caching IRs
    (`unet_deepcache/`) from the same student, as `ov-sd deepcache --run` writes them."""
    import openvino as ov
    import torch
    from diffusers import UNet2DConditionModel

    from ... import families
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
    extra_dims = families.extra_input_dims(unet.config)  # SDXL: text_embeds [B,1280], time_ids [B,6]
    factor = geometry(ov_fp32_dir)["vae_factor"]
    time_ids = families.sdxl_time_ids((h * factor, w * factor), (0, 0), (h * factor, w * factor), batch=batch)
    calib = [
        {
            "sample": torch.randn(batch, unet.config.in_channels, h, w, generator=gen),
            "timestep": torch.randint(0, 1000, (batch,), generator=gen),
            "encoder_hidden_states": torch.randn(batch, 77, dim, generator=gen),
            **{
                name: time_ids if name == families.TIME_IDS else torch.randn(batch, d, generator=gen)
                for name, d in extra_dims.items()
            },
        }
        for _ in range(calibration_samples)
    ]
    student = quantize_unet(unet, calib, scheme=scheme)
    info["scheme"] = scheme
    del unet
    free_memory()
    # traced at the benchmark's latent size: a merge whose token count were fixed at trace time would still be right
    ov_unet = convert_unet_to_openvino(student, example_inputs=calib[0])
    del calib
    free_memory()
    shutil.copytree(ov_fp32_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("openvino_model.*"))
    for sub in Path(ov_fp32_dir).iterdir():  # the non-UNet IRs: hard links when possible (same bytes, no copy)
        if sub.is_dir() and sub.name != "unet":
            for f in sub.glob("openvino_model.*"):
                _link_or_copy(f, out / sub.name / f.name)
    ov.save_model(ov_unet, out / UNET_XML, compress_to_fp16=False)
    info["fake_quantize_ops"] = count_fake_quantize(ov_unet)
    del ov_unet
    free_memory()
    if deepcache:  # full / shallow IRs of the same student, checked against the plain UNet IR just saved
        from ...export.deepcache import read_info, write_deepcache_irs

        write_deepcache_irs(out, student, source={"kind": "qat graph (bench, random calibration)", "scheme": scheme})
        info["deepcache"] = {k: read_info(out).get(k) for k in ("full_vs_unet_relative_l2", "irs")}
    del student
    return info


def int8_text_vae_folder(base: Path, out: Path) -> dict[str, Any]:
    """`base` with its text encoder and VAE weights compressed to int8 (a `+w8tv` twin): the weight-only 8-bit
    compression optimum-intel's pipeline quantization applies to every model but the UNet
    (`OVWeightQuantizationConfig(bits=8)`, optimum's own `_weight_only_quantization`: NNCF `compress_weights`,
    asymmetric int8, per channel). Every other file is a hard link to `base` (same bytes); a model that is
    already compressed is kept as it is."""
    import openvino as ov
    from optimum.intel import OVWeightQuantizationConfig
    from optimum.intel.openvino.quantization import _weight_only_quantization

    replaced = {Path(m) / name for m in TEXT_VAE_MODELS for name in ("openvino_model.xml", "openvino_model.bin")}
    for f in sorted(base.rglob("*")):
        rel = f.relative_to(base)
        if f.is_dir():
            (out / rel).mkdir(parents=True, exist_ok=True)
        elif rel not in replaced:
            _link_or_copy(f, out / rel)
    info: dict[str, Any] = {"base": str(base), "method": "optimum-intel _weight_only_quantization, "
                            "OVWeightQuantizationConfig(bits=8)"}  # fmt: skip
    core = ov.Core()
    for name in TEXT_VAE_MODELS:
        xml = base / name / "openvino_model.xml"
        if not xml.is_file():
            continue
        before = xml.with_suffix(".bin").stat().st_size
        model = core.read_model(xml)
        if "nncf" in model.get_rt_info():  # compressed or quantized already: as it is
            for f in (xml, xml.with_suffix(".bin")):
                _link_or_copy(f, out / name / f.name)
            info[name] = {"kept": "already compressed", "bin_bytes": before}
            continue
        model = _weight_only_quantization(model, OVWeightQuantizationConfig(bits=8))
        ov.save_model(model, out / name / "openvino_model.xml", compress_to_fp16=False)
        info[name] = {"bin_bytes_before": before, "bin_bytes": (out / name / "openvino_model.bin").stat().st_size}
        del model
    return info


def _twin_path(work_dir: Path, source: str, base: Path) -> Path:
    """Where the `+w8tv` twin of `base` is built: beside a folder built here, else named after the given folder
    (its path and the sizes and times of the files it compresses, so a changed folder is not reused)."""
    base = base.resolve()
    if base.parent == work_dir.resolve():
        return work_dir / (base.name + "-w8tv")
    stamp = [str(base)]
    for name in TEXT_VAE_MODELS:
        for f in sorted((base / name).glob("openvino_model.*")):
            st = f.stat()
            stamp.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha1("|".join(stamp).encode()).hexdigest()[:10]
    return work_dir / f"given-{source}-w8tv-{digest}"


@dataclass
class Prepared:
    diffusers_dir: Path | None = None
    ov_fp32_dir: Path | None = None
    folders: dict[str, Path] = field(default_factory=dict)  # folder key -> folder (variants.Variant.folder_key)
    notes: dict[str, str] = field(default_factory=dict)  # folder key -> why its variants cannot run
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

    `given`: source -> an existing folder passed on the command line (`--qat`, `--ptq`, ...). A `+w8tv` twin's
    folder is derived from its base's (`int8_text_vae_folder`)."""
    from tqdm.auto import tqdm

    from ...assets import builders
    from .. import ptq as ptq_module
    from ..prompts import calibration_prompts

    given = given or {}
    prep = Prepared()
    sources = {BY_NAME[v].source for v in variants}
    if arch == "sdxl" and "qat-deepcache" in sources:  # noted here: nothing is built for it (nor the FP32 export)
        sources.discard("qat-deepcache")
        prep.notes["qat-deepcache"] = SDXL_NO_DEEPCACHE
    twins = [BY_NAME[v].source for v in variants if BY_NAME[v].int8_text_vae]
    need_ov = any(s != "diffusers" for s in sources)
    built = [s for s in (*PTQ_MODES, *QAT_SOURCES) if s in sources]
    bar = tqdm(total=1 + need_ov + len(built) + len(twins), desc="bench: preparing", disable=not progress)

    # the source pipeline
    if arch is not None:  # the random-weight architecture, looked up when called (tests swap in a tiny one)
        build = {"sd15": "build_sd15_pipeline", "sdxl": "build_sdxl_pipeline"}[arch]
        prep.diffusers_dir = cached(
            work_dir / f"{arch}-diffusers",
            lambda d: getattr(builders, build)(d, seed=0),
            f"{arch}-diffusers",
            prep.log,
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

            with hub_load_errors(model):  # no such repo, gated, no network: one line, not a traceback
                prep.diffusers_dir = Path(StableDiffusionPipeline.download(model))
    bar.update()
    if prep.diffusers_dir is not None:
        prep.folders["diffusers"] = prep.diffusers_dir
    else:
        prep.notes["diffusers"] = "omitted: --model is an OpenVINO folder (no PyTorch weights)"

    if need_ov:
        if prep.ov_fp32_dir is None:
            bar.set_description("bench: optimum-intel FP32 export")
            prep.ov_fp32_dir = cached(
                work_dir / "openvino-fp32",
                lambda d: export_openvino_fp32(str(prep.diffusers_dir), d),
                "openvino-fp32 export",
                prep.log,
            )
        prep.folders["openvino-fp32"] = prep.ov_fp32_dir
        bar.update()

    geo = geometry(prep.ov_fp32_dir or Path(prep.diffusers_dir))
    height, width = image_size(settings, arch, geo["size"])

    from ...export.deepcache import has_deepcache

    if "qat-deepcache" in sources and "qat-deepcache" not in given and "qat" in given:
        if has_deepcache(given["qat"]):  # the QAT export given by --qat holds step-caching IRs: measure those
            given = {**given, "qat-deepcache": given["qat"]}
    # --arch with both qat and qat-deepcache to build: one QAT graph, its folder holding the step-caching IRs too (the
    # plain UNet IR of a qat-deepcache folder is the qat one: same weights, same random calibration), as for --qat
    share_deepcache = (
        arch is not None and {"qat", "qat-deepcache"} <= set(built) and not {"qat", "qat-deepcache"} & set(given)
    )
    for source in built:
        if source == "qat-deepcache" and share_deepcache and has_deepcache(prep.folders["qat"]):
            prep.folders[source] = prep.folders["qat"]
            prep.log[source] = {"shared with": "qat", **{k: v for k, v in prep.log["qat"].items() if k != "build_s"}}
        elif source in given:
            prep.folders[source] = given[source]
            prep.log[source] = {"given": str(given[source])}
        elif source in PTQ_MODES:
            mode = PTQ_MODES[source]
            bar.set_description(f"bench: optimum-intel {mode} PTQ")
            prep.folders[source] = cached(
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
        elif arch is not None:
            tome = settings.tome_kwargs() if source == "qat-tome" else None
            scheme = "hybrid" if source == "qat-hybrid" else "full"
            shared = source == "qat" and share_deepcache  # also holds qat-deepcache's IRs
            deepcache = source == "qat-deepcache" or shared
            bar.set_description(f"bench: QAT graph ({source})")
            lh, lw = height // geo["vae_factor"], width // geo["vae_factor"]
            tag = "-".join(f"{k}{v}" for k, v in tome.items()) if tome else "deepcache" if shared else ""
            name = "-".join(filter(None, (source, tag, f"{height}x{width}-b{settings.batch_size}")))
            info: dict[str, Any] = {}

            def build(d, tome=tome, scheme=scheme, deepcache=deepcache, info=info, lh=lh, lw=lw):
                info.update(
                    build_qat_folder(
                        prep.diffusers_dir,
                        prep.ov_fp32_dir,
                        d,
                        latent_hw=(lh, lw),
                        batch=settings.batch_size,
                        tome=tome,
                        scheme=scheme,
                        deepcache=deepcache,
                    )  # fmt: skip
                )

            prep.folders[source] = cached(work_dir / name, build, source, prep.log)
            prep.log[source].update(info)
        else:
            flag = next(v.flag for v in VARIANTS if v.source == source and v.flag)
            what = "an exported QAT folder, a run's output_dir/openvino"
            if source == "qat-deepcache":
                what += ", with step-caching IRs from `ov-sd deepcache --run RUN_DIR`"
            prep.notes[source] = f"omitted: pass {flag} OV_DIR ({what})"
        bar.update()

    for source in twins:
        key = source + W8TV
        if source in prep.notes:
            prep.notes[key] = prep.notes[source]
        else:
            base = prep.folders[source]
            bar.set_description(f"bench: int8 text encoder + VAE ({source})")
            info = {}

            def build_twin(d, base=base, info=info):
                info.update(int8_text_vae_folder(base, d))

            prep.folders[key] = cached(_twin_path(work_dir, source, base), build_twin, key, prep.log)
            prep.log[key].update(info)
        bar.update()
    bar.close()
    return prep
