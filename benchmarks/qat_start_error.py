"""Why the calibrated QAT student starts far from its teacher: one-step error of each quantization setting.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/qat_start_error.py --output docs/fidelity/start_error.json

For the bundled reference model, every variant below is built from the same FP32 UNet and measured on the same fixed,
held-out UNet inputs (`train.teacher_gap`: 32 held-out images noised at evenly spread timesteps, their captions):
the noise-prediction MSE against the FP32 PyTorch teacher, for the PyTorch student (fake quantization) and for its
OpenVINO IR (saved, read back, compiled at f32 for the float parts: what an export runs). Variants:

- QAT students (`compress.quantize.quantize_unet`) with the training defaults, then one setting changed at a time:
  the overflow fix (7-bit weights) off, SmoothQuant on, calibration inputs drawn along sampling trajectories (as
  optimum's PTQ collects them) instead of training images at uniform random timesteps, and the `hybrid` scheme;
- optimum-intel's PTQ peers (`eval.ptq`: full int8 and hybrid), calibrated with the same trajectory inputs.

Prints a table and writes the numbers as JSON. Nothing here trains.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ov_sd_trainer.assets import reference_model_path  # noqa: E402
from ov_sd_trainer.compress import convert, quantize  # noqa: E402


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())


def _ov_predict(xml: Path, items: dict, threads: int) -> np.ndarray:
    """The IR at `xml` (a folder's unet/openvino_model.xml) on the held-out items, float parts in f32."""
    from ov_sd_trainer.eval.metrics import ov_unet_noise

    inputs = {k: items[k].numpy() for k in ("sample", "timestep", "encoder_hidden_states")}
    return ov_unet_noise(
        xml.parent.parent, inputs, {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    )


@torch.no_grad()
def _torch_predict(unet, items: dict) -> np.ndarray:
    unet.eval()
    return np.concatenate(
        [
            unet(
                items["sample"][i : i + 8],
                items["timestep"][i : i + 8],
                items["encoder_hidden_states"][i : i + 8],
                return_dict=False,
            )[0]
            .float()
            .numpy()  # fmt: skip
            for i in range(0, len(items["sample"]), 8)
        ]
    )


def trajectory_inputs(num: int, steps: int, threads: int) -> list[dict]:
    """UNet inputs recorded along sampling trajectories of the OpenVINO FP32 export (optimum's PTQ collector)."""
    from ov_sd_trainer.eval.prompts import calibration_prompts
    from ov_sd_trainer.eval.ptq import collect_unet_inputs, load_ov_pipeline_for_ptq

    pipe = load_ov_pipeline_for_ptq(reference_model_path(), {"INFERENCE_NUM_THREADS": threads})
    data = collect_unet_inputs(pipe, calibration_prompts(0), num, steps=steps, progress=False)
    items = []
    for d in data:
        sample = torch.from_numpy(np.asarray(d["sample"])).float()
        t = torch.from_numpy(np.asarray(d["timestep"])).long().reshape(-1).expand(sample.shape[0]).contiguous()
        items.append({"sample": sample, "timestep": t, "encoder_hidden_states": torch.from_numpy(
            np.asarray(d["encoder_hidden_states"])).float()})  # fmt: skip
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default=None, help="JSON file for the numbers")
    p.add_argument("--heldout", type=int, default=32)
    p.add_argument("--calibration-samples", type=int, default=300, help="training-data calibration (QAT's default)")
    p.add_argument("--trajectory-samples", type=int, default=100, help="UNet calls along sampling trajectories")
    p.add_argument("--trajectory-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="comma list of variant names to run ('none' for none)")
    p.add_argument("--folder", action="append", default=[], metavar="NAME=DIR",
                   help="also measure the UNet IR of an existing OpenVINO pipeline folder (repeatable)")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ov_sd_trainer.train.config import parse_config
    from ov_sd_trainer.train.run import build_model, prepare_dataset
    from ov_sd_trainer.train.teacher_gap import build_teacher_gap_set
    from ov_sd_trainer.train.unet_inputs import collect_calibration_inputs, collect_trajectory_inputs

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="qat-start-"))
    cfg, _ = parse_config(["--recipe", "reference-int8", "--output_dir", str(tmp / "run"), "--use_cpu", "true"])
    model, pipe = build_model(cfg)
    teacher = model.teacher
    gap = build_teacher_gap_set(model, pipe.tokenizer, args.heldout, cfg.seed, cfg.resolution)
    items = gap.items
    ref = _torch_predict(teacher, items)
    train_ds, _ = prepare_dataset(cfg, pipe.tokenizer)
    random_t = collect_calibration_inputs(model, train_ds, args.calibration_samples, cfg.seed, "cpu")
    captions = list(train_ds.with_format(None)[cfg.caption_column])
    torch_traj = collect_trajectory_inputs(pipe, captions, args.trajectory_samples, cfg.resolution, cfg.seed,
                                           steps=args.trajectory_steps)  # fmt: skip
    traj = (
        trajectory_inputs(args.trajectory_samples, args.trajectory_steps, args.threads) if args.only != "none" else []
    )
    rows = []
    for spec in args.folder:
        name, _, folder = spec.partition("=")
        xml = Path(folder) / "unet" / "openvino_model.xml"
        ov_mse = _mse(_ov_predict(xml, items, args.threads), ref)
        rows.append(dict(variant=name, torch_mse=None, openvino_mse=ov_mse, unet_bytes=xml.with_suffix(".bin")
                         .stat().st_size, seconds=0))  # fmt: skip
        print(f"{name}: openvino {ov_mse:.5f}", flush=True)

    variants = {
        "qat default (train data, random t; overflow fix on; SmoothQuant off)": dict(calib=random_t),
        "overflow fix off (8-bit weights)": dict(calib=random_t, overflow_fix="disable"),
        "SmoothQuant on": dict(calib=random_t, smooth_quant=True),
        "calibration along trajectories": dict(calib=traj),
        "trajectories of the PyTorch teacher (calibration_source=trajectories)": dict(calib=torch_traj),
        "trajectories + overflow fix off": dict(calib=traj, overflow_fix="disable"),
        "trajectories + overflow off + SmoothQuant": dict(calib=traj, overflow_fix="disable", smooth_quant=True),
        "scheme hybrid (trajectories)": dict(calib=traj, scheme="hybrid"),
        "scheme hybrid (train data)": dict(calib=random_t, scheme="hybrid"),
    }
    only = set(args.only.split(",")) if args.only else None
    for name, kw in variants.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        calib = kw.pop("calib")
        student = quantize.quantize_unet(teacher, calib, **kw)
        torch_mse = _mse(_torch_predict(student, items), ref)
        xml = tmp / name.replace(" ", "_").replace("/", "-") / "unet" / "openvino_model.xml"
        xml.parent.mkdir(parents=True)
        import openvino as ov

        ov.save_model(convert.convert_unet_to_openvino(student, example_inputs=calib[0]), xml, compress_to_fp16=False)
        ov_mse = _mse(_ov_predict(xml, items, args.threads), ref)
        rows.append(dict(variant=name, torch_mse=torch_mse, openvino_mse=ov_mse, unet_bytes=xml.with_suffix(".bin")
                         .stat().st_size, seconds=round(time.perf_counter() - t0, 1)))  # fmt: skip
        print(f"{name}: torch {torch_mse:.5f}, openvino {ov_mse:.5f}", flush=True)
        del student

    from ov_sd_trainer.eval.prompts import calibration_prompts
    from ov_sd_trainer.eval.ptq import quantize_pipeline_int8

    for mode in ("full", "hybrid"):
        name = f"optimum-intel PTQ {mode} (trajectories)"
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        folder = tmp / f"ptq-{mode}"
        quantize_pipeline_int8(reference_model_path(), folder, calibration_prompts(0), num_samples=args.trajectory_samples,
                               steps=args.trajectory_steps, mode=mode, progress=False,
                               ov_config={"INFERENCE_NUM_THREADS": args.threads})  # fmt: skip
        xml = folder / "unet" / "openvino_model.xml"
        ov_mse = _mse(_ov_predict(xml, items, args.threads), ref)
        rows.append(dict(variant=name, torch_mse=None, openvino_mse=ov_mse, unet_bytes=xml.with_suffix(".bin")
                         .stat().st_size, seconds=round(time.perf_counter() - t0, 1)))  # fmt: skip
        print(f"{name}: openvino {ov_mse:.5f}", flush=True)

    lines = ["| variant | PyTorch student MSE | OpenVINO IR MSE | UNet .bin (MB) |", "|---|---|---|---|"]
    for r in rows:
        tm = "—" if r["torch_mse"] is None else f"{r['torch_mse']:.5f}"
        lines.append(f"| {r['variant']} | {tm} | {r['openvino_mse']:.5f} | {r['unet_bytes'] / 1e6:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(
            command="python benchmarks/qat_start_error.py " + " ".join(sys.argv[1:] if argv is None else argv),
            machine=dict(cpu=platform.processor() or platform.machine(), threads=args.threads),
            heldout=args.heldout, rows=rows, table=table, seconds=round(time.perf_counter() - t_start, 1),
        ), indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
