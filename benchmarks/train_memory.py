"""Memory and time of ONE QAT training step of the SD 1.5-size UNet (CPU measurement + 24 GB GPU projection).

What one step holds, as the trainer runs it (`ov_sd_trainer.train.losses.QATModel.forward`'s loss: task MSE +
distillation MSE to the frozen FP32 teacher):

* the frozen FP32 teacher UNet (SD 1.5's UNet2DConditionModel config, ~859.5 M params, random weights: nothing
  is downloaded),
* the NNCF-quantized student (`compress.quantize.quantize_unet`; calibrated on only `--calib-samples` random inputs to
  keep the run short: the ranges are meaningless, the memory is not),
* its gradients, bitsandbytes AdamW8bit state, an fp32 EMA shadow on CPU (`ema.EMACallback`),
* activations, with gradient checkpointing ON (`compress.checkpointing.enable_gradient_checkpointing`) and OFF.

Inputs are 64x64 latents (512 px), batch 1, and random 77x768 text states fed directly to the UNets: the frozen VAE
and text encoder are NOT part of this measurement (in training they add ~0.33 GB (VAE) + ~0.49 GB (CLIP-L) of
fp32 weights and only run under no_grad).

Each variant runs in a fresh subprocess (peaks do not mix). The parent watches the child's RSS and the machine's
MemAvailable and kills the child when it would exhaust RAM; the variant is then reported as "did not fit" with
whatever was measured before. Components are measured as tensor bytes (params, grads, optimizer state tensors,
EMA shadows); activations as the RSS jump across the forward ("saved") and the peak RSS over forward+backward minus
the RSS before forward minus the gradient bytes allocated so far ("peak"). The GPU column is a PROJECTION, not a
GPU measurement: student + teacher + grads + optimizer state + activation peak (all fp32; the EMA stays in CPU RAM;
CUDA context / allocator overhead, ~0.5-1 GB, not included; bf16 autocast would roughly halve the activations).

Reproduce (2 CPU cores, torch.set_num_threads(1), ~15-25 min):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_memory.py --output-json benchmarks/train_memory.json

Quick smoke test on a tiny UNet: `--unet tiny --resolution 64`. Re-render the table from a saved JSON (no run):
`--report-from benchmarks/train_memory.json --output-json /tmp/t.json`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GiB = 1024**3
ROOT = Path(__file__).resolve().parents[1]

# The real SD 1.5 UNet config (runwayml/stable-diffusion-v1-5, unet/config.json).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
# Same structure, tiny widths: for a smoke test of the script only.
TINY_UNET = dict(SD15_UNET, block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=64,
                 attention_head_dim=4, norm_num_groups=8, sample_size=8)  # fmt: skip
UNETS = {"sd15": SD15_UNET, "tiny": TINY_UNET}
VARIANTS = {"ckpt": True, "nockpt": False}


# ----------------------------------------------------------------------------------------------------------------------
# Memory probes
# ----------------------------------------------------------------------------------------------------------------------


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def trim() -> None:
    """Collect garbage and hand freed heap back to the OS, so RSS at phase boundaries reflects live tensors."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakSampler(threading.Thread):
    """Samples this process's RSS every `interval` s; `peak_over(offset_fn)` tracks max(RSS - offset_fn())."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = 0
        self.offset_fn = None
        self.peak_minus_offset = None
        self._stop_event = threading.Event()

    def reset(self, offset_fn=None):
        self.peak = rss_bytes()
        self.offset_fn = offset_fn
        self.peak_minus_offset = None if offset_fn is None else self.peak - offset_fn()

    def sample(self):
        r = rss_bytes()
        self.peak = max(self.peak, r)
        if self.offset_fn is not None:
            self.peak_minus_offset = max(self.peak_minus_offset, r - self.offset_fn())

    def run(self):
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self):
        self._stop_event.set()


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensor storages (shared storages such as bnb's quantization maps counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


# ----------------------------------------------------------------------------------------------------------------------
# Worker: one variant in this process
# ----------------------------------------------------------------------------------------------------------------------


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    out_path = Path(args.worker_output)
    res: dict = {"variant": args.worker, "gradient_checkpointing": VARIANTS[args.worker], "status": "running"}
    t_start = time.perf_counter()

    def save(phase: str):
        res["last_phase"] = phase
        res["rss_now"] = rss_bytes()
        res["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        out_path.write_text(json.dumps(res, indent=1))
        print(
            f"  [{args.worker}] {res['elapsed_s']:7.1f} s  {phase:<34} RSS {res['rss_now'] / GiB:6.2f} GiB", flush=True
        )

    import bitsandbytes as bnb
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ov_sd_trainer.assets.builders import SD_SCHEDULER_CONFIG
    from ov_sd_trainer.compress import checkpointing, quantize
    from ov_sd_trainer.train.ema import EMACallback
    from ov_sd_trainer.train.losses import QATModel

    trim()
    res["rss_runtime"] = rss_bytes()  # interpreter + torch/diffusers/nncf/bnb imports
    save("imports")

    torch.manual_seed(args.seed)
    teacher = UNet2DConditionModel(**UNETS[args.unet]).eval().requires_grad_(False)
    res["n_params"] = sum(p.numel() for p in teacher.parameters())
    res["teacher_bytes"] = tensor_bytes(list(teacher.parameters()) + list(teacher.buffers()))
    trim()
    save(f"teacher built ({res['n_params'] / 1e6:.1f} M params)")

    h = w = args.resolution // 8
    cfg = teacher.config
    g = torch.Generator().manual_seed(args.seed)

    def random_inputs(batch):
        return {
            "sample": torch.randn(batch, cfg.in_channels, h, w, generator=g),
            "timestep": torch.randint(0, 1000, (batch,), generator=g),
            "encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, generator=g),
        }

    calib = [random_inputs(1) for _ in range(args.calib_samples)]
    t0 = time.perf_counter()
    student = quantize.quantize_unet(teacher, calib, bias_correction=args.bias_correction)
    res["quantize_s"] = round(time.perf_counter() - t0, 1)
    del calib
    student.train()
    for p in student.parameters():  # as training.build: NNCF's integer state stays frozen
        p.requires_grad_(p.is_floating_point())
    qparams = quantize.quantizer_parameters(student)
    wparams = quantize.weight_parameters(student)
    res["n_quantizers"] = quantize.count_quantizers(student)
    res["student_weight_bytes"] = tensor_bytes([p for _, p in wparams] + list(student.buffers()))
    res["student_quantizer_bytes"] = tensor_bytes([p for _, p in qparams])
    res["student_bytes"] = tensor_bytes(list(student.parameters()) + list(student.buffers()))
    trainable = [p for p in student.parameters() if p.requires_grad]
    res["n_trainable"] = sum(p.numel() for p in trainable)
    trim()
    save(f"student quantized ({res['quantize_s']} s)")

    if res["gradient_checkpointing"]:
        checkpointing.enable_gradient_checkpointing(student)

    ema = EMACallback(student, decay=0.9999, device="cpu")
    res["ema_bytes"] = tensor_bytes(ema.shadow.values())
    trim()
    save("EMA shadow (CPU)")

    q_ids = {id(p) for _, p in qparams}
    decay = [p for p in trainable if id(p) not in q_ids and p.dim() > 1]
    no_decay = [p for p in trainable if id(p) not in q_ids and p.dim() <= 1] + [
        p for _, p in qparams if p.requires_grad
    ]
    optimizer = bnb.optim.AdamW8bit(
        [{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-5
    )

    # The trainer's loss path: QATModel.forward with encode() replaced by precomputed latents/text states.
    model = QATModel(student, teacher, torch.nn.Identity(), torch.nn.Identity(), DDPMScheduler(**SD_SCHEDULER_CONFIG),
                     distillation_weight=1.0, task_weight=1.0)  # fmt: skip
    model.train()
    batch = random_inputs(args.batch_size)
    latents, states = batch["sample"], batch["encoder_hidden_states"]
    model.encode = lambda pixel_values, input_ids: (latents, states)

    grad_bytes_so_far = [0]

    def count_grad(p):
        grad_bytes_so_far[0] += p.grad.untyped_storage().nbytes()

    hooks = [p.register_post_accumulate_grad_hook(count_grad) for p in trainable]

    sampler = PeakSampler(args.sample_interval)
    sampler.start()
    steps = []
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        grad_bytes_so_far[0] = 0
        trim()
        s: dict = {"step": step + 1, "rss_before": rss_bytes()}
        res["current_step"] = s  # a killed worker leaves what it measured of the step so far
        save(f"step {step + 1}: forward")
        base = s["rss_before"]
        sampler.reset(lambda base=base: base + grad_bytes_so_far[0])
        model.set_noise_seed(args.seed, 0, step)
        t0 = time.perf_counter()
        out = model(pixel_values=None, input_ids=None)
        s["forward_s"] = time.perf_counter() - t0
        s["rss_after_forward"] = rss_bytes()
        s["activations_saved"] = s["rss_after_forward"] - base
        s["loss"] = out["loss"].item()
        save(f"step {step + 1}: backward (fwd {s['forward_s']:.1f} s)")
        t0 = time.perf_counter()
        out["loss"].backward()
        s["backward_s"] = time.perf_counter() - t0
        sampler.sample()
        s["peak_fwd_bwd"] = sampler.peak
        s["activations_peak"] = sampler.peak_minus_offset
        s["grad_bytes"] = tensor_bytes(p.grad for p in trainable)
        del out
        save(f"step {step + 1}: optimizer (bwd {s['backward_s']:.1f} s)")
        sampler.reset()
        t0 = time.perf_counter()
        optimizer.step()
        s["optimizer_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ema.step()
        s["ema_s"] = time.perf_counter() - t0
        sampler.sample()
        s["peak_optimizer"] = sampler.peak
        states_ = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        s["optimizer_bytes"] = tensor_bytes(states_)
        s["step_s"] = s["forward_s"] + s["backward_s"] + s["optimizer_s"] + s["ema_s"]
        steps.append(s)
        res["steps"] = steps
        save(f"step {step + 1}: done ({s['step_s']:.1f} s)")
    sampler.stop()
    for hk in hooks:
        hk.remove()
    import resource

    res["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res["status"] = "ok"
    save("finished")


# ----------------------------------------------------------------------------------------------------------------------
# Parent: run the variants in subprocesses under a memory watchdog, then report
# ----------------------------------------------------------------------------------------------------------------------


def run_variant(args, variant: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="train-memory-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--worker-output", str(out)]
        for key in ("unet", "resolution", "batch_size", "calib_samples", "threads", "seed", "steps", "sample_interval"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        if args.bias_correction:
            cmd.append("--bias-correction")
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
        print(f"== variant {variant} (gradient checkpointing {'ON' if VARIANTS[variant] else 'OFF'})", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env)
        killed_reason = None
        max_rss_seen = 0
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                r = rss_bytes(proc.pid)
            except (FileNotFoundError, ProcessLookupError):
                r = 0
            max_rss_seen = max(max_rss_seen, r)
            avail = mem_available_bytes()
            if killed_reason is None:
                if args.max_rss_gb and r > args.max_rss_gb * GiB:
                    killed_reason = f"RSS {r / GiB:.2f} GiB > --max-rss-gb {args.max_rss_gb}"
                elif avail < args.min_free_gb * GiB:
                    killed_reason = f"MemAvailable {avail / GiB:.2f} GiB < --min-free-gb {args.min_free_gb}"
                if killed_reason:
                    print(f"!! {variant}: killing the worker: {killed_reason}", flush=True)
                    os.kill(proc.pid, signal.SIGKILL)
            if args.timeout_min and killed_reason is None and time.perf_counter() - t0 > args.timeout_min * 60:
                killed_reason = f"timeout {args.timeout_min} min"
                print(f"!! {variant}: killing the worker: {killed_reason}", flush=True)
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(args.watch_interval)
        proc.returncode = os.waitstatus_to_exitcode(status)
        res = json.loads(out.read_text()) if out.is_file() else {"variant": variant}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["peak_rss_rusage"] = rusage.ru_maxrss * 1024  # the child's own peak RSS (Linux: KiB)
    res["max_rss_watchdog"] = max_rss_seen
    if killed_reason:
        res["status"] = "did not fit" if "timeout" not in killed_reason else "timeout"
        res["killed_reason"] = killed_reason
    elif res.get("status") != "ok":
        res["status"] = f"failed (exit {proc.returncode})"
    return res


def summarize(res: dict, opt_state_hint: int | None = None) -> dict:
    """Components (bytes) of the step, and the projected GPU memory (fp32). `opt_state_hint`: the optimizer state
    bytes measured by another variant (the same model), used in the lower bound for a variant that did not fit."""
    s = (res.get("steps") or [{}])[-1]
    comp = {
        "student_params": res.get("student_bytes"),
        "student_quantizer_params": res.get("student_quantizer_bytes"),
        "teacher_params": res.get("teacher_bytes"),
        "gradients": s.get("grad_bytes"),
        "optimizer_state": s.get("optimizer_bytes"),
        "ema_shadow_cpu": res.get("ema_bytes"),
        "activations_saved": s.get("activations_saved"),
        "activations_peak": s.get("activations_peak"),
        "runtime_baseline": res.get("rss_runtime"),
    }
    peak = res.get("peak_rss_rusage") or res.get("peak_rss")
    step_peak = max(s.get("peak_fwd_bwd", 0), s.get("peak_optimizer", 0)) or None
    known = ["student_params", "teacher_params", "gradients", "optimizer_state", "ema_shadow_cpu", "runtime_baseline"]
    if all(comp[k] is not None for k in known) and step_peak:
        comp["other_residual"] = step_peak - sum(comp[k] for k in known) - (comp["activations_peak"] or 0)
    gpu = None
    device_parts = ["student_params", "teacher_params", "gradients", "optimizer_state", "activations_peak"]
    if all(comp[k] is not None for k in device_parts):
        gpu = sum(comp[k] for k in device_parts)
    lower = None
    cur = res.get("current_step") or {}
    if gpu is None and res.get("max_rss_watchdog") and "rss_before" in cur:
        # Killed mid-step: everything allocated after "RSS before forward" (activations and/or gradients) would live
        # on the GPU too, and the gradients alone are as large as the fp32 trainable params (= the EMA shadow).
        grown = max(res["max_rss_watchdog"] - cur["rss_before"], res.get("ema_bytes") or 0)
        comp["grads_plus_activations_at_kill_lower_bound"] = grown
        lower = (comp["student_params"] or 0) + (comp["teacher_params"] or 0) + (opt_state_hint or 0) + grown
    return {
        "components": comp,
        "peak_rss": peak,
        "peak_rss_step": step_peak,
        "gpu_projection_fp32": gpu,
        "gpu_projection_fp32_lower_bound": lower,
    }


def _summaries(results: list[dict]) -> list[dict]:
    metas = [summarize(r) for r in results]
    hint = next((m["components"]["optimizer_state"] for m in metas if m["components"]["optimizer_state"]), None)
    return [summarize(r, hint) for r in results]


def fmt(b) -> str:
    return "n/a" if b is None else f"{b / GiB:.2f}"


def report(args, results: list[dict]) -> str:
    rows = [
        ("status", lambda r, m: r["status"] + (f" ({r['killed_reason']})" if r.get("killed_reason") else "")),
        ("peak RSS, whole process (GiB, measured)", lambda r, m: fmt(m["peak_rss"])),
        ("peak RSS during the training step (GiB, measured)", lambda r, m: fmt(m["peak_rss_step"])),
        ("  runtime baseline (imports; GiB)", lambda r, m: fmt(m["components"]["runtime_baseline"])),
        ("  student params incl. quantizers (GiB)", lambda r, m: fmt(m["components"]["student_params"])),
        ("    of which quantizer params (MiB)", lambda r, m: _mib(m["components"]["student_quantizer_params"])),
        ("  teacher params, frozen FP32 (GiB)", lambda r, m: fmt(m["components"]["teacher_params"])),
        ("  gradients (GiB)", lambda r, m: fmt(m["components"]["gradients"])),
        ("  AdamW8bit state (GiB)", lambda r, m: fmt(m["components"]["optimizer_state"])),
        ("  EMA shadow, CPU (GiB)", lambda r, m: fmt(m["components"]["ema_shadow_cpu"])),
        ("  activations, peak fwd+bwd (GiB)", lambda r, m: fmt(m["components"]["activations_peak"])),
        ("fwd+bwd peak over pre-forward RSS (activations + grads so far; GiB)", lambda r, m: _fwd_bwd(r)),
        ("activations saved at end of forward (GiB)", lambda r, m: fmt(m["components"]["activations_saved"])),
        ("forward time (s): teacher + student + loss", lambda r, m: _step(r, "forward_s")),
        ("backward time (s)", lambda r, m: _step(r, "backward_s")),
        ("optimizer step time (s)", lambda r, m: _step(r, "optimizer_s")),
        ("EMA update time (s)", lambda r, m: _step(r, "ema_s")),
        ("step time (s)", lambda r, m: _step(r, "step_s")),
        ("NNCF quantization time (s)", lambda r, m: str(r.get("quantize_s", "n/a"))),
        ("PROJECTED GPU memory, fp32 (GiB)", lambda r, m: _gpu(m)),
        ("  fits a 24 GB GPU? (projection)", lambda r, m: _fits(m["gpu_projection_fp32"], m)),
        ("  with bf16 autocast, activations / 2 (GiB, projection)", lambda r, m: _bf16(m)),
        ("  fits a 24 GB GPU with bf16 autocast? (projection)", lambda r, m: _fits(_bf16_bytes(m))),
    ]
    metas = _summaries(results)
    names = [f"{r['variant']} (checkpointing {'ON' if r.get('gradient_checkpointing', VARIANTS[r['variant']]) else 'OFF'})"
             for r in results]  # fmt: skip
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(results)]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(r, m) for r, m in zip(results, metas, strict=True)) + " |")
    return "\n".join(lines)


def _fwd_bwd(r):
    s = (r.get("steps") or [{}])[-1]
    return fmt(s["peak_fwd_bwd"] - s["rss_before"]) if "peak_fwd_bwd" in s else "n/a"


def _mib(b):
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def _step(r, key):
    s = (r.get("steps") or [{}])[-1]
    return "n/a" if key not in s else f"{s[key]:.1f}"


def _bf16_bytes(m):
    c, g = m["components"], m["gpu_projection_fp32"]
    return None if g is None else g - c["activations_peak"] / 2


def _bf16(m):
    return fmt(_bf16_bytes(m))


def _gpu(m):
    if m["gpu_projection_fp32"] is None and m.get("gpu_projection_fp32_lower_bound"):
        return f">= {fmt(m['gpu_projection_fp32_lower_bound'])} (lower bound: killed mid-step)"
    return fmt(m["gpu_projection_fp32"])


def _fits(b, m=None):
    if b is None:
        lower = (m or {}).get("gpu_projection_fp32_lower_bound")
        if lower and lower > 24e9:
            return "no (lower bound already exceeds 24 GB)"
        return "unknown"
    return "yes" if b <= 24e9 else "no"  # 24 GB = 22.35 GiB; CUDA context (~0.5-1 GB) not included


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", default="ckpt,nockpt", help="comma list of: ckpt, nockpt (default: both)")
    p.add_argument("--unet", choices=sorted(UNETS), default="sd15", help="sd15 (default) or tiny (smoke test)")
    p.add_argument("--resolution", type=int, default=512, help="image side in px; latents are /8 (default 512)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--calib-samples", type=int, default=2, help="random NNCF calibration samples (default 2)")
    p.add_argument("--bias-correction", action="store_true", help="NNCF fast bias correction (off: faster)")
    p.add_argument("--steps", type=int, default=1, help="training steps per variant (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on 2 shared cores more threads spin-wait, ~30x slower)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-free-gb", type=float, default=1.5,
                   help="kill a variant when the machine's MemAvailable drops below this (default 1.5)")  # fmt: skip
    p.add_argument("--max-rss-gb", type=float, default=None, help="kill a variant whose RSS exceeds this")
    p.add_argument("--timeout-min", type=float, default=None, help="kill a variant that runs longer than this")
    p.add_argument("--watch-interval", type=float, default=0.05, help="watchdog polling period, s")
    p.add_argument("--sample-interval", type=float, default=0.01, help="in-worker RSS sampling period, s")
    p.add_argument("--output-json", default="benchmarks/train_memory.json", help="where to write the JSON")
    p.add_argument("--output-md", default=None, help="also write the markdown table here (default: next to JSON)")
    p.add_argument("--report-from", default=None, help="re-render the table/JSON from an earlier --output-json")
    p.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--worker-output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    print(f"train_memory: unet={args.unet} {args.resolution} px, batch {args.batch_size}, variants {variants}, "
          f"{args.threads} torch thread(s), MemAvailable {mem_available_bytes() / GiB:.1f} GiB", flush=True)  # fmt: skip
    machine = None
    if args.report_from:
        previous = json.loads(Path(args.report_from).read_text())
        results, machine = previous["results"], previous.get("machine")
        for r in results:
            r.pop("summary", None)
    else:
        results = [run_variant(args, v) for v in variants]
    table = report(args, results)
    import torch

    machine = machine or {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "mem_total_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB, 1),
        "torch": torch.__version__,
        "load_avg_at_end": os.getloadavg(),
    }
    notes = [
        "Measured on CPU: RSS and tensor bytes; the GPU rows are projections (student + teacher + grads + "
        "optimizer state + activation peak, fp32; EMA on CPU; CUDA context/allocator overhead not included).",
        "VAE and text encoder are not included (inputs are random latents/text states fed to the UNets).",
        f"Student calibrated on {args.calib_samples} random samples (memory-relevant only; ranges meaningless).",
        "Activations 'peak' = max over fwd+bwd of (RSS - RSS before forward - gradient bytes allocated so far); "
        "CPU kernels (oneDNN, SDPA) may keep different temporaries than CUDA kernels.",
        "The components do not all coexist in step 1 (grads replace activations during backward; the optimizer "
        "state appears only in optimizer.step()), so they do not add up to the measured step-1 peak; the GPU sum "
        "(full grads + optimizer state + activation peak at once) is the conservative steady-state figure.",
        "Step 1: AdamW8bit state is created in optimizer.step() after backward; in later steps it is also "
        "resident during forward/backward (the projection counts it).",
    ]
    print("\n" + table + "\n")
    for n in notes:
        print(f"- {n}")
    summary = {
        "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
        "machine": machine,
        "results": [dict(r, summary=s) for r, s in zip(results, _summaries(results), strict=True)],
        "table_markdown": table,
        "notes": notes,
    }
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    md = Path(args.output_md) if args.output_md else out.with_suffix(".md")
    md.write_text(table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    print(f"wrote {out} and {md}")


if __name__ == "__main__":
    main()
