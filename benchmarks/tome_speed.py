"""Token merging on the int8 SD 1.5 UNet at 512 px: step latency of every variant side by side, plus its error.

Each variant is the SD 1.5 UNet architecture (859.5 M params, random weights: latency does not depend on the
values) with `ov_sd_trainer.compress.tome.apply_tome` applied (or not), quantized by
`compress.quantize.quantize_unet` exactly as QAT training quantizes its student (NNCF, preset mixed, overflow fix on;
ranges from `--calib-samples` random inputs, which do not change the speed) and converted by
`compress.convert.convert_unet_to_openvino`, i.e. the IR that `ov-sd export` writes. Building runs one variant per
subprocess (a few GiB each; IRs are cached in `--cache-dir`). The timing then loads every IR in one process,
reshapes it to the pipeline's static shapes (batch 2 for classifier-free guidance, 4x64x64 latents, 77x768 text
states), compiles it with OpenVINO's defaults (CPU threads and precision as users run it), and runs the variants
round-robin, `--runs` times after `--warmup` runs: the table shows the median (and min) per variant, so that load
from other processes falls on all of them alike.

Error column: what merging costs in accuracy, measured where weights mean something: the bundled reference model
(64 px, 16x16 latents), FP32 PyTorch, noise prediction of the merged UNet vs the exact UNet (relative L2) on
noisy latents of synthetic training images at t = 100..900 with their captions. The reference model's top level
has 256 tokens (SD 1.5 at 512 px: 4096), so this is a proxy, not SD 1.5's own quality loss.

Reproduce (the full run takes 30-60 min on 2 shared cores; peak RSS ~9 GB while building a variant):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tome_speed.py

Smoke test of the script on a tiny UNet: `--unet tiny --runs 2 --warmup 1 --cache-dir /tmp/tome-ir`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> apply_tome kwargs (None: no merging). tomesd's defaults are ratio 0.5, max_downsample 1, sx = sy = 2,
# self-attention only; "md2" also merges at the 2x-downsampled level, "mlp" also merges for the feed-forward,
# "todo" pools self-attention keys/values over 2x2 cells instead of merging.
VARIANTS = {
    "int8": None,
    "tome0.3": dict(ratio=0.3),
    "tome0.4": dict(ratio=0.4),
    "tome0.5": dict(ratio=0.5),
    "tome0.4-md2": dict(ratio=0.4, max_downsample=2),
    "tome0.4-mlp": dict(ratio=0.4, merge_mlp=True),
    "tome0.5-md2-mlp": dict(ratio=0.5, max_downsample=2, merge_mlp=True),
    "todo": dict(ratio=0.75, mode="todo"),
    "todo-md2": dict(ratio=0.75, mode="todo", max_downsample=2),
}
DEFAULT_VARIANTS = "int8,tome0.3,tome0.4,tome0.5,tome0.4-md2,todo"


def settings(kwargs: dict | None) -> str:
    if kwargs is None:
        return "no merging"
    from ov_sd_trainer.compress.tome_config import TomeConfig

    cfg = TomeConfig(**kwargs)
    if cfg.mode == "todo":
        return f"todo: K/V pooled {cfg.sy}x{cfg.sx}, max_downsample {cfg.max_downsample}"
    where = "+".join(
        n for n, on in (("attn", cfg.merge_attn), ("xattn", cfg.merge_crossattn), ("mlp", cfg.merge_mlp)) if on
    )
    return f"ratio {cfg.ratio}, max_downsample {cfg.max_downsample}, {where}"


# --------------------------------------------------------------------------------------------------------------------
# Building one IR (in a subprocess)
# --------------------------------------------------------------------------------------------------------------------


def build_unet(kind: str):
    import torch

    if kind == "sd15":
        from ov_sd_trainer.assets.builders import build_sd15_unet

        return build_sd15_unet(seed=0), 64, 768
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=64,
        attention_head_dim=4, norm_num_groups=8,
    )  # fmt: skip
    return unet, 16, 64


def build_one(name: str, kind: str, out: Path, calib_samples: int) -> dict:
    import openvino as ov
    import torch

    from ov_sd_trainer.compress import convert, quantize
    from ov_sd_trainer.compress.tome import apply_tome

    torch.set_num_threads(1)  # the machine is shared; building is not what is measured
    t0 = time.perf_counter()
    unet, size, text_dim = build_unet(kind)
    unet.eval()
    if VARIANTS[name] is not None:
        apply_tome(unet, **VARIANTS[name])
    g = torch.Generator().manual_seed(0)
    calib = [
        {
            "sample": torch.randn(2, 4, size, size, generator=g),
            "timestep": torch.randint(0, 1000, (2,), generator=g),
            "encoder_hidden_states": torch.randn(2, 77, text_dim, generator=g),
        }
        for _ in range(calib_samples)
    ]
    student = quantize.quantize_unet(unet, calib, overflow_fix="enable", bias_correction=False)
    del unet
    gc.collect()
    t1 = time.perf_counter()
    ov_model = convert.convert_unet_to_openvino(student, height=size, width=size)
    del student
    gc.collect()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.xml")
    ov.save_model(ov_model, tmp, compress_to_fp16=False)
    ops: dict[str, int] = {}
    for op in ov_model.get_ops():
        ops[op.get_type_name()] = ops.get(op.get_type_name(), 0) + 1
    os.replace(tmp.with_suffix(".bin"), out.with_suffix(".bin"))
    os.replace(tmp, out)  # the .xml last: a cached IR is complete if its .xml exists
    info = {
        "quantize_s": round(t1 - t0, 1),
        "convert_s": round(time.perf_counter() - t1, 1),
        "ir_ops": {k: ops.get(k, 0) for k in ("FakeQuantize", "TopK", "Gather", "ScatterNDUpdate", "AvgPool")},
        "random_ops": ops.get("RandomUniform", 0) + ops.get("Multinomial", 0),
        "size": size,
        "text_dim": text_dim,
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return info


def ensure_ir(name: str, args) -> dict:
    xml = Path(args.cache_dir) / args.unet / f"{name}.xml"
    if xml.is_file() and xml.with_suffix(".json").is_file() and not args.rebuild:
        return json.loads(xml.with_suffix(".json").read_text())
    cmd = [sys.executable, __file__, "--build-one", name, "--unet", args.unet, "--cache-dir", args.cache_dir,
           "--calib-samples", str(args.calib_samples)]  # fmt: skip
    print(f"[build] {name}: quantize + convert in a subprocess ...", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(xml.with_suffix(".json").read_text())


# --------------------------------------------------------------------------------------------------------------------
# Timing (one process, round-robin)
# --------------------------------------------------------------------------------------------------------------------


def time_variants(names: list[str], infos: dict, args) -> dict[str, list[float]]:
    import numpy as np
    import openvino as ov
    from tqdm.auto import tqdm

    core = ov.Core()
    requests, feeds = {}, {}
    for name in tqdm(names, desc="compile"):
        info = infos[name]
        size, text_dim = info["size"], info["text_dim"]
        model = core.read_model(Path(args.cache_dir) / args.unet / f"{name}.xml")
        shapes = {"sample": [2, 4, size, size], "timestep": [2], "encoder_hidden_states": [2, 77, text_dim]}
        model.reshape(shapes)  # static shapes, as OVStableDiffusionPipeline.reshape() sets them
        config = {"INFERENCE_NUM_THREADS": args.threads} if args.threads else {}
        requests[name] = core.compile_model(model, "CPU", config).create_infer_request()
        rng = np.random.default_rng(0)
        feeds[name] = {
            "sample": rng.standard_normal(shapes["sample"], dtype=np.float32),
            "timestep": np.array([500, 500], dtype=np.int64),
            "encoder_hidden_states": rng.standard_normal(shapes["encoder_hidden_states"], dtype=np.float32),
        }
        del model
    for _ in range(args.warmup):
        for name in names:
            requests[name].infer(feeds[name])
    # Wall time is what users see; process CPU time (all threads) is the work the step took, which other jobs on a
    # shared machine disturb far less (they delay the step without adding to it).
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for _ in tqdm(range(args.runs), desc="timing rounds"):
        for name in names:
            t, c = time.perf_counter(), time.process_time()
            requests[name].infer(feeds[name])
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return times, cpu


# --------------------------------------------------------------------------------------------------------------------
# Error of merging on the trained reference model
# --------------------------------------------------------------------------------------------------------------------


def merge_errors(names: list[str], num_images: int = 8) -> dict[str, float]:
    import copy

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ov_sd_trainer.assets import reference_model_path
    from ov_sd_trainer.assets.reference_training import (
        encode_prompts_from_ids,
        make_images,
        to_model_range,
        tokenize_prompts,
    )
    from ov_sd_trainer.compress.tome import apply_tome
    from ov_sd_trainer.pipeline_folder import load_pipeline

    torch.set_num_threads(1)
    path = str(reference_model_path())
    pipe = load_pipeline(path)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    images, captions = make_images(num_images, seed=12345)  # a seed the reference model was not trained on
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = pipe.vae.encode(to_model_range(images)).latent_dist.mean * pipe.vae.config.scaling_factor
        states = encode_prompts_from_ids(pipe.text_encoder, tokenize_prompts(pipe.tokenizer, captions))
        batches = []
        for t in (100, 300, 500, 700, 900):
            ts = torch.full((num_images,), t, dtype=torch.long)
            noisy = scheduler.add_noise(latents, torch.randn(latents.shape, generator=g), ts)
            batches.append((noisy, ts, states))
        unet: UNet2DConditionModel = pipe.unet.eval()
        exact = [unet(*b, return_dict=False)[0] for b in batches]
        errors = {}
        for name in names:
            if VARIANTS[name] is None:
                errors[name] = 0.0
                continue
            merged = apply_tome(copy.deepcopy(unet), **VARIANTS[name])
            outs = [merged(*b, return_dict=False)[0] for b in batches]
            num = sum(float((o - e).square().sum()) for o, e in zip(outs, exact, strict=True))
            den = sum(float(e.square().sum()) for e in exact)
            errors[name] = (num / den) ** 0.5
    return errors


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def render(result: dict) -> str:
    rows = result["variants"]
    base, base_min, base_cpu = rows[0]["median_s"], rows[0]["min_s"], rows[0].get("cpu_median_s")
    threads = f"{result['ov_threads']} inference thread(s) ({result.get('threads_source', 'OpenVINO default')})"
    lines = [
        f"Int8 UNet step, {result['model']}; OpenVINO {result['openvino'].split('-')[0]}, precision of the "
        f"non-int8 ops {result['inference_precision']} (OpenVINO default on this CPU), {threads}; "
        f"median of {result['runs']} round-robin runs after {result['warmup']} warm-up; {result['load']}",
        "",
        "| variant | settings | wall s/step (median) | (min) | CPU s/step (median) | speed-up vs int8: wall median "
        "| wall min | CPU median | error vs exact (reference model) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = "" if r["merge_error"] is None else f"{100 * r['merge_error']:.1f} %"
        cpu, cpu_speedup = "", ""
        if r.get("cpu_median_s"):
            cpu, cpu_speedup = f"{r['cpu_median_s']:.2f}", f"{base_cpu / r['cpu_median_s']:.2f}x"
        lines.append(
            f"| {r['name']} | {r['settings']} | {r['median_s']:.2f} | {r['min_s']:.2f} | {cpu} | "
            f"{base / r['median_s']:.2f}x | {base_min / r['min_s']:.2f}x | {cpu_speedup} | {err} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of: {', '.join(VARIANTS)}")
    p.add_argument("--unet", choices=("sd15", "tiny"), default="sd15", help="sd15 (default) or tiny (smoke test)")
    p.add_argument("--runs", type=int, default=7, help="timed runs per variant (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per variant first (default 2)")
    p.add_argument("--threads", type=int, default=0, help="OpenVINO inference threads (default 0: OpenVINO's own)")
    p.add_argument("--calib-samples", type=int, default=2, help="random NNCF calibration inputs (default 2)")
    p.add_argument("--cache-dir", default="outputs/tome_speed_ir", help="where the int8 IRs are kept")
    p.add_argument("--rebuild", action="store_true", help="rebuild IRs that are already in --cache-dir")
    p.add_argument("--no-error", action="store_true", help="skip the error measurement on the reference model")
    p.add_argument("--output-json", default=str(ROOT / "benchmarks" / "tome_speed.json"))
    p.add_argument("--output-md", default=None, help="default: next to the JSON")
    p.add_argument("--report-from", help="re-render the table of an earlier --output-json (no run)")
    p.add_argument("--build-one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.report_from:
        print(render(json.loads(Path(args.report_from).read_text())))
        return
    if args.build_one:
        build_one(
            args.build_one, args.unet, Path(args.cache_dir) / args.unet / f"{args.build_one}.xml", args.calib_samples
        )
        return
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if names[0] != "int8":
        names.insert(0, "int8")  # the baseline every speed-up is relative to
    infos = {n: ensure_ir(n, args) for n in names}
    load_before = os.getloadavg()
    times, cpu = time_variants(names, infos, args)
    load_after = os.getloadavg()
    errors = {} if args.no_error else merge_errors(names)
    import openvino as ov

    core = ov.Core()
    result = {
        "model": "SD 1.5 UNet architecture (random weights), 512 px: latents 2x4x64x64, text 2x77x768"
        if args.unet == "sd15"
        else "tiny UNet (smoke test)",
        "openvino": ov.get_version(),
        "inference_precision": core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name(),
        "ov_threads": args.threads or core.get_property("CPU", "INFERENCE_NUM_THREADS") or os.cpu_count(),
        "threads_source": "--threads" if args.threads else "OpenVINO default",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "runs": args.runs,
        "warmup": args.warmup,
        "load": f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after timing "
        f"({os.cpu_count()} cores, shared with other jobs)",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tome_speed.py " + " ".join(argv or sys.argv[1:]),
        "variants": [
            {
                "name": n,
                "settings": settings(VARIANTS[n]),
                "tome": VARIANTS[n],
                "median_s": statistics.median(times[n]),
                "min_s": min(times[n]),
                "times_s": [round(t, 4) for t in times[n]],
                "cpu_median_s": statistics.median(cpu[n]),
                "cpu_times_s": [round(t, 4) for t in cpu[n]],
                "speedup_vs_int8": statistics.median(times["int8"]) / statistics.median(times[n]),
                "merge_error": errors.get(n),
                **infos[n],
            }
            for n in names
        ],
    }
    table = render(result)
    print(table)
    out_json = Path(args.output_json)
    out_md = Path(args.output_md) if args.output_md else out_json.with_suffix(".md")
    for path, text in ((out_json, json.dumps(result, indent=1)), (out_md, f"# Token merging speed\n\n{table}")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # never a half-written result


if __name__ == "__main__":
    main()
