"""GPU check: peak memory and time of SD 1.5 QAT steps beside the plain fine-tune step, per fake-quantize kernel path.

    python benchmarks/gpu_check.py --output DIR [--device cuda|cpu] [--size sd15|tiny]

One optimizer step = batch 1 x gradient accumulation 4 at 512 px (SD 1.5 size) through the trainer's loss
(`train.losses.QATModel`: frozen VAE + text encoder, task MSE + distillation MSE to the frozen FP32 teacher), then
8-bit AdamW (bitsandbytes) and the EMA update on the CPU (`train.ema.EMACallback`), as `ov-sd train` runs it. The
models are the SD 1.5 architecture with random weights built locally (`assets.builders.build_sd15_pipeline`;
nothing downloads): time and memory do not depend on weight values. Rows, each with and without gradient
checkpointing (`compress.checkpointing`):

* plain: the unquantized UNet fine-tuned on the task loss (no teacher, no quantizers): the baseline;
* qat/extension: the NNCF-quantized student with NNCF's compiled fake-quantize extension;
* qat/reference: the same student with NNCF's pure-torch reference functions (`compress.kernels`).

Writes DIR/results.json and DIR/results.md: peak memory (CUDA: `torch.cuda.max_memory_allocated`; CPU: peak
process RSS, sampled), seconds per optimizer step (median of the timed steps, after one warm-up step), ratios to the plain
step with the same checkpointing, and the targets (SD 1.5 on CUDA: peak <= 16 GB with checkpointing and 8-bit Adam;
a QAT step <= 1.4x the plain one). A row that cannot run (no extension, no bitsandbytes, out of memory, the time
limit) is recorded with its reason, never faked. `--device cpu --size tiny` is the smoke test (< 60 s).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GB = 1e9
ACCUM = 4
TARGET_PEAK_GB = 16.0  # with gradient checkpointing and 8-bit Adam, SD 1.5 on CUDA
TARGET_TIME_RATIO = 1.4  # QAT step / plain fine-tune step
SIZES = {"sd15": 512, "tiny": 32}  # image side in pixels


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


class RSSPeak(threading.Thread):
    """Peak resident memory of this process, sampled every 5 ms (the CPU stand-in for max_memory_allocated)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0
        self._stop_event = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def run(self):
        while not self._stop_event.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.peak = self.rss()
        self.start()
        return self

    def __exit__(self, *exc):
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self.rss())


# --------------------------------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------------------------------


def build_models(size: str):
    """(tokenizer, text_encoder, vae, unet, scheduler) with random weights, on the CPU."""
    from diffusers import DDPMScheduler

    from ov_sd_trainer.assets.builders import SD_SCHEDULER_CONFIG, TinySDConfig, build_components, build_sd15_pipeline

    if size == "sd15":
        pipe = build_sd15_pipeline(seed=0)
        parts = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    else:
        # the tests' tiny SD layout (cross-attention, CLIP, KL VAE), smaller still: 32 px -> 8x8 latents
        cfg = TinySDConfig(resolution=32, vae_channels=(16, 32, 32), unet_channels=(16, 32, 32), text_hidden=32,
                           attention_heads=2, seed=0)  # fmt: skip
        parts = build_components(cfg)[:4]
    return (*parts, DDPMScheduler(**SD_SCHEDULER_CONFIG))


def batch(tokenizer, resolution: int, device, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(1, 3, resolution, resolution, generator=g) * 2 - 1
    ids = torch.randint(0, len(tokenizer), (1, tokenizer.model_max_length), generator=g)
    return pixels.to(device), ids.to(device)


def calibration_inputs(unet, n: int = 2):
    """Random UNet inputs at the training latent size: the ranges are meaningless, the memory and time of the
    quantized student are not."""
    import torch

    g = torch.Generator().manual_seed(1)
    h = unet.config.sample_size  # the latent side: 64 for SD 1.5 at 512 px, 8 for the tiny UNet at 32 px
    return [
        {
            "sample": torch.randn(1, unet.config.in_channels, h, h, generator=g),
            "timestep": torch.randint(0, 1000, (1,), generator=g),
            "encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, generator=g),
        }
        for _ in range(n)
    ]


def probe_adam8bit(device) -> str | None:
    """None when bitsandbytes' AdamW8bit steps on `device`, else the reason (the rows then use torch's AdamW)."""
    import torch

    try:
        import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.randn(128, 64, device=device))  # >= 4096 elements: bnb keeps 8-bit state
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.randn_like(p)
        opt.step()
        if not any(v.dtype == torch.uint8 for v in opt.state[p].values() if isinstance(v, torch.Tensor)):
            return f"bitsandbytes {bnb.__version__} kept 32-bit state on {device}"
        return None
    except Exception as e:  # ImportError, no backend for the device, ...
        return f"bitsandbytes AdamW8bit unavailable on {device}: {first_line(e)}"


# --------------------------------------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------------------------------------


def run_row(row: dict, model, trainable, args, device, pixels, ids) -> dict:
    """Warm-up + timed optimizer steps of `model` (a QATModel); fills the row's measurements."""
    import torch

    from ov_sd_trainer.compress import checkpointing
    from ov_sd_trainer.train.ema import EMACallback

    student = model.student
    if row["gradient_checkpointing"]:
        checkpointing.enable_gradient_checkpointing(student)
    else:
        checkpointing.disable_gradient_checkpointing(student)
    params = [p for p in trainable if p.requires_grad]
    if row["optimizer"] == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-6, weight_decay=1e-2)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=1e-2)
    ema = EMACallback(student, decay=0.9999, device="cpu")
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        row["resident_at_start_gb"] = round(torch.cuda.memory_allocated() / GB, 3)
    times, losses, parts = [], [], {"fwd_bwd": [], "optimizer": [], "ema": []}

    def now():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    model.train()
    with RSSPeak() as rss:
        for step in range(args.warmup + args.steps):
            t0 = now()
            for micro in range(ACCUM):
                model.set_noise_seed(0, 0, step * ACCUM + micro)
                with autocast:
                    out = model(pixel_values=pixels, input_ids=ids)
                (out["loss"] / ACCUM).backward()
                losses.append(out["loss"].item())
            t1 = now()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t2 = now()
            ema.step()
            t3 = now()
            if step >= args.warmup:
                times.append(t3 - t0)
                for key, dt in (("fwd_bwd", t1 - t0), ("optimizer", t2 - t1), ("ema", t3 - t2)):
                    parts[key].append(dt)
            log(f"  {row['name']}: step {step + 1}/{args.warmup + args.steps} {t3 - t0:.2f} s "
                f"(fwd+bwd {t1 - t0:.2f}, optimizer {t2 - t1:.2f}, EMA {t3 - t2:.2f})")  # fmt: skip
    if cuda:
        row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / GB, 3)
        row["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 3)
        row["memory_measure"] = "torch.cuda.max_memory_allocated"
    else:
        row["peak_memory_gb"] = round(rss.peak / GB, 3)
        row["memory_measure"] = "peak process RSS (CPU run: not GPU memory)"
    row["s_per_step"] = round(statistics.median(times), 4)
    row["step_times_s"] = [round(t, 4) for t in times]
    row["fwd_bwd_s"] = round(statistics.median(parts["fwd_bwd"]), 4)  # the 4 micro-batches
    row["optimizer_s"] = round(statistics.median(parts["optimizer"]), 4)
    row["ema_s"] = round(statistics.median(parts["ema"]), 4)
    row["last_loss"] = losses[-1]
    if not all(map(lambda v: v == v and abs(v) < float("inf"), losses)):
        raise FloatingPointError(f"non-finite loss: {losses}")
    del optimizer, ema
    checkpointing.disable_gradient_checkpointing(student)
    return row


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------


ROWS = [  # (name, quantized, kernels)
    ("plain", False, None),
    ("qat/extension", True, "extension"),
    ("qat/reference", True, "reference"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="folder for results.json and results.md")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--size", choices=sorted(SIZES), default="sd15", help="sd15 (512 px) or tiny (32 px, smoke test)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per row (default 2; tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps per row first (default 1; tiny 0)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward passes (default: fp32)")
    p.add_argument("--time-limit-s", type=float, default=420.0,
                   help="rows not started by then are recorded as skipped (default 420: the whole check < 8 min)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; tiny: 1)")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.size == "sd15" else 1)
    if args.warmup is None:
        args.warmup = 1 if args.size == "sd15" else 0
    t_start = time.perf_counter()

    import torch

    if args.threads or args.size == "tiny":
        torch.set_num_threads(args.threads or 1)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: error: --device cuda but torch.cuda.is_available() is False; use --device cpu", file=sys.stderr
        )
        return 2
    device = torch.device(args.device)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)

    import nncf

    from ov_sd_trainer.compress import kernels, quantize
    from ov_sd_trainer.errors import UserError
    from ov_sd_trainer.train.losses import QATModel

    env = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nncf": nncf.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
    }
    notes = []

    # which kernel paths exist here: NNCF's extension is built now (as the first quantized forward would), in a
    # thread beside the model construction (the build is ninja/nvcc subprocesses; minutes for CUDA)
    found: dict = {}

    def probe_extension():
        t0 = time.perf_counter()
        try:
            kernels.select_quantize_kernels("extension", device)
            found["reason"] = None
        except UserError as e:
            found["reason"] = str(e)
        except Exception as e:  # anything else NNCF raises: the extension rows are skipped with it
            found["reason"] = first_line(e)
        found["s"] = round(time.perf_counter() - t0, 1)

    probe = threading.Thread(target=probe_extension, daemon=True)
    probe.start()
    adam_reason = probe_adam8bit(device)
    optimizer = "adamw" if adam_reason else "adamw8bit"
    if adam_reason:
        notes.append(f"8-bit Adam skipped, rows use torch AdamW (32-bit state): {adam_reason}")

    resolution = SIZES[args.size]
    t0 = time.perf_counter()
    tokenizer, text_encoder, vae, unet, scheduler = build_models(args.size)
    env["build_models_s"] = round(time.perf_counter() - t0, 1)
    teacher = unet.eval().requires_grad_(False)
    log(f"models built ({sum(p.numel() for p in teacher.parameters()) / 1e6:.1f} M UNet params)")
    probe.join()  # before any timed row: the build must not compete with them
    extension_reason = found["reason"]
    env["extension_load_s"] = found["s"]
    if extension_reason is not None:
        notes.append(f"NNCF extension unavailable: {extension_reason}")
    log(f"extension: {'ok' if extension_reason is None else extension_reason} ({found['s']} s); optimizer {optimizer}")

    vae.to(device)
    text_encoder.to(device)
    pixels, ids = batch(tokenizer, resolution, device)

    rows = []
    for checkpointed in (True, False):  # run order: plain rows first (the baseline), checkpointing first
        for name, quantized, path in ROWS:
            rows.append({
                "name": name, "quantized": quantized, "kernels": path, "gradient_checkpointing": checkpointed,
                "optimizer": optimizer, "bf16_autocast": args.bf16, "status": "pending",
            })  # fmt: skip

    def finish_row(row, run):
        if time.perf_counter() - t_start > args.time_limit_s:
            row.update(status="skipped", reason=f"time limit {args.time_limit_s:.0f} s reached before this row")
            return
        if row["kernels"] == "extension" and extension_reason is not None:
            row.update(status="skipped", reason=extension_reason)
            return
        try:
            run(row)
            row["status"] = "ok"
        except Exception as e:  # out of memory, a kernel failure: recorded, the other rows still run
            row.update(status="failed", reason=first_line(e))
            log(f"  {row['name']} failed: {first_line(e)}")
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # plain rows: the unquantized UNet fine-tuned on the task loss alone (no teacher, no student on the device)
    plain_unet = copy.deepcopy(teacher).requires_grad_(True).to(device)
    plain = QATModel(plain_unet, torch.nn.Identity(), vae, text_encoder, scheduler, distillation_weight=0.0,
                     task_weight=1.0)  # fmt: skip

    def run_plain(row):
        log(f"row {row['name']} (checkpointing {row['gradient_checkpointing']})")
        run_row(row, plain, list(plain_unet.parameters()), args, device, pixels, ids)

    for row in [r for r in rows if not r["quantized"]]:
        finish_row(row, run_plain)
    plain_unet.to("cpu")  # frees its device memory (its gradients were dropped by zero_grad(set_to_none=True))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # the student, quantized on the device with whichever path exists (the extension when it does)
    teacher.to(device)
    t0 = time.perf_counter()
    with kernels.quantize_kernels("extension" if extension_reason is None else "reference", device):
        student = quantize.quantize_unet(teacher, calibration_inputs(teacher), subset_size=2, bias_correction=False)
    env["quantize_s"] = round(time.perf_counter() - t0, 1)
    for p_ in student.parameters():  # as train.run.build: NNCF's integer state stays frozen
        p_.requires_grad_(p_.is_floating_point())
    env["quantizers"] = quantize.count_quantizers(student)
    log(f"student quantized in {env['quantize_s']} s ({env['quantizers']} quantizers)")

    # QAT rows: student + teacher on the device
    qat = QATModel(student, teacher, vae, text_encoder, scheduler, distillation_weight=1.0, task_weight=1.0)

    def run_qat(row):
        with kernels.quantize_kernels(row["kernels"], device) as in_use:
            row["kernels_in_use"] = in_use
            if in_use != row["kernels"]:
                raise RuntimeError(f"asked for the {row['kernels']} path, NNCF's dispatch uses {in_use}")
            log(f"row {row['name']} (checkpointing {row['gradient_checkpointing']})")
            run_row(row, qat, list(student.parameters()), args, device, pixels, ids)

    for row in [r for r in rows if r["quantized"]]:
        finish_row(row, run_qat)

    add_ratios_and_targets(rows, args, device)
    env["total_s"] = round(time.perf_counter() - t_start, 1)
    result = {
        "command": " ".join(["python benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": {
            "size": args.size,
            "resolution": resolution,
            "batch_size": 1,
            "gradient_accumulation": ACCUM,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "optimizer": optimizer,
            "ema_device": "cpu",
            "loss": "task MSE + distillation MSE to the frozen FP32 teacher (plain: task MSE only)",
            "bf16_autocast": args.bf16,
        },  # fmt: skip
        "targets": {
            "peak_gb_with_checkpointing_and_8bit_adam": TARGET_PEAK_GB,
            "qat_step_vs_plain": TARGET_TIME_RATIO,
            "applies": args.size == "sd15" and device.type == "cuda",
        },
        "environment": env,
        "rows": rows,
        "notes": notes,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out_dir / "results.md").write_text(table)
    print("\n" + table)
    log(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'} ({env['total_s']} s)")
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


def add_ratios_and_targets(rows, args, device) -> None:
    applies = args.size == "sd15" and device.type == "cuda"
    for row in rows:
        base = next(
            r for r in rows if r["name"] == "plain" and r["gradient_checkpointing"] == row["gradient_checkpointing"]
        )
        ok = row["status"] == "ok" and base["status"] == "ok"
        row["time_ratio_vs_plain"] = round(row["s_per_step"] / base["s_per_step"], 3) if ok else None
        row["memory_ratio_vs_plain"] = round(row["peak_memory_gb"] / base["peak_memory_gb"], 3) if ok else None
        row["fwd_bwd_ratio_vs_plain"] = round(row["fwd_bwd_s"] / base["fwd_bwd_s"], 3) if ok else None
        checks = {}
        if row["quantized"] and row["status"] == "ok":
            if row["time_ratio_vs_plain"] is not None:
                checks["time"] = row["time_ratio_vs_plain"] <= TARGET_TIME_RATIO
            if row["gradient_checkpointing"] and row["optimizer"] == "adamw8bit":
                checks["peak"] = row["peak_memory_gb"] <= TARGET_PEAK_GB
        row["targets_met"] = checks if applies else None


def markdown(result) -> str:
    cfg, env, targets = result["config"], result["environment"], result["targets"]
    device = env["gpu"] or f"CPU ({env['cpu_count']} cores, {env['torch_threads']} torch threads)"
    mem = "peak GPU memory (GB, max_memory_allocated)" if env["device"] == "cuda" else "peak RSS (GB, CPU process)"
    lines = [
        f"# gpu_check: {cfg['size']} ({cfg['resolution']} px), batch 1 x grad-accum {cfg['gradient_accumulation']}, "
        f"{cfg['optimizer']}, EMA on CPU, {'bf16 autocast' if cfg['bf16_autocast'] else 'fp32'}",
        "",
        f"Device: {device}; torch {env['torch']} (CUDA {env['torch_cuda']}), nncf {env['nncf']}. `{result['command']}`",
        "",
        f"| row | checkpointing | status | {mem} | s/step | time vs plain | memory vs plain | fwd+bwd s (4 micro) "
        "| fwd+bwd vs plain | optimizer s | EMA s | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['status']}: "
                         f"{r.get('reason', '')} |" + " n/a |" * 9)  # fmt: skip
            continue
        met = r.get("targets_met")
        if met is None:
            verdict = "n/a (SD 1.5 on CUDA only)" if r["quantized"] else "baseline"
        else:
            verdict = ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in met.items()) or "baseline"
        lines.append(
            f"| {r['name']} | {'on' if r['gradient_checkpointing'] else 'off'} | ok | {num(r['peak_memory_gb'], '.2f')} "
            f"| {num(r['s_per_step'], '.3f')} | {num(r['time_ratio_vs_plain'], '.2f')}x "
            f"| {num(r['memory_ratio_vs_plain'], '.2f')}x | {num(r['fwd_bwd_s'], '.3f')} "
            f"| {num(r['fwd_bwd_ratio_vs_plain'], '.2f')}x | {num(r['optimizer_s'], '.3f')} | {num(r['ema_s'], '.3f')} "
            f"| {verdict} |"
        )
    lines += [
        "",
        f"Targets (SD 1.5 on CUDA): peak <= {targets['peak_gb_with_checkpointing_and_8bit_adam']:.0f} GB with gradient "
        f"checkpointing and 8-bit Adam; a QAT step <= {targets['qat_step_vs_plain']}x the plain fine-tune step "
        "with the same checkpointing. s/step is the whole optimizer step as the trainer runs it (4 micro-batches, "
        "optimizer, EMA on the CPU: the same EMA cost is in both, so the fwd+bwd column is the stricter ratio).",
        f"Extension load/build {env['extension_load_s']} s, models built in {env['build_models_s']} s, NNCF "
        f"quantization {env['quantize_s']} s ({env['quantizers']} quantizers, 2 random calibration inputs), "
        f"total {env.get('total_s', 'n/a')} s.",
    ]
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
