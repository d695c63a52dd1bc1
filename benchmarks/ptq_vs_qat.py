"""PTQ vs QAT on the reference model: does QAT with distillation recover the quality that 8-bit PTQ loses?

One command, reproducible:

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ptq_vs_qat.py --threads 1 --output docs/eval --overwrite

1. PTQ peer: if `--ptq` (default outputs/reference-ptq-int8) does not exist (or with `--redo-ptq`), quantizes the
   reference model with optimum-intel's own full-int8 PTQ at optimum's defaults
   (`ov_sd_trainer.eval.ptq.quantize_pipeline_int8`: 200 UNet calls of calibration at 50 steps, the 132 synthetic
   captions as prompts, seed 0). `--ptq-overflow-fix` adds the same PTQ with overflow_fix=enable (NAME-ofix).
   Variant folders older than the reference's UNet weights are refused (they belong to an earlier model).
2. QAT: `--qat` (default outputs/reference-int8/openvino, what `ov-sd train --recipe reference-int8`
   exports); QAT+ToMe: `--qat-tome` (default outputs/reference-tome-int8/openvino), evaluated when it exists.
3. `ov-sd eval` of all of them against the FP32 reference (`fidelity.evaluate_fidelity`, default 132 prompts x 3
   seeds, 25 steps, guidance 7.5, OpenVINO f32), then a paired bootstrap comparison of QAT (and QAT+ToMe) against
   PTQ on every metric (`stats.paired_comparison`).

Writes, atomically, the `ov-sd eval` outputs plus `ptq_vs_qat.md` / `ptq_vs_qat.json` into `--output`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ov_sd_trainer.errors import UserError  # noqa: E402
from ov_sd_trainer.eval import fidelity, report, stats  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--reference", default=str(ROOT / "ov_sd_trainer/assets/reference"))
    p.add_argument("--qat", default=str(ROOT / "outputs/reference-int8/openvino"))
    p.add_argument("--qat-tome", default=str(ROOT / "outputs/reference-tome-int8/openvino"))
    p.add_argument("--ptq", default=str(ROOT / "outputs/reference-ptq-int8"), help="made here when missing")
    p.add_argument("--output", default=str(ROOT / "docs/eval"))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=33)
    p.add_argument("--unet-samples", type=int, default=64)
    p.add_argument("--precision", choices=fidelity.PRECISIONS, default="f32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--ptq-overflow-fix", action="store_true",
                   help="also evaluate PTQ with overflow_fix=enable (made next to --ptq as NAME-ofix)")  # fmt: skip
    p.add_argument("--redo-ptq", action="store_true", help="quantize again even when the PTQ folders exist")
    p.add_argument("--update-cards", action="store_true", help="write the results into the QAT folders' cards")
    args = p.parse_args(argv)
    try:
        run(args)
    except UserError as exc:
        print(f"ptq_vs_qat: error: {exc}", file=sys.stderr)
        return 2
    return 0


def make_ptq(reference: str, output: Path, threads: int | None, overflow_fix: str) -> float:
    """optimum-intel full-int8 PTQ at optimum's defaults; `overflow_fix` "enable" is the one change from them.

    `ptq.quantize_pipeline_int8` builds optimum's `OVQuantizationConfig` with its default overflow_fix="disable";
    the variant swaps in a subclass whose default is "enable" (7-bit weights, what QAT uses on CPUs without VNNI,
    see docs/fidelity.md), so everything else stays identical. ptq_info.json records it."""
    import optimum.intel

    from ov_sd_trainer.eval.prompts import calibration_prompts as synthetic_prompts
    from ov_sd_trainer.eval.ptq import quantize_pipeline_int8

    print(f"PTQ (optimum-intel defaults, overflow_fix={overflow_fix}) of {reference} -> {output}")
    original = optimum.intel.OVQuantizationConfig

    class _Config(original):
        def __init__(self, *a, **kw):
            kw.setdefault("overflow_fix", overflow_fix)
            super().__init__(*a, **kw)

    t = time.perf_counter()
    optimum.intel.OVQuantizationConfig = _Config
    try:
        quantize_pipeline_int8(
            reference,
            output,
            synthetic_prompts(0),
            ov_config={"INFERENCE_NUM_THREADS": threads} if threads else None,
            overwrite=True,  # only reached when the folder is missing or --redo-ptq asks for it
        )
    finally:
        optimum.intel.OVQuantizationConfig = original
    return round(time.perf_counter() - t, 1)


def check_not_stale(reference: Path, models: list[tuple[str, Path]]) -> None:
    """Every variant must be made from the current reference: a folder older than the reference's UNet weights
    (e.g. after `ov-sd make-reference` retrained it) compares another model."""
    weights = [p.stat().st_mtime for p in (reference / "unet").glob("*.safetensors")]
    if not weights:
        return
    for name, folder in models:
        xml = folder / "unet" / "openvino_model.xml"
        if xml.is_file() and xml.stat().st_mtime < max(weights):
            fix = "pass --redo-ptq" if name.startswith("ptq") else "retrain and export it from the current reference"
            raise UserError(f"{name} ({folder}) is older than the reference model's UNet weights; {fix}")


def run(args) -> None:
    from ov_sd_trainer.outputs import check_output_dir

    check_output_dir(args.output, args.overwrite)
    t0 = time.perf_counter()
    ptq = Path(args.ptq)
    ptq_s = {}
    models = [("ptq", ptq)]
    if args.ptq_overflow_fix:
        models.append(("ptq-ofix", ptq.with_name(ptq.name + "-ofix")))
    for name, folder in models:
        if args.redo_ptq or not folder.exists():
            ptq_s[name] = make_ptq(args.reference, folder, args.threads, "enable" if name == "ptq-ofix" else "disable")
    models.append(("qat", Path(args.qat)))
    if Path(args.qat_tome).exists():
        models.append(("qat-tome", Path(args.qat_tome)))
    else:
        print(f"no QAT+ToMe folder at {args.qat_tome}: that row is left out")
    check_not_stale(Path(args.reference), models)
    result, grid_rows = fidelity.evaluate_fidelity(
        args.reference,
        models,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        seeds=args.seeds,
        subset=args.subset,
        batch_size=args.batch_size,
        unet_samples=args.unet_samples,
        precision=args.precision,
        threads=args.threads,
    )
    peers = [n for n, _ in models if n.startswith("ptq")]
    comparisons = {
        f"{name} vs {peer}": stats.paired_comparison(result, name, peer, n_boot=args.bootstrap)
        for name, _ in models
        if not name.startswith("ptq")
        for peer in peers
    }
    result["comparisons"] = comparisons  # also in eval.json / eval.md
    machine = f"{platform.machine()}, {os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f}"
    command = "python benchmarks/ptq_vs_qat.py " + " ".join(sys.argv[1:])
    md = [
        "# PTQ (optimum-intel) vs QAT (ov-sd-trainer) on the reference model",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}; threads {args.threads or 'default'}; total {time.perf_counter() - t0:.0f} s"
        + "".join(f"; {k} made in {v} s" for k, v in ptq_s.items()),
        "",
        report.markdown_table(report.table_rows(result)),
        "",
    ]
    for key, rows in comparisons.items():
        name, peer = key.split(" vs ")
        md += [f"## {key}", "", stats.comparison_markdown(rows, name, peer), ""]
    md.append(
        "margin: how much better the QAT variant is (PSNR in dB, SSIM, MSE of PTQ minus QAT, accuracy in points); "
        "95% interval from a paired bootstrap over the images (over the UNet inputs for the noise MSE)."
    )
    extra = {
        "ptq_vs_qat.md": "\n".join(md) + "\n",
        "ptq_vs_qat.json": json.dumps(
            report._jsonable(dict(command=command, machine=machine, ptq_s=ptq_s, comparisons=comparisons)),
            indent=1,
        )
        + "\n",
    }
    side = max(result["settings"]["height"], result["settings"]["width"])
    report.write_outputs(args.output, result, grid_rows, max(1, 128 // side), args.overwrite, extra_files=extra)
    print(extra["ptq_vs_qat.md"])
    if args.update_cards:
        for folder in report.update_cards(
            result, [m for n, m in models if not n.startswith("ptq") and (m / "README.md").is_file()]
        ):
            print(f"model card updated: {folder / 'README.md'}")


if __name__ == "__main__":
    sys.exit(main())
