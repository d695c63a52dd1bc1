"""Step caching (DeepCache): image quality per cache interval and UNet time per call. Prints tables, writes JSON.

    # quality on an OpenVINO folder with unet_deepcache/ (ov-sd deepcache --run RUN_DIR), 22 prompts x 1 seed
    python benchmarks/deepcache_quality.py quality --model /tmp/dc-run/openvino --prompts 22 --steps 25 \
        --intervals 1 2 3 5 --output benchmarks/deepcache_quality.json
    # per-call time of the plain / full / shallow UNet on the SD 1.5 architecture (random weights), 512 px, batch 2
    python benchmarks/deepcache_quality.py sd15-timing --work-dir /tmp/dc-sd15 --output benchmarks/deepcache_sd15.json

Quality: images at each interval against the interval-1 images (the plain pipeline), same prompts and initial
latents (`eval.generate.initial_latents`), PSNR/SSIM by `eval.metrics.image_fidelity`. Time: each IR compiled with
the same static shapes, the median of `--repeats` inferences on fixed inputs (a shared machine: indicative).
The projected UNet time per image composes the measured per-call times for a schedule of N UNet calls.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cpu_flags() -> list[str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    import re

    return sorted(set(re.findall(r"avx512_vnni|avx512_bf16|amx_\w+|avx2", out)))


def time_irs(folder: Path, batch: int, side: int, text_len: int, repeats: int, ov_config: dict) -> dict:
    """Median seconds per call of unet/ (plain), full.xml and shallow.xml at one static shape."""
    import openvino as ov

    from ov_sd_trainer.compress.deepcache import DEEP_FEATURE_NAME
    from ov_sd_trainer.export.deepcache import FULL_XML, SHALLOW_XML
    from ov_sd_trainer.pipeline_folder import UNET_XML, unet_config

    cfg = unet_config(folder)
    core = ov.Core()
    rng = np.random.default_rng(0)
    x = {
        "sample": rng.standard_normal((batch, int(cfg.get("in_channels", 4)), side, side), dtype=np.float32),
        "timestep": np.array([500], dtype=np.int64),
        "encoder_hidden_states": rng.standard_normal(
            (batch, text_len, int(cfg["cross_attention_dim"])), dtype=np.float32
        ),  # fmt: skip
    }
    shapes = {k: list(v.shape) for k, v in x.items()}
    out = {}
    feature = None
    for name, xml in (("plain", UNET_XML), ("full", FULL_XML), ("shallow", SHALLOW_XML)):
        model = core.read_model(folder / xml)
        model_shapes = {p: shapes[p.get_any_name()] for p in model.inputs if p.get_any_name() in shapes}
        inputs = dict(x)
        if name == "shallow":
            model_shapes[model.input(DEEP_FEATURE_NAME)] = list(feature.shape)
            inputs[DEEP_FEATURE_NAME] = feature
        model.reshape(model_shapes)
        compiled = core.compile_model(model, "CPU", ov_config)
        request = compiled.create_infer_request()
        result = request.infer(inputs)  # warm-up
        if name == "full":
            feature = np.array(result[compiled.output(DEEP_FEATURE_NAME)], copy=True)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            request.infer(inputs)
            times.append(time.perf_counter() - t0)
        out[name] = {"median_s": statistics.median(times), "min_s": min(times), "runs": times}
        del request, compiled
    return out


def projection(per_call: dict, calls: int, intervals: list[int]) -> list[dict]:
    """UNet seconds per image for `calls` UNet calls at each interval, composed from the measured per-call times."""
    rows = []
    plain, full, shallow = (per_call[k]["median_s"] for k in ("plain", "full", "shallow"))
    for n in intervals:
        n_full = math.ceil(calls / n)
        n_shallow = calls - n_full
        unet_s = plain * calls if n == 1 else n_full * full + n_shallow * shallow
        rows.append({"interval": n, "full_calls": n_full if n > 1 else 0, "shallow_calls": n_shallow,
                     "unet_s_per_image": unet_s, "speedup_vs_plain": plain * calls / unet_s})  # fmt: skip
    return rows


def quality(args) -> dict:
    from tqdm.auto import tqdm

    from ov_sd_trainer.eval.deepcache_pipeline import load_deepcache_pipeline
    from ov_sd_trainer.eval.generate import initial_latents
    from ov_sd_trainer.eval.metrics import image_fidelity, images_to_uint8
    from ov_sd_trainer.eval.prompts import jobs_for
    from ov_sd_trainer.export.deepcache import read_info
    from ov_sd_trainer.pipeline_folder import geometry

    folder = Path(args.model).resolve()
    geo = geometry(folder)
    side = geo["size"]
    ov_config = {"INFERENCE_NUM_THREADS": str(args.threads)} if args.threads else {}
    pipe = load_deepcache_pipeline(folder, side, side, ov_config=ov_config or None)
    pipe.set_progress_bar_config(disable=True)
    jobs = jobs_for(args.prompts, args.seeds)
    latents = initial_latents(jobs, (geo["in_channels"], side // geo["vae_factor"], side // geo["vae_factor"]))
    sets, unet_time = {}, {}
    for n in args.intervals:
        before = dict(pipe.deepcache_stats)
        images = []
        t0 = time.perf_counter()
        for job, lat in tqdm(list(zip(jobs, latents, strict=True)), desc=f"interval {n}"):
            images.append(pipe(job["prompt"], num_inference_steps=args.steps, guidance_scale=args.guidance,
                               latents=lat[None].clone(), cache_interval=n).images[0])  # fmt: skip
        wall = time.perf_counter() - t0
        sets[n] = images_to_uint8(images)
        s = pipe.deepcache_stats
        calls = {k: s[k] - before[k] for k in ("full", "shallow", "full_s", "shallow_s")}
        unet_time[n] = {"pipeline_s_per_image": wall / len(jobs), **calls}
        if args.save_grid:
            Path(args.save_grid).mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(images[:8]):
                im.save(Path(args.save_grid) / f"interval{n}_{i}.png")
    rows = []
    for n in args.intervals:
        fid = image_fidelity(sets[args.intervals[0]], sets[n])
        per = fid["per_image"]["psnr"]
        rows.append({"interval": n, "psnr_db": fid["psnr"], "psnr_mean_per_image_db": fid["psnr_mean_per_image"],
                     "psnr_min_db": min(per), "ssim": fid["ssim"], **unet_time[n]})  # fmt: skip
    per_call = time_irs(folder, 2, side // geo["vae_factor"], 77, args.repeats, ov_config)
    calls = args.steps + 1  # PNDM: one more UNet call than steps (PLMS warm-up)
    return {
        "model": str(folder),
        "deepcache": {k: v for k, v in read_info(folder).items() if k in ("source", "quantized", "irs")},
        "prompts": len(jobs), "steps": args.steps, "guidance": args.guidance, "reference_interval": args.intervals[0],
        "rows": rows,
        "per_call_batch2": {k: {kk: vv for kk, vv in v.items() if kk != "runs"} for k, v in per_call.items()},
        "projected_50_steps": projection(per_call, 50, args.intervals),
        "projected_this_run": projection(per_call, calls, args.intervals),
        "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(),
        "load_average": os.getloadavg(), "threads": args.threads or "default",
    }  # fmt: skip


def sd15_timing(args) -> dict:
    """SD 1.5 architecture, random weights: optimum export of the UNet is skipped; the plain UNet IR is converted by
    `compress.convert.convert_unet_to_openvino` (as the project's exports are) and the two step-caching IRs by
    `export.deepcache.convert_deepcache_unet`, all FP32, into a folder `time_irs` reads."""
    import openvino as ov
    import torch

    from ov_sd_trainer.assets.builders import build_sd15_unet
    from ov_sd_trainer.compress.convert import convert_unet_to_openvino
    from ov_sd_trainer.export.deepcache import DEEPCACHE_DIR, FULL_XML, SHALLOW_XML, convert_deepcache_unet
    from ov_sd_trainer.pipeline_folder import UNET_XML

    work = Path(args.work_dir)
    if not all((work / x).is_file() for x in (UNET_XML, FULL_XML, SHALLOW_XML)):
        (work / "unet").mkdir(parents=True, exist_ok=True)
        (work / DEEPCACHE_DIR).mkdir(parents=True, exist_ok=True)
        unet = build_sd15_unet(0).eval()
        (work / "unet" / "config.json").write_text(json.dumps(dict(unet.config), default=str))
        with torch.no_grad():
            ov.save_model(convert_unet_to_openvino(unet), work / UNET_XML, compress_to_fp16=False)
            full, shallow = convert_deepcache_unet(unet)
        ov.save_model(full, work / FULL_XML, compress_to_fp16=False)
        ov.save_model(shallow, work / SHALLOW_XML, compress_to_fp16=False)
        del unet
    results = {}
    for precision in args.precisions:
        cfg = {"INFERENCE_PRECISION_HINT": precision} if precision != "default" else {}
        if args.threads:
            cfg["INFERENCE_NUM_THREADS"] = str(args.threads)
        per_call = time_irs(work, 2, 64, 77, args.repeats, cfg)
        results[precision] = {
            "per_call_batch2_512px": {k: {kk: vv for kk, vv in v.items() if kk != "runs"} for k, v in per_call.items()},
            "shallow_over_full": per_call["shallow"]["median_s"] / per_call["full"]["median_s"],
            "projected_50_steps": projection(per_call, 50, args.intervals),
        }
    return {"arch": "sd15 (random weights), FP32 IRs", "results": results, "cpu_flags": cpu_flags(),
            "load_average": os.getloadavg(), "threads": args.threads or "default"}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--model", required=True, help="OpenVINO folder with unet_deepcache/")
    q.add_argument("--prompts", type=int, default=22)
    q.add_argument("--seeds", type=int, default=1)
    q.add_argument("--steps", type=int, default=25)
    q.add_argument("--guidance", type=float, default=7.5)
    q.add_argument("--save-grid", default=None, help="folder for the first 8 images of each interval")
    t = sub.add_parser("sd15-timing")
    t.add_argument("--work-dir", required=True)
    t.add_argument("--precisions", nargs="+", default=["default", "f32"])
    for s in (q, t):
        s.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 5])
        s.add_argument("--repeats", type=int, default=5)
        s.add_argument("--threads", type=int, default=0, help="OpenVINO inference threads (0: its default)")
        s.add_argument("--output", default=None, help="write the results as JSON")
    args = p.parse_args()
    result = quality(args) if args.mode == "quality" else sd15_timing(args)
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
