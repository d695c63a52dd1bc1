"""Calibration of the student: NNCF range initialisation on real UNet inputs, once per run (on the main process of a
multi-process run), or with `calibration_draws` N > 1 the best of N calibrations on held-out rollouts.

The inputs are the teacher's own UNet calls sampling the training captions (`calibration_source: trajectories`,
`calibration_calls`) or noisy training images (`training`, `unet_inputs.collect_calibration_inputs`). Each draw k
samples its inputs from `seed + k x DRAW_SEED_STRIDE`; each draw's student samples `teacher_gap_samples` held-out
captions from held-out seeds (`rollouts`), and the one whose decoded images are closest to the teacher's (PSNR,
pooled) is kept. The scores go to `model.calibration_scores` (training_info.json).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import torch

from ..compress import quantize
from ..run_folder import HANDOVER_DIR
from .config import QATConfig
from .data import collate
from .losses import QATModel
from .rollouts import RolloutPrompts, make_rollout, rollout_gap_set
from .unet_inputs import collect_calibration_inputs, collect_trajectory_inputs

logger = logging.getLogger(__name__)

DRAW_SEED_STRIDE = 1000  # calibration draw k samples its inputs from seed + k x this
SELECTION_SEED_OFFSET = 10_000  # the draws' held-out rollouts: captions and seeds apart from the teacher-gap set's


def calibration_calls(cfg: QATConfig, pipe, train_ds, seed: int | None = None) -> list[dict] | None:
    """With `calibration_source: trajectories`, the teacher's `num_calibration_samples` UNet calls sampling the
    training captions from `seed` (default `cfg.seed`), else None. Deterministic, so every rank of a multi-process
    run collects the same calls."""
    if cfg.calibration_source != "trajectories":
        return None
    captions = list(train_ds.with_format(None)[cfg.caption_column])
    return collect_trajectory_inputs(
        pipe, captions, cfg.num_calibration_samples, cfg.resolution, cfg.seed if seed is None else seed,
        steps=cfg.calibration_steps, guidance_scale=cfg.calibration_guidance_scale,
    )  # fmt: skip


def calibrate_once(cfg: QATConfig, model: QATModel, fp32_student, train_ds, device, calls=None):
    """NNCF calibration on the main process only; the other ranks load its result.

    So every rank starts from the same quantizer ranges, and a multi-process run pays for
    calibration once. The hand-over folder is removed once all ranks have loaded it.
    `fp32_student`: the FP32 UNet to quantize, left unchanged (the teacher itself, or with token
    merging a merged copy of it); the other ranks load the saved student onto their own such UNet,
    so that NNCF's op names (and hence the quantizers) match."""
    from accelerate import PartialState

    state = PartialState()
    handover = Path(cfg.output_dir) / HANDOVER_DIR
    if state.num_processes == 1:
        return calibrate(cfg, model, fp32_student, train_ds, device, calls)
    with state.main_process_first():
        if state.is_main_process:
            student = calibrate(cfg, model, fp32_student, train_ds, device, calls)
            quantize.save_quantized(student, handover)
        else:
            student = quantize.load_quantized(fp32_student, handover).to(device)
    state.wait_for_everyone()
    if state.is_main_process:
        shutil.rmtree(handover, ignore_errors=True)
    return student


def calibrate(cfg: QATConfig, model: QATModel, fp32_student, train_ds, device, calls=None):
    """One calibration, or with `calibration_draws` N > 1 the best of N on held-out rollouts (see the module)."""
    if cfg.calibration_draws == 1:
        return calibrate_draw(cfg, model, fp32_student, train_ds, device, calls, cfg.seed)
    rollout = make_rollout(model.pipeline, cfg.resolution, cfg.calibration_steps)
    held_out = rollout_gap_set(
        model.tokenizer, cfg.teacher_gap_samples, cfg.seed + SELECTION_SEED_OFFSET, cfg.resolution, cfg.dataset_name,
        cfg.caption_column, cfg.image_column,
    )  # fmt: skip
    best, scores = None, []
    for k in range(cfg.calibration_draws):
        seed = cfg.seed + k * DRAW_SEED_STRIDE
        draw_calls = calibration_calls(cfg, model.pipeline, train_ds, seed) if k else calls
        student = calibrate_draw(cfg, model, fp32_student, train_ds, device, draw_calls, seed)
        psnr = rollout_psnr(rollout, model, student, held_out, device)
        logger.info("calibration draw %d (seed %d): held-out rollout PSNR %.3f dB", k, seed, psnr)
        scores.append({"draw": k, "seed": seed, "rollout_psnr": psnr})
        if best is None or psnr > best[0]:
            best = (psnr, student)
        del student
    chosen = max(scores, key=lambda s: s["rollout_psnr"])
    model.calibration_scores = {"draws": scores, "chosen": chosen["draw"], "held_out": len(held_out)}
    return best[1]


@torch.no_grad()
def rollout_psnr(rollout, model: QATModel, student, held_out: RolloutPrompts, device, batch: int = 8) -> float:
    """PSNR (pooled over `held_out`) of `student`'s decoded rollouts against the teacher's."""
    placeholder, model.student = model.student, student.eval()
    try:
        sums = 0.0
        for i in range(0, len(held_out), batch):
            rows = collate([held_out[j] for j in range(i, min(i + batch, len(held_out)))])
            out = rollout.gap(model, rows["prompt_ids"].to(device), rows["noise_seed"])
            sums += out["rollout_image_mse"].item() * len(rows["prompt_ids"])
    finally:
        model.student = placeholder
    return -10 * math.log10(max(sums / len(held_out), 1e-12))


def calibrate_draw(cfg: QATConfig, model: QATModel, fp32_student, train_ds, device, calls, seed: int):
    """One NNCF calibration of `fp32_student` on `calls` (trajectories) or on training images drawn from `seed`."""
    if cfg.calibration_source == "trajectories":
        calib = calls[: cfg.num_calibration_samples]
    else:
        calib = collect_calibration_inputs(model, train_ds, cfg.num_calibration_samples, seed, device)
    t0 = time.perf_counter()
    student = quantize.quantize_unet(
        fp32_student,
        calib,
        preset=cfg.quantization_preset,
        overflow_fix=cfg.overflow_fix,
        ignored_scope=cfg.ignored_scope,
        scheme=cfg.quantization_scheme,
    )
    logger.info("NNCF quantization of the student took %.1f s", time.perf_counter() - t0)
    return student
