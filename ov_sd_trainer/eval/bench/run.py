"""`ov-sd bench`: inference speed, size and memory of a Stable Diffusion pipeline in several forms, side by side.

One process measures every variant (`variants.VARIANTS`: PyTorch FP32 and bf16, OpenVINO FP32 and default
precision, optimum-intel's hybrid and full-int8 PTQ, this project's QAT int8 with and without token merging or step
caching, each int8 one also with int8 text encoder and VAE weights) on the same inputs, one at a time (each is
loaded, measured and freed before the next).

For each: UNet step latency (warm-up, then the median of N calls with fixed inputs), full pipeline latency for K
steps (text encoder + K CFG UNet steps + VAE decode), UNet and folder size on disk, load+compile time, peak RSS, and
speed-ups vs PyTorch FP32 and vs each optimum-intel PTQ peer. Per image: the text encoder call, the UNet call (and,
with step caching, the shallow call) and the VAE decode are timed on their own, and the latency of one
`--image-steps`-step image (default 50) is composed from them: text encoder + the scheduler's UNet calls + VAE decode
(`measure.compose`); the K-step pipeline composed the same way, and the whole image pipeline where cheap
(`--measure-image`, default except under --arch sd15), are timed directly to check the composition. The per-image
ratios divide by PyTorch FP32 and by the faster form of each optimum peer (`report.IMAGE_BASELINES`). OpenVINO
pipelines are reshaped to static shapes (batch, height, width) as the README's usage does, unless `--dynamic-shapes`.
Every report names the CPU's instruction set (AVX2, AVX512-VNNI, AMX, BF16): int8 and bf16 speed depend on it
completely.

Peak RSS: a thread samples the process RSS (psutil) every 20 ms while a variant is loaded and measured; `peak_rss`
is the maximum, `rss_start` the RSS when the variant's phase began (after the previous variant was freed and
`malloc_trim` returned freed heap to the OS), so `peak_rss - rss_start` is what the variant itself added. The same
thread's CPU accounting gives `other_load_cores`: the CPU time other processes used per second of the phase.

`--arch sd15` builds the SD 1.5 architecture with random weights (`assets.builders.build_sd15_pipeline`) once into the
work folder, `--arch sdxl` SDXL base's (`build_sdxl_pipeline`: two text encoders, a UNet that also takes
`text_embeds` and `time_ids`): latency does not depend on weight values, quality does, so the QAT variants there are
the QAT graph with untrained weights (NNCF quantizers calibrated on two random inputs, exactly the graph QAT exports;
the step-caching variant adds the full / shallow IRs of the same student, as `ov-sd deepcache --run` does), speed
only. Under --arch sdxl the text encoder part is both encoders (`encode_prompt`), the image is 50 UNet calls for 50
steps (EulerDiscrete), ToMe merges at downsampling 2 and step caching is left out (SD 1.x/2.x UNets only). The
per-arch defaults (size, repeats) are `settings.ARCH_DEFAULTS`.
`--profile` compiles the OpenVINO variants with PERF_COUNT and writes time per op type and per execution precision.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

from ... import families
from ...assets import resolve_model_path
from ...errors import UserError
from ...outputs import atomic_output_dir, check_output_dir
from ...pipeline_folder import check_model_source, check_openvino_folder, geometry
from .fewstep import add_few_step_ratios, add_tiny_image_latency, run_few_step
from .measure import measure_variant, unet_config, unet_inputs
from .monitor import free_memory
from .prepare import prepare
from .report import (
    add_ratios,
    check_targets,
    image_baselines,
    machine_info,
    markdown_report,
    native_bf16,
    plot,
    text_vae_pairs,
    versions,
)
from .settings import ARCH_DEFAULTS, ARCH_HELP, ARCHS, BenchSettings, image_size, parse_ov_config
from .variants import BY_NAME, QAT_TOME, VARIANTS, parse_variants

BF16_VARIANT = "pytorch-bf16"


def default_skips(names: list[str], explicit: bool, machine: dict) -> dict[str, str]:
    """Variants left out of a default run (no --variants) on this machine, with the reason shown in the report."""
    skips = {}
    if not explicit and BF16_VARIANT in names and not native_bf16(machine):
        skips[BF16_VARIANT] = (
            "skipped by default: this CPU has no bf16 instructions, so autocast emulates bf16 far slower than FP32 "
            f"(tens of minutes per SD 1.5 UNet step on 2 cores); name {BF16_VARIANT} in --variants to measure it"
        )
    return skips


def run_bench(
    output: str | Path,
    settings: BenchSettings,
    *,
    model: str | None = None,
    arch: str | None = None,
    variants: list[str] | None = None,
    given: dict[str, str] | None = None,
    work_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Run the benchmark and write bench.json, bench.md, bench.png to `output` atomically. Returns the result dict
    (what bench.json holds). `given`: variant flag (`--qat`, `--ptq`, ...) -> an existing OpenVINO folder."""
    import torch
    from tqdm.auto import tqdm

    if (model is None) == (arch is None):
        raise UserError(f"pass exactly one of --model DIR_or_hub_id and --arch {'|'.join(ARCHS)}")
    if arch is not None and arch not in ARCHS:
        raise UserError(f"--arch {arch!r} is unknown; choose one of {', '.join(ARCHS)}")
    settings.check()
    tome_wanted = any(n.startswith(QAT_TOME) for n in (variants or [v.name for v in VARIANTS]))
    if arch == "sdxl" and tome_wanted and settings.tome_max_downsample < 2:
        raise UserError(
            f"--tome-max-downsample {settings.tome_max_downsample}: SDXL has no attention at full resolution (its "
            f"attention levels are downsampling 2 and 4); use 2 or more, or leave {QAT_TOME} out of --variants"
        )
    if model is not None:
        model = resolve_model_path(model)  # 'reference': the bundled model
    explicit = variants is not None
    names = variants or [v.name for v in VARIANTS]
    if model is not None:  # a missing folder or an uncached Hub id offline: one line now, not after optimum's load
        check_model_source(model)
    check_output_dir(output, overwrite)
    by_flag = {v.flag: v.source for v in VARIANTS if v.flag}
    folders = {by_flag[flag]: check_openvino_folder(path, flag) for flag, path in (given or {}).items() if path}
    if "qat-deepcache" in folders:
        from ...export.deepcache import has_deepcache

        if not has_deepcache(folders["qat-deepcache"]):
            raise UserError(
                f"--qat-deepcache {str(folders['qat-deepcache'])!r} has no step-caching IRs (unet_deepcache/); "
                "add them with `ov-sd deepcache --run RUN_DIR`"
            )
    if settings.threads:
        torch.set_num_threads(settings.threads)

    machine = machine_info()
    keep = work_dir is not None
    work = Path(work_dir).expanduser() if keep else Path(tempfile.mkdtemp(prefix="ov-sd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    skipped = default_skips(names, explicit, machine)
    try:
        wanted = [n for n in names if n not in skipped]
        prep = prepare(wanted, settings, work, model=model, arch=arch, given=folders, progress=progress)
        for name in wanted:
            note = prep.notes.get(BY_NAME[name].folder_key)
            if note:
                skipped[name] = note
        geo = geometry(prep.ov_fp32_dir or Path(prep.diffusers_dir))
        height, width = image_size(settings, arch, geo["size"])
        for dim, value in (("height", height), ("width", width)):
            if value % geo["vae_factor"]:
                raise UserError(f"--{dim} {value} is not divisible by the VAE factor {geo['vae_factor']}")
        inputs = unet_inputs(settings, geo, height, width, unet_config(prep.ov_fp32_dir or prep.diffusers_dir))
        rows = []
        todo = [BY_NAME[n] for n in names if n not in skipped]
        bar = tqdm(todo, desc="bench", disable=not progress)
        for variant in bar:
            bar.set_description(f"bench: {variant.name}")
            folder = prep.folders[variant.folder_key]
            rows.append(measure_variant(variant, folder, settings, inputs, height, width, progress))
            free_memory()
        bar.close()
        few_step = tiny = None
        if settings.few_step and prep.diffusers_dir is None:
            skipped["few-step"] = "omitted: --model is an OpenVINO folder (the LCM student is built from diffusers)"
        elif settings.few_step:
            few_step, tiny = run_few_step(prep.diffusers_dir, work, settings, height, width, prep.log, progress)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    add_ratios(rows)
    if tiny and settings.batch_size == 2:  # one image per pipeline call, as the tiny decoder was timed
        add_tiny_image_latency(rows, tiny["decode"])
    if few_step:
        add_few_step_ratios(few_step, rows)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    resolved = asdict(settings) | {"height": height, "width": width}
    notes = []
    if arch is not None and any(BY_NAME[r["name"]].source.startswith("qat") for r in rows):
        notes.append(
            f"the QAT variants under --arch {arch} are the QAT graph (NNCF int8, with ToMe for qat-int8-tome) with "
            "untrained random weights: speed and size only, quality meaningless."
        )
    if families.TEXT_EMBEDS in inputs:
        notes.append(
            "SDXL: the UNet step's fixed inputs add text_embeds and time_ids (added conditioning, passed to the "
            "PyTorch UNet as added_cond_kwargs); the text encoder part is both text encoders (encode_prompt)."
        )
    if few_step:
        notes.append(
            "few-step rows: a random-weight LCM student (the UNet + time_cond_proj_dim 256) with the project's full int8 "
            "UNet graph (random calibration) and a random-weight tiny decoder: latency does not depend on the weights."
        )
    if settings.profile:
        notes.append("timed with PERF_COUNT on (OpenVINO variants): per-node counters add a little overhead.")
    if any(r["cache_interval"] > 1 for r in rows):
        notes.append(
            "step caching (qat-int8-deepcache*): UNet s/step is the full IR's call; the shallow call and the image "
            "latency are in the per-image table; the K-step pipeline runs with the cache."
        )
    result = {
        "source": f"--arch {arch}" if arch else str(model),
        "arch": arch,
        "settings": resolved,
        "unet_inputs": {k: list(v.shape) for k, v in inputs.items()},
        "variants": rows,
        "image_baselines": image_baselines(rows),
        "int8_text_vae": text_vae_pairs(rows),
        "few_step": few_step,
        "tiny_decoder": tiny,
        "skipped": {n: skipped[n] for n in [*names, "few-step"] if n in skipped},
        "targets": check_targets(rows),
        "notes": notes,
        "preparation": prep.log,
        "machine": machine,
        "versions": versions(),
        "command": command or " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "rss_method": "psutil RSS sampled every 20 ms per variant phase (load, UNet timing, pipeline runs)",
    }
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        (tmp / "bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (tmp / "bench.md").write_text(markdown_report(result))
        plot(result, tmp / "bench.png")
    return result


# --------------------------------------------------------------------------------------------------------------------
# `ov-sd bench`
# --------------------------------------------------------------------------------------------------------------------

_D = {f.name: f.default for f in fields(BenchSettings)}


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="diffusers folder, Hub id, optimum-intel OpenVINO folder (FP32) or 'reference'")
    src.add_argument("--arch", choices=ARCHS, help="; ".join(f"{a}: {h}" for a, h in ARCH_HELP.items()))
    p.add_argument("--output", required=True, help="folder for bench.json, bench.md, bench.png (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma list of {', '.join(BY_NAME)} (default: all that apply; {BF16_VARIANT} only on CPUs with bf16)",
    )
    for v in VARIANTS:
        if v.flag:
            p.add_argument(v.flag, default=None, help=f"an existing OpenVINO folder for {v.name} (default: built here)")
    p.add_argument("--work-dir", default=None, help="keep built folders here and reuse them (default: temporary)")
    sizes = "; ".join(f"--arch {a}: {d['height']}" for a, d in ARCH_DEFAULTS.items() if "height" in d)
    p.add_argument("--height", type=int, default=None,
                   help=f"default: the model's size (--arch sd15: 512; {sizes}, see --arch)")  # fmt: skip
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=_D["batch_size"], help="UNet batch (CFG: 2 x images)")
    for name, what in (("steps_pipeline", "K steps per pipeline run"), ("repeats", "N timed UNet calls, median"),
                       ("pipeline_repeats", "timed pipeline runs")):  # fmt: skip
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"{what} (default {_D[name]}; " + ", ".join(f"{a}: {d[name]}" for a, d in
                                                                       ARCH_DEFAULTS.items()) + ")")  # fmt: skip
    p.add_argument("--warmup", type=int, default=_D["warmup"], help="untimed calls before each timed part")
    p.add_argument("--warmup-s", type=float, default=_D["warmup_s"],
                   help="and untimed calls until this many seconds have passed")  # fmt: skip
    p.add_argument("--image-steps", type=int, default=_D["image_steps"],
                   help="steps of the image whose latency is composed from the measured parts")  # fmt: skip
    p.add_argument("--measure-image", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the whole --image-steps pipeline directly (default: yes; --arch: no, minutes "
                   "per variant)")  # fmt: skip
    p.add_argument("--few-step", action=argparse.BooleanOptionalAction, default=None,
                   help="also the few-step int8 student (LCM, random weights) at 2/4/8 steps and a tiny VAE decoder "
                   "beside the VAE decode (default: --arch sd15 yes, otherwise no; needs a diffusers pipeline)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch threads and OpenVINO INFERENCE_NUM_THREADS")
    p.add_argument("--dynamic-shapes", action="store_true", help="do not reshape OpenVINO pipelines to static")
    p.add_argument("--ov-config", action="append", default=None, metavar="KEY=VALUE", help="OpenVINO property")
    p.add_argument("--profile", action="store_true", help="PERF_COUNT: time per op type / precision (OV variants)")
    p.add_argument("--ptq-samples", type=int, default=_D["ptq_samples"], help="calibration UNet calls (PTQ peers)")
    p.add_argument("--ptq-steps", type=int, default=_D["ptq_steps"])
    p.add_argument("--tome-ratio", type=float, default=_D["tome_ratio"], help="qat-int8-tome under --arch")
    p.add_argument("--tome-max-downsample", type=int, default=None,
                   help=f"default {_D['tome_max_downsample']}; sdxl: {ARCH_DEFAULTS['sdxl']['tome_max_downsample']} "
                   "(no attention at full resolution)")  # fmt: skip
    p.add_argument("--tome-mode", default=_D["tome_mode"], help="tome (token merging) or todo (key/value pooling)")
    p.add_argument("--tome-merge-mlp", action="store_true", help="the MLP sees merged tokens too")
    p.add_argument("--seed", type=int, default=_D["seed"])
    p.add_argument("--prompt", default=_D["prompt"])


def settings_from_args(args) -> BenchSettings:
    per_arch = ARCH_DEFAULTS.get(args.arch, {})

    def pick(name):  # not `or`: an explicit 0 must reach the range check
        value = getattr(args, name)
        return per_arch.get(name, _D[name]) if value is None else value

    return BenchSettings(
        height=args.height,  # None: the arch's default or the model's size (`settings.image_size`)
        width=args.width,
        batch_size=args.batch_size,
        steps_pipeline=pick("steps_pipeline"),
        repeats=pick("repeats"),
        pipeline_repeats=pick("pipeline_repeats"),
        warmup=args.warmup,
        warmup_s=args.warmup_s,
        image_steps=args.image_steps,
        measure_image=pick("measure_image"),
        few_step=pick("few_step"),
        threads=args.threads,
        static_shapes=not args.dynamic_shapes,
        ov_config=parse_ov_config(args.ov_config),
        profile=args.profile,
        seed=args.seed,
        prompt=args.prompt,
        ptq_samples=args.ptq_samples,
        ptq_steps=args.ptq_steps,
        tome_ratio=args.tome_ratio,
        tome_max_downsample=pick("tome_max_downsample"),
        tome_mode=args.tome_mode,
        tome_merge_mlp=args.tome_merge_mlp,
    )


def run(args) -> dict:
    """`ov-sd bench` with parsed arguments; prints the markdown table and returns the result."""
    result = run_bench(
        args.output,
        settings_from_args(args),
        model=args.model,
        arch=args.arch,
        variants=parse_variants(args.variants) if args.variants is not None else None,
        given={v.flag: getattr(args, v.flag[2:].replace("-", "_")) for v in VARIANTS if v.flag},
        work_dir=args.work_dir,
        overwrite=args.overwrite,
        command="ov-sd " + " ".join(getattr(args, "argv", None) or sys.argv[1:]),
    )
    print(markdown_report(result))
    return result


def main(args) -> int:
    run(args)
    return 0
