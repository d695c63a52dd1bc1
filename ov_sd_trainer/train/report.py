"""What a finished run reports: `training_info.json` (`training_info`), the loss plot (`plot_losses`), the held-out
teacher-gap history, and the quantizer digests that show every rank started from and ended with the same quantizers.
"""

from __future__ import annotations

from pathlib import Path

from ..assets import resolve_model_path
from ..compress import quantize
from . import fsdp
from .trainer import QATTrainer


def quantizer_digest(student) -> str:
    """sha256 of the quantizer parameters: equal digests mean identical quantizers on every rank."""
    import hashlib

    h = hashlib.sha256()
    for _, p in quantize.quantizer_parameters(student):  # sharded: gathered one at a time (a collective)
        h.update(fsdp.full(p.detach()).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def teacher_gap_history(log_history: list[dict]) -> list[dict]:
    """(step, eval_teacher_mse, eval_task_loss) of every teacher-gap evaluation of a run."""
    keys = (*QATTrainer.EVAL_METRICS, *QATTrainer.FEW_STEP_METRICS)
    return [
        {"step": h["step"], **{k: h.get(f"eval_{k}") for k in keys}}
        for h in log_history
        if any(f"eval_{k}" in h for k in keys)
    ]


def training_info(cfg, recipe: dict | None, trainer, result, total_runtime_s: float, start_digests: list[str],
                  end_digests: list[str], sharding: dict | None, evaluated: bool, model) -> dict:  # fmt: skip
    """The run's record (training_info.json, also the export's model card data)."""
    return {
        "base_model": cfg.pretrained_model_name_or_path,
        "resolved_model_path": resolve_model_path(cfg.pretrained_model_name_or_path),
        "recipe": recipe or {},
        "train_runtime_s": result.metrics.get("train_runtime"),
        "total_runtime_s": total_runtime_s,
        "global_step": trainer.state.global_step,
        "world_size": cfg.world_size,
        "quantizer_digests_at_start": start_digests,  # one per rank
        "quantizer_digests_at_end": end_digests,
        "sharding": sharding,  # FSDP: what each rank held of the student; None when it is replicated
        "teacher_gap": teacher_gap_history(trainer.state.log_history),
        "teacher_gap_samples": cfg.teacher_gap_samples if evaluated else None,
        "calibration_draws": getattr(model, "calibration_scores", None),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_metric": trainer.state.best_metric,
        "log_history": trainer.state.log_history,
    }


QAT_LOSSES = (("loss", "total"), ("task_loss", "task (vs target)"), ("distillation_loss", "distillation"))
# held-out quality logged by an evaluation, drawn on a right axis: key -> label (a run logs at most one of them)
PSNR_CURVES = {
    "eval_few_step_psnr": "held-out few-step PSNR vs teacher (dB)",  # a consistency run (`QATTrainer.evaluate`)
    "eval_psnr": "held-out image latents: PSNR vs VAE decoder (dB)",  # a tiny-decoder run (`train/decoder.py`)
    "eval_endpoint_psnr": "held-out sampling endpoints: PSNR vs VAE decoder (dB)",  # the same, sampled latents
}


def plot_losses(log_history: list[dict], path: Path, losses=QAT_LOSSES) -> Path | None:
    """The run's loss plot (matplotlib, headless), shared by `ov-sd train` and `ov-sd train-decoder`: each logged loss
    of `losses` ((key, label) pairs; a loss only where it is > 0, on a log scale) and the held-out teacher gap (MSE)
    against the step; on a right axis each held-out PSNR of `PSNR_CURVES` the run evaluates."""
    rows = [h for h in log_history if "loss" in h]
    gap = [(g["step"], g["teacher_mse"]) for g in teacher_gap_history(log_history) if g["teacher_mse"] is not None]
    curves = ((label, [(h["step"], h[key]) for h in log_history if key in h]) for key, label in PSNR_CURVES.items())
    psnr = [(label, points) for label, points in curves if points]
    if not rows and not psnr:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, label in losses:
        points = [(h["step"], h[key]) for h in rows if h.get(key, 0) > 0]
        if points:
            ax.plot(*zip(*points, strict=True), label=label)
    if gap:
        ax.plot(*zip(*gap, strict=True), "o-", label="held-out student vs teacher (MSE)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if psnr:
        right = ax.twinx()
        for (label, points), style in zip(psnr, ("ko-", "ks--"), strict=False):
            right.plot(*zip(*points, strict=True), style, label=label)
        right.set_ylabel("PSNR (dB)")
        right.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
