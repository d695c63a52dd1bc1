"""The SD 1.5-sized tiny decoder at several widths, with and without the global-context blocks, timed at 512 px in
one process (f32 and full int8 IRs).

    python benchmarks/tiny_decoder_width.py [--widths 64 96] [--global-context] [--threads 1] [--rounds 5]

`ov-sd bench --arch sd15` times the default decoder only. This builds each one as the bench does
(`eval.bench.fewstep.build_tiny_decoders`: random weights, the export's conversion, full int8 calibrated on random
latents), for the SD 1.5 VAE at each width (and with `--global-context`, each width again with the blocks; without,
TAESD's architecture), latents 1x4x64x64, OpenVINO LATENCY hint. Every IR is compiled and warmed up first, then timed
in `--rounds` interleaved rounds (one call of each per round), so that a host's drift hits every row alike: best and
median per IR. Prints a table; ratios are of the best times, to the first row, in the same process."""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov

from ov_sd_trainer.eval.bench.fewstep import TINY_F32, TINY_INT8, build_tiny_decoders

SD15_VAE = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4, "out_channels": 3,
            "scaling_factor": 0.18215}  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 96])
    p.add_argument("--global-context", action="store_true", help="also time each width with global_context=True")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed calls of each IR")
    args = p.parse_args()
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY"}
    x = np.random.RandomState(0).randn(1, 4, 64, 64).astype(np.float32)
    rows, irs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for width in args.widths:
            for context in (False, True) if args.global_context else (False,):
                name = f"{width}" + (" + global context" if context else "")
                out = Path(tmp) / name.replace(" ", "")
                out.mkdir()
                info = build_tiny_decoders(SD15_VAE, out, x.shape[2:], width=width, global_context=context)
                rows.append((name, info["parameters"]))
                for mode, ir in (("none", TINY_F32), ("full", TINY_INT8)):
                    irs[name, mode] = core.compile_model(out / f"{ir}.xml", "CPU", config)
                    irs[name, mode](x)  # warm-up
    times = {key: [] for key in irs}
    for _ in range(args.rounds):
        for key, compiled in irs.items():
            t = time.perf_counter()
            compiled(x)
            times[key].append(time.perf_counter() - t)
    best = {key: min(v) for key, v in times.items()}
    median = {key: float(np.median(v)) for key, v in times.items()}
    first = rows[0][0]
    print(
        "| decoder width | parameters | f32 s: best / median | full int8 s: best / median | f32 x first | int8 x first |"
    )
    print("|---|---|---|---|---|---|")
    for name, params in rows:
        f32, int8 = (name, "none"), (name, "full")
        print(
            f"| {name} | {params / 1e6:.2f} M | {best[f32]:.3f} / {median[f32]:.3f} | {best[int8]:.3f} / "
            f"{median[int8]:.3f} | {best[f32] / best[first, 'none']:.2f} | {best[int8] / best[first, 'full']:.2f} |"
        )


if __name__ == "__main__":
    main()
