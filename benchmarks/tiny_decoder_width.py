"""The SD 1.5-sized tiny decoder at several widths, with and without the global-context blocks, timed at 512 px in
one process (f32 and full int8 IRs).

    python benchmarks/tiny_decoder_width.py [--widths 64 96] [--global-context] [--threads 1]

`ov-sd bench --arch sd15` times the default decoder only. This times `TinyDecoder(decoder_config(SD 1.5 VAE, width))`
(and with `--global-context`, each width again with `global_context=True`)
with random weights, converted and quantized as the export does (`export.tiny_decoder.convert_tiny_decoder`,
`compress_int8(..., "full")` calibrated on 8 random latents), latents 1x4x64x64, OpenVINO LATENCY hint: best of 3
calls after a warm-up. Prints a table; ratios are to the first row, in the same process."""

import argparse
import time

import numpy as np
import openvino as ov
import torch

from ov_sd_trainer.export.tiny_decoder import compress_int8, convert_tiny_decoder
from ov_sd_trainer.tiny_decoder import TinyDecoder, decoder_config

SD15_VAE = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4, "out_channels": 3,
            "scaling_factor": 0.18215}  # fmt: skip


def best_of(compiled, x, calls: int = 3) -> float:
    compiled(x)  # warm-up
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        compiled(x)
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 96])
    p.add_argument("--global-context", action="store_true", help="also time each width with global_context=True")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY"}
    x = np.random.RandomState(0).randn(1, 4, 64, 64).astype(np.float32)
    calibration = np.random.RandomState(1).randn(8, 4, 64, 64).astype(np.float32)
    rows = []
    for width in args.widths:
        for context in (False, True) if args.global_context else (False,):
            torch.manual_seed(0)
            decoder = TinyDecoder(decoder_config(SD15_VAE, width, global_context=context))
            params = sum(p.numel() for p in decoder.parameters())
            times = {mode: best_of(core.compile_model(compress_int8(convert_tiny_decoder(decoder), mode, calibration),
                                                      "CPU", config), x)
                     for mode in ("none", "full")}  # fmt: skip
            rows.append((f"{width}" + (" + global context" if context else ""), params, times))
    base = rows[0][2]
    print("| decoder width | parameters | f32 s | full int8 s | f32 x first | int8 x first |")
    print("|---|---|---|---|---|---|")
    for name, params, t in rows:
        print(f"| {name} | {params / 1e6:.2f} M | {t['none']:.3f} | {t['full']:.3f} | "
              f"{t['none'] / base['none']:.2f} | {t['full'] / base['full']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
