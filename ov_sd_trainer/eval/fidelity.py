"""Fidelity of optimized OpenVINO pipelines to their FP32 teacher: `ov-sd eval`.

    ov-sd eval --reference ov_sd_trainer/assets/reference \
        --model qat=outputs/reference-int8/openvino --model ptq=outputs/reference-ptq --output docs/eval

The teacher (`--reference`, a diffusers folder run in PyTorch FP32) and every variant (`--model`, an
OpenVINO pipeline folder run by optimum-intel's `OVStableDiffusionPipeline`) generate the fixed prompt set
(`prompts.prompt_set`) x seeds from the same initial latents (`generate.initial_latents`, as `ov-sd quality`
draws them), with the teacher's scheduler, the same steps and guidance. Per variant:

- image PSNR and SSIM against the teacher's images (torchmetrics; PSNR of the mean squared error over the
  whole image set, data range 1; SSIM averaged over images, 11x11 Gaussian window);
- final-latent MSE: the latents after the last denoising step, before the VAE decoder;
- UNet noise-prediction MSE on fixed inputs (the teacher's final latents noised at evenly spread
  timesteps, the teacher's text embeddings): the variant's UNet IR, compiled directly, against the torch
  teacher UNet. This isolates the UNet's error from the way small errors grow along a trajectory;
- prompt accuracy by the reference judge (shape / colour / background / all three), the teacher's row
  being the baseline;
- CLIP score (torchmetrics `CLIPScore`) when `--clip-model DIR` names a local CLIP model.

`--compare A,B` adds a paired bootstrap comparison of two variants (`paired_comparison`): how much A is better
than B on each metric, with a 95% interval (`stats`).

Writes, atomically, `eval.json`, `eval.md` (the table), `grid.png` (rows: teacher then variants in order;
columns: evenly spaced prompt/seed samples) and `evaluate/result-*.json` (`evaluate.save`). `--update-card`
writes the results into an evaluated folder's model card (table + Hub `model-index`, see `export/card.py`).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from ..assets import resolve_model_path
from ..errors import UserError
from ..lcm import ode_scheduler
from ..pipeline_folder import (
    PTQ_INFO_FILE,
    RECIPE_FILE,
    check_pipeline_source,
    few_step_record,
    image_size,
    is_openvino_folder,
    load_ov_pipeline,
    native_size,
    trained_sampling,
    unet_config,
    written_by,
)
from .accuracy import load_for_quality
from .fewstep import (
    FLOOR_SEED_OFFSET,
    ODE_STEPS,
    SCHEDULERS,
    decoder_comparison,
    few_step_scheduler,
    frechet_distance,
    has_tiny_decoder,
    parse_per_variant,
    parse_schedulers,
    variant_sampling,
)
from .generate import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate_set, initial_latents
from .metrics import (
    ACCURACY_KEYS,
    FIDELITY_METRICS,
    clip_score,
    clip_scorer,
    image_fidelity,
    images_to_uint8,
    judge_accuracy,
    noise_fidelity,
    ov_unet_noise,
    teacher_noise,
    unet_inputs,
)
from .prompts import jobs_for
from .report import GRID_FILE, grid_columns, markdown_table, table_rows, update_cards, write_outputs
from .stats import paired_comparison

REFERENCE_NAME = "fp32"
PRECISIONS = ("f32", "default")


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


def parse_model_spec(spec: str) -> tuple[str, Path]:
    """`NAME=DIR` or `DIR` -> (name, path). A bare `.../openvino` folder is named after its parent (the run)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    if sep and (not name or not path):
        raise UserError(f"--model {spec!r}: use NAME=DIR or DIR")
    p = Path(path).expanduser()
    if not name:
        resolved = p.resolve()
        name = resolved.parent.name if resolved.name == "openvino" else resolved.name
    return name, p


def check_reference(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"--reference {str(path)!r} does not exist; pass the FP32 diffusers pipeline folder")
    if is_openvino_folder(path):
        raise UserError(
            f"--reference {str(path)!r} is an OpenVINO folder; pass the FP32 diffusers pipeline (the teacher) "
            "and the OpenVINO folders with --model"
        )
    check_pipeline_source(str(path.resolve()))
    return path.resolve()


def check_variant(name: str, path: Path, reference: Path) -> Path:
    """A variant must be an OpenVINO pipeline folder of the same model geometry as the reference."""
    label = f"--model {name}={path}"
    if not path.exists():
        raise UserError(f"{label}: folder does not exist")
    if not path.is_dir() or not is_openvino_folder(path) or not (path / "model_index.json").is_file():
        raise UserError(
            f"{label}: not an OpenVINO pipeline folder (needs model_index.json and unet/openvino_model.xml); "
            "pass a folder written by `ov-sd export`, train.py (output_dir/openvino) or optimum-intel"
        )
    size, ref_size = native_size(path), native_size(reference)
    if size != ref_size:
        raise UserError(
            f"{label}: made for {size[1]}x{size[0]} px images, the reference for {ref_size[1]}x{ref_size[0]}; "
            "evaluate variants of the reference model"
        )
    cfg, ref_cfg = unet_config(path), unet_config(reference)
    for key in ("in_channels", "cross_attention_dim", "sample_size"):
        if key in cfg and key in ref_cfg and cfg[key] != ref_cfg[key]:
            raise UserError(
                f"{label}: UNet {key} {cfg[key]} differs from the reference's {ref_cfg[key]}; "
                "evaluate variants of the reference model"
            )
    return path.resolve()


def describe_variant(path: Path) -> str:
    """What a variant folder holds, from the files its writer leaves (informative only)."""
    import openvino as ov

    from ..compress.convert import count_fake_quantize, count_int8_constants

    writer = written_by(path)
    if writer == "qat":
        try:
            recipe = json.loads((path / RECIPE_FILE).read_text())
            ratio, scheme = float(recipe.get("tome_ratio") or 0), recipe.get("quantization_scheme", "full")
        except (ValueError, TypeError, AttributeError):
            ratio, scheme = 0.0, "full"
        # a consistency student's export records its scheme (flags are not in the recipe file)
        few_step = few_step_record(path)
        if few_step:
            scheme = few_step.get("quantization_scheme", scheme)
            if scheme == "none":
                return "float consistency student (ov-sd-trainer)"
            return f"QAT {'hybrid int8' if scheme == 'hybrid' else 'int8'} consistency student (ov-sd-trainer)"
        what = "QAT hybrid int8" if scheme == "hybrid" else "QAT int8"
        return f"{what} + ToMe {ratio:g} (ov-sd-trainer)" if ratio > 0 else f"{what} (ov-sd-trainer)"
    if writer == "ptq":
        try:
            ptq = json.loads((path / PTQ_INFO_FILE).read_text())
            mode, fix = ptq.get("mode", "full"), ptq["quantization"]["overflow_fix"]
        except (ValueError, KeyError, TypeError):
            mode, fix = "full", None
        what = "PTQ hybrid int8" if mode == "hybrid" else "PTQ int8"
        return f"{what} (optimum-intel)" + (f", overflow fix {fix}" if fix and fix != "disable" else "")
    unet = ov.Core().read_model(path / "unet" / "openvino_model.xml")
    if count_fake_quantize(unet):
        return "int8 UNet"
    return "int8-weight UNet" if count_int8_constants(unet) else "float UNet"


def _ov_config(precision: str, threads: int | None) -> dict:
    cfg = {"PERFORMANCE_HINT": "LATENCY"}
    if precision == "f32":  # run the float parts in f32: measure quantization, not the CPU's bf16 default
        cfg["INFERENCE_PRECISION_HINT"] = "f32"
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = str(threads)
    return cfg


def parse_cache_interval(spec: str, names: list[str]) -> tuple[str, int]:
    """`NAME=N` -> (name, N): evaluate --model NAME with step caching at interval N."""
    name, sep, value = spec.partition("=")
    if not sep or name not in names or not value.strip().isdigit() or int(value) < 1:
        raise UserError(
            f"--cache-interval {spec!r}: give NAME=N with a --model name and an interval N >= 1 "
            f"(names: {', '.join(names)})"
        )
    return name, int(value)


def check_cache_folder(name: str, path: Path, interval: int | None) -> None:
    from ..export.deepcache import has_deepcache

    if interval is not None and interval > 1 and not has_deepcache(path):
        raise UserError(
            f"--cache-interval {name}={interval}: {path} has no step-caching IRs; add them with "
            f"`ov-sd deepcache --run RUN --model {path}`"
        )


def load_variant(path: Path, batch_size: int, ov_config: dict, scheduler, cache_interval: int | None = None):
    """The OpenVINO pipeline, reshaped to the batch, compiled once with `ov_config`, using the teacher's scheduler;
    with a `cache_interval` N the step-caching pipeline (`OVDeepCacheStableDiffusionPipeline`) at interval N (N = 1
    runs its plain path: what `--cache-interval NAME=1` checks against the plain pipeline)."""
    size = native_size(path)
    if cache_interval is not None:
        from .deepcache_pipeline import load_deepcache_pipeline

        pipe = load_deepcache_pipeline(path, *size, batch_size=batch_size, ov_config=ov_config)
        pipe.cache_interval = cache_interval
    else:
        pipe = load_ov_pipeline(path, *size, batch_size=batch_size, ov_config=ov_config)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:  # None: the folder's own (an LCM folder's LCMScheduler)
        pipe.scheduler = type(scheduler).from_config(scheduler.config)
    return pipe


# --------------------------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------------------------


def evaluate_fidelity(
    reference: str | Path,
    models: list[tuple[str, str | Path]],
    *,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    seeds: int = 3,
    subset: int | None = None,
    batch_size: int = 16,
    unet_samples: int = 32,
    precision: str = "f32",
    threads: int | None = None,
    clip_model: str | Path | None = None,
    grid_samples: int = 8,
    judge=None,
    progress: bool = True,
    cache_intervals: dict[str, int] | None = None,
    variant_steps: dict[str, int] | None = None,
    variant_guidance: dict[str, float] | None = None,
    variant_schedulers: dict[str, str] | None = None,
    twins: list[tuple[str, str]] | None = None,
) -> tuple[dict, list[list]]:
    """Run the evaluation. Returns (result dict as written to eval.json, grid rows of PIL images).

    `models`: (name, OpenVINO folder) pairs; `cache_intervals`: name -> step-caching interval for those variants
    (their UNet noise MSE stays the plain IR's, one call); `variant_steps` / `variant_guidance`: name -> that
    variant's own steps / guidance, making it a few-step variant (`fewstep`; an LCM folder is one anyway);
    `variant_schedulers`: name -> a `fewstep.SCHEDULERS` kind that variant samples with (also a few-step one). Raises
    UserError for bad input before any slow work. `twins`: (A, B) variant pairs: A's images against B's (an int8
    student against its float twin, from the same latents), in `result["twins"]`."""
    cache_intervals = cache_intervals or {}
    variant_steps, variant_guidance = variant_steps or {}, variant_guidance or {}
    variant_schedulers = variant_schedulers or {}
    from .judge import load_judge

    if min([steps, seeds, batch_size, unet_samples, grid_samples, *variant_steps.values()]) < 1:
        raise UserError("--steps, --seeds, --batch-size, --unet-samples and --grid-samples must be >= 1")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    if not models:
        raise UserError("pass at least one --model (an OpenVINO pipeline folder) to compare with the reference")
    ref_path = check_reference(resolve_model_path(str(reference)))
    checked, seen = [], {REFERENCE_NAME}
    for name, path in models:
        if name in seen:
            raise UserError(f"--model name {name!r} is used twice (or is the reference's); name them NAME=DIR")
        seen.add(name)
        checked.append((name, check_variant(name, Path(path).expanduser(), ref_path)))
        check_cache_folder(name, checked[-1][1], cache_intervals.get(name))
    few_step_reference = trained_sampling(ref_path) is not None  # an LCM folder or a consistency student's export
    if not few_step_reference:
        sampling = {name: variant_sampling(name, path, variant_steps, variant_guidance, steps, guidance_scale,
                                           variant_schedulers)
                    for name, path in checked}  # fmt: skip
    elif variant_steps or variant_guidance or variant_schedulers:
        raise UserError(
            "the reference is itself a few-step (latent consistency) model, so there are no teacher ODE "
            "endpoints to score per-variant steps or schedulers against; give --steps N and --guidance-scale W "
            "without NAME="
        )
    else:  # a few-step reference: its variants sample as it does (--steps, --guidance-scale), scored against it
        sampling = {name: None for name, _ in checked}
    scorer = clip_scorer(clip_model) if clip_model else None
    if threads:
        torch.set_num_threads(threads)
    ov_config = _ov_config(precision, threads)
    judge = judge or load_judge()
    jobs = jobs_for(subset, seeds)
    prompts = [j["prompt"] for j in jobs]
    cols = grid_columns(len(jobs), grid_samples)
    t_start = time.perf_counter()

    teacher = load_for_quality(ref_path, "pytorch")
    height, width = image_size(teacher)
    shape = (teacher.unet.config["in_channels"], height // teacher.vae_scale_factor, width // teacher.vae_scale_factor)
    latents = initial_latents(jobs, shape)
    gen = dict(steps=steps, guidance_scale=guidance_scale, batch_size=batch_size, height=height, width=width)
    t0 = time.perf_counter()
    ref_images, ref_final = generate_set(
        teacher, jobs, latents, desc=f"generate {REFERENCE_NAME}", progress=progress, **gen
    )
    ref_gen_s = time.perf_counter() - t0
    ref_u8 = images_to_uint8(ref_images)
    inputs = unet_inputs(teacher, jobs, ref_final, unet_samples)
    ref_noise = teacher_noise(teacher, inputs)
    scheduler = teacher.scheduler
    ode = teacher_ode_sets(teacher, judge, jobs, latents, shape, gen,
                           {s["guidance_scale"] for s in sampling.values() if s}, progress)  # fmt: skip
    ref_judge = judge_accuracy(judge, ref_images, jobs)
    variants = [
        dict(
            name=REFERENCE_NAME,
            path=str(ref_path),
            description="FP32 teacher (PyTorch)",
            backend="pytorch",
            **{k: None for k, *_ in FIDELITY_METRICS},
            accuracy=ref_judge["accuracy"],
            by_value=ref_judge["by_value"],
            clip_score=clip_score(scorer, ref_u8, prompts) if scorer else None,
            generate_s=round(ref_gen_s, 1),
            per_image=dict(correct=ref_judge["correct"]),
        )
    ]
    grid_rows, grid_names = [[ref_images[i] for i in cols]], [REFERENCE_NAME]
    kept = {}  # uint8 images of the variants in `twins`
    del teacher
    gc.collect()

    for name, path in checked:
        t0 = time.perf_counter()
        interval = cache_intervals.get(name)
        own = sampling[name]
        if own and own["own_scheduler"]:
            sampler = None  # the folder's own LCMScheduler
        elif own and own["scheduler"]:
            sampler = few_step_scheduler(own["scheduler"], scheduler.config)
        else:
            sampler = scheduler
        pipe = load_variant(path, batch_size, ov_config, sampler, interval)
        variant_gen = {**gen, "steps": own["steps"], "guidance_scale": own["guidance_scale"]} if own else gen
        images, final = generate_set(pipe, jobs, latents, desc=f"generate {name}", progress=progress, **variant_gen)
        gen_s = time.perf_counter() - t0
        variant_scheduler = type(pipe.scheduler).__name__
        del pipe
        gc.collect()
        u8 = images_to_uint8(images)
        if any(name in pair for pair in twins or ()):
            kept[name] = u8
        fid = image_fidelity(ref_u8, u8)
        lat_per = ((final.double() - ref_final.double()) ** 2).flatten(1).mean(1)
        # a consistency student of a plain teacher predicts no teacher noise: nothing to compare (an LCM teacher's
        # QAT variant does, on the same inputs, timestep_cond included)
        if unet_config(path).get("time_cond_proj_dim") and not few_step_reference:
            noise = dict.fromkeys(("noise_pred_mse", "noise_pred_rel_l2", "per_sample_noise_mse"))
        else:
            noise = noise_fidelity(ref_noise, ov_unet_noise(path, inputs, ov_config))
        jud = judge_accuracy(judge, images, jobs)
        variants.append(
            dict(
                name=name,
                path=str(path),
                description=describe_variant(path) + (f" + step caching (interval {interval})" if interval else ""),
                backend="openvino",
                cache_interval=interval or 1,
                psnr=fid["psnr"],
                ssim=fid["ssim"],
                latent_mse=float(lat_per.mean()),
                noise_pred_mse=noise["noise_pred_mse"],
                psnr_mean_per_image=fid["psnr_mean_per_image"],
                noise_pred_rel_l2=noise["noise_pred_rel_l2"],
                accuracy=jud["accuracy"],
                accuracy_delta_vs_fp32={k: jud["accuracy"][k] - ref_judge["accuracy"][k] for k in ACCURACY_KEYS},
                by_value=jud["by_value"],
                clip_score=clip_score(scorer, u8, prompts) if scorer else None,
                generate_s=round(gen_s, 1),
                per_image=dict(
                    psnr=fid["per_image"]["psnr"],
                    ssim=fid["per_image"]["ssim"],
                    latent_mse=lat_per.tolist(),
                    correct=jud["correct"],
                    noise_pred_mse=noise["per_sample_noise_mse"],
                ),
            )
        )
        grid_rows.append([images[i] for i in cols])
        grid_names.append(name)
        if own:
            variants[-1]["few_step"] = few_step_metrics(
                own, variant_scheduler, ode[own["guidance_scale"]], images, judge
            )
        if has_tiny_decoder(path):
            variants[-1]["decoders"], decoded = decoder_comparison(path, final, jobs, judge, ov_config)
            for which in ("full", "tiny"):
                grid_rows.append([decoded[which][i] for i in cols])
                grid_names.append(f"{name}: {which} decode")

    import openvino as ov

    result = dict(
        reference=str(ref_path),
        settings=dict(
            steps=steps,
            guidance_scale=guidance_scale,
            seeds=seeds,
            prompts=len(jobs) // seeds,
            images=len(jobs),
            subset=subset,
            batch_size=batch_size,
            height=height,
            width=width,
            scheduler=type(scheduler).__name__,
            unet_samples=len(inputs["jobs"]),
            unet_timesteps=inputs["timestep"].tolist(),
            precision=precision,
            ov_config=ov_config,
            threads=threads,
            clip_model=str(clip_model) if clip_model else None,
            latents="torch.Generator().manual_seed(1000 * seed + prompt_index), as `ov-sd quality`",
            openvino=ov.get_version(),
            torch=torch.__version__,
        ),
        variants=variants,
        grid=dict(
            file=GRID_FILE,
            rows=grid_names,
            columns=[dict(prompt=jobs[i]["prompt"], seed=jobs[i]["seed"]) for i in cols],
            cell=[width, height],
        ),
        jobs=[dict(prompt=j["prompt"], seed=j["seed"], index=j["index"]) for j in jobs],
        twins={
            f"{a} vs {b}": {k: v for k, v in image_fidelity(kept[b], kept[a]).items() if k != "per_image"}
            for a, b in twins or ()
        },  # fmt: skip
        time_s=round(time.perf_counter() - t_start, 1),
    )
    return result, grid_rows


def teacher_ode_sets(teacher, judge, jobs, latents, shape, gen: dict, guidances: set, progress: bool) -> dict:
    """For each guidance scale of a few-step variant: the teacher's ODE endpoints (DDIM without clipping) from the
    same initial latents at each of ODE_STEPS, and the noise floor of the Fréchet distance (the teacher's images at
    other seeds against the most-steps endpoints)."""
    if not guidances:
        return {}
    saved, out = teacher.scheduler, {}
    teacher.scheduler = ode_scheduler(saved.config)
    other = [{**j, "seed": j["seed"] + FLOOR_SEED_OFFSET} for j in jobs]
    try:
        for g in sorted(guidances):
            run = {**gen, "guidance_scale": g, "progress": progress}
            sets = {n: generate_set(teacher, jobs, latents, **{**run, "steps": n}, desc=f"teacher DDIM {n}, w {g}")[0]
                    for n in ODE_STEPS}  # fmt: skip
            floor = generate_set(teacher, other, initial_latents(other, shape), **{**run, "steps": max(ODE_STEPS)},
                                 desc=f"teacher DDIM {max(ODE_STEPS)}, other seeds")[0]  # fmt: skip
            out[g] = {"sets": sets, "fid_floor": frechet_distance(judge, sets[max(ODE_STEPS)], floor)}
    finally:
        teacher.scheduler = saved
    return out


def few_step_metrics(own: dict, scheduler_name: str, ode: dict, images, judge) -> dict:
    """A few-step variant against the teacher's ODE endpoints at its guidance: PSNR/SSIM per teacher step count,
    the Fréchet distance in the judge's features to the most-steps endpoints and its teacher-vs-teacher floor."""
    u8 = images_to_uint8(images)
    against = {}
    for n, ref in ode["sets"].items():
        fid = image_fidelity(images_to_uint8(ref), u8)
        against[f"ddim{n}"] = {"psnr": fid["psnr"], "ssim": fid["ssim"], "per_image_psnr": fid["per_image"]["psnr"]}
    fd = frechet_distance(judge, ode["sets"][max(ODE_STEPS)], images)
    return {"steps": own["steps"], "guidance_scale": own["guidance_scale"], "scheduler": scheduler_name,
            "ode": against, "frechet_distance": fd, "frechet_floor": ode["fid_floor"],
            "frechet_vs_floor": fd / ode["fid_floor"] if ode["fid_floor"] > 0 else None}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `ov-sd eval`'s options to `parser` (a subparser) and make it run the evaluation."""
    parser.description = parser.description or __doc__.split("\n")[0]
    parser.add_argument(
        "--reference", required=True, help="the FP32 diffusers pipeline folder (the teacher), or 'reference'"
    )
    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR",
                        help="an OpenVINO pipeline folder to evaluate (repeatable); NAME labels its row")  # fmt: skip
    parser.add_argument("--output", required=True, help="output folder (eval.json, eval.md, grid.png, evaluate/)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--steps", action="append", default=[], metavar="[NAME=]N",
                        help=f"denoising steps (default {DEFAULT_STEPS}); NAME=N: that --model's own steps, which "
                        "makes it a few-step variant (scored against the teacher's ODE endpoints too); an LCM folder "
                        "is one with the steps it was trained for (repeatable)")  # fmt: skip
    parser.add_argument("--guidance-scale", action="append", default=[], metavar="[NAME=]W",
                        help=f"guidance scale (default {DEFAULT_GUIDANCE}); NAME=W: that --model's own (repeatable)")  # fmt: skip
    parser.add_argument("--scheduler", action="append", default=[], metavar="NAME=KIND",
                        help=f"sample --model NAME with KIND ({', '.join(SCHEDULERS)}) on the teacher's noise schedule "
                        "instead of the teacher's scheduler, as a few-step variant (the naive baseline: the teacher's "
                        "export at --steps NAME=4 --scheduler NAME=dpm, its best) (repeatable)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3, help="seeds per prompt")
    parser.add_argument("--subset", type=int, default=None, help="N evenly spaced prompts of the 132 (default all)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per pipeline call")
    parser.add_argument("--unet-samples", type=int, default=32, help="fixed inputs for the UNet noise-prediction MSE")
    parser.add_argument("--precision", choices=PRECISIONS, default="f32",
                        help="OpenVINO inference precision of the float ops: f32, or the CPU's default (bf16 on "
                        "CPUs with bf16 support)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch and OpenVINO threads (default: theirs)")
    parser.add_argument("--clip-model", default=None, help="local CLIP model folder for the CLIP score (optional)")
    parser.add_argument("--grid-samples", type=int, default=8, help="columns of grid.png")
    parser.add_argument(
        "--grid-scale", type=int, default=None, help="upscale factor of grid cells (default: to ~128 px)"
    )
    parser.add_argument("--judge", default=None, help="judge folder (default: the committed one)")
    parser.add_argument("--update-card", action="append", default=[], metavar="DIR",
                        help="write the results into this evaluated --model folder's README.md (repeatable)")  # fmt: skip
    parser.add_argument("--compare", action="append", default=[], metavar="A,B",
                        help="paired bootstrap comparison of variant A against variant B (repeatable)")  # fmt: skip
    parser.add_argument("--twin", action="append", default=[], metavar="A,B",
                        help="PSNR/SSIM of variant A's images against variant B's (an int8 student against its float "
                        "twin; same latents) (repeatable)")  # fmt: skip
    parser.add_argument("--cache-interval", action="append", default=[], metavar="NAME=N",
                        help="generate --model NAME with step caching (DeepCache) at interval N (repeatable; the "
                        "folder needs `ov-sd deepcache` IRs)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true")
    return parser


def parse_pair(spec: str, flag: str, names: list[str]) -> tuple[str, str]:
    pair = tuple(x.strip() for x in spec.split(","))
    if len(pair) != 2 or not all(x in names for x in pair):
        raise UserError(f"{flag} {spec!r}: give two --model names as A,B (names: {', '.join(names)})")
    return pair


def run(args: argparse.Namespace) -> dict:
    from ..outputs import check_output_dir
    from .judge import load_judge

    check_output_dir(args.output, args.overwrite)  # fail before the slow work
    models = [parse_model_spec(m) for m in args.model]
    resolved = {p.expanduser().resolve() for _, p in models}
    for card in args.update_card:
        folder = Path(card).expanduser().resolve()
        if folder not in resolved:
            raise UserError(f"--update-card {card!r} is not one of the evaluated --model folders")
        if not (folder / "README.md").is_file():
            raise UserError(f"--update-card {card!r} has no model card (README.md) to update")
    names = [n for n, _ in models]
    pairs = [parse_pair(spec, "--compare", names) for spec in args.compare]
    intervals = dict(parse_cache_interval(spec, names) for spec in args.cache_interval)
    twins = [parse_pair(spec, "--twin", names) for spec in args.twin]
    steps, variant_steps = parse_per_variant(args.steps, "--steps", int, names)
    guidance, variant_guidance = parse_per_variant(args.guidance_scale, "--guidance-scale", float, names)
    variant_schedulers = parse_schedulers(args.scheduler, names)
    result, grid_rows = evaluate_fidelity(
        args.reference,
        models,
        cache_intervals=intervals,
        steps=DEFAULT_STEPS if steps is None else steps,
        guidance_scale=DEFAULT_GUIDANCE if guidance is None else guidance,
        variant_steps=variant_steps,
        variant_guidance=variant_guidance,
        variant_schedulers=variant_schedulers,
        twins=twins,
        seeds=args.seeds,
        subset=args.subset,
        batch_size=args.batch_size,
        unet_samples=args.unet_samples,
        precision=args.precision,
        threads=args.threads,
        clip_model=args.clip_model,
        grid_samples=args.grid_samples,
        judge=load_judge(args.judge) if args.judge else None,
        progress=not args.no_progress,
    )
    if pairs:
        result["comparisons"] = {f"{a} vs {b}": paired_comparison(result, a, b) for a, b in pairs}
    side = max(result["settings"]["height"], result["settings"]["width"])
    scale = args.grid_scale or max(1, 128 // side)
    write_outputs(args.output, result, grid_rows, scale, overwrite=args.overwrite)
    print(markdown_table(table_rows(result)))
    print(f"written to {args.output} ({result['time_s']} s)")
    for folder in update_cards(result, args.update_card):
        print(f"model card updated: {folder / 'README.md'}")
    return result


def main(args: argparse.Namespace) -> int:
    run(args)
    return 0
