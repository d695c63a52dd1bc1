"""`QATTrainer`: a `transformers.Trainer` for distillation-aided quantization-aware UNet training.

The student is the NNCF-quantized UNet, the teacher the frozen FP32 UNet; loss = task MSE
against the scheduler's target (epsilon / v / sample, optionally Min-SNR weighted) +
`distillation_weight` x MSE(student, teacher). Everything the Trainer moves, wraps in DDP and
calls lives in `QATModel`, whose `forward(pixel_values, input_ids)` returns the losses: going
through the wrapped model's forward is what makes DDP synchronise the student's gradients.

The Trainer is customised only through its hooks (`compute_loss`, `log`, `_save`,
`_load_from_checkpoint`, `get_decay_parameter_names`), as TRL's trainers do.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

from . import quantization
from .ema import EMA_FILE, EMACallback

STUDENT_DIR = "student"
COMPLETE_MARKER = "checkpoint_complete.json"


def find_resumable_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint-N in output_dir that was written completely (has the marker)."""
    import logging
    import re

    folders = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        if (folder / COMPLETE_MARKER).is_file():
            return folder
        logging.getLogger(__name__).warning("skipping %s: incomplete (interrupted while saving)", folder)
    return None


class QATModel(nn.Module):
    """Student (trainable), teacher, VAE and text encoder (frozen) and the noise schedule."""

    def __init__(self, student, teacher, vae, text_encoder, noise_scheduler, distillation_weight: float = 1.0,
                 prediction_type: str | None = None, snr_gamma: float | None = None, noise_offset: float = 0.0):  # fmt: skip
        super().__init__()
        self.student, self.teacher, self.vae, self.text_encoder = student, teacher, vae, text_encoder
        for frozen in (teacher, vae, text_encoder):
            frozen.requires_grad_(False)
            frozen.eval()
        self.noise_scheduler = noise_scheduler
        self.distillation_weight = distillation_weight
        self.prediction_type = prediction_type or noise_scheduler.config.prediction_type
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset
        self.generator: torch.Generator | None = None

    def set_noise_seed(self, seed: int, stream: int, index: int):
        """Seed the noise, timesteps and latent sampling of the next forward.

        Each micro-batch draws from a generator seeded by (seed, stream, index), never from torch's
        global RNG, so a run resumed from a checkpoint draws exactly what an uninterrupted run would."""
        device = next(self.student.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(((seed * 1_000_003 + stream) * 1_000_033) + index)

    def train(self, mode: bool = True):
        # Only the student ever trains; the frozen parts stay in eval (no dropout, fixed norms).
        super().train(mode)
        for frozen in (self.teacher, self.vae, self.text_encoder):
            frozen.eval()
        return self

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Called by Trainer when `gradient_checkpointing=True` (a UNet lacks this method)."""
        quantization.enable_gradient_checkpointing(self.student)

    @torch.no_grad()
    def encode(self, pixel_values, input_ids):
        """pixel_values [B,3,H,W] in [-1,1], input_ids [B,77] -> latents [B,4,h,w], text states [B,77,D]."""
        latents = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist.sample(generator=self.generator)
        latents = latents * self.vae.config.scaling_factor
        states = self.text_encoder(input_ids, return_dict=False)[0]
        return latents.float(), states

    def noisy_inputs(self, latents):
        """Sample noise and timesteps as diffusers' train_text_to_image.py does."""
        g, dev = self.generator, latents.device
        noise = torch.randn(latents.shape, generator=g, device=dev, dtype=latents.dtype)
        if self.noise_offset:
            noise += self.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=g, device=dev)
        n_t = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, n_t, (latents.shape[0],), generator=g, device=dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        return noisy, noise, t.long()

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if self.prediction_type == "sample":
            return latents
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")

    def forward(self, pixel_values, input_ids):
        latents, states = self.encode(pixel_values, input_ids)
        noisy, noise, t = self.noisy_inputs(latents)
        pred = self.student(noisy, t, states, return_dict=False)[0].float()
        target = self.target(latents, noise, t).float()
        if self.snr_gamma is None:
            task = F.mse_loss(pred, target)
        else:  # Min-SNR weighting, https://arxiv.org/abs/2303.09556 (as in diffusers' examples)
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, t)
            w = torch.minimum(snr, torch.full_like(snr, self.snr_gamma))
            w = w / (snr + 1) if self.prediction_type == "v_prediction" else w / snr
            task = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        if self.distillation_weight:
            with torch.no_grad():
                teacher_pred = self.teacher(noisy, t, states, return_dict=False)[0].float()
            distill = F.mse_loss(pred, teacher_pred)
        else:
            distill = torch.zeros((), device=pred.device)
        loss = task + self.distillation_weight * distill
        return {"loss": loss, "task_loss": task.detach(), "distillation_loss": distill.detach()}


class _EpochToAugmentation(TrainerCallback):
    """Tells the data augmentation which epoch it is (its random draws are seeded by epoch and row)."""

    def __init__(self, augmentation):
        self.augmentation = augmentation

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.augmentation.epoch = math.floor((state.epoch or 0) + 1e-6)


class QATTrainer(Trainer):
    """Trainer for `QATModel`: separate loss logging, quantizer-aware weight decay, NNCF checkpoints, EMA."""

    def __init__(self, *args, ema: EMACallback | None = None, augmentation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema = ema
        if ema is not None:
            self.add_callback(ema)
        if augmentation is not None:
            self.add_callback(_EpochToAugmentation(augmentation))
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._micro = (-1, 0)  # (global step, micro-batch within it)

    # --- loss ------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step, micro = self._micro
        micro = micro + 1 if step == self.state.global_step else 0
        self._micro = (self.state.global_step, micro)
        index = (self.state.global_step * self.args.gradient_accumulation_steps + micro) * self.args.world_size
        self.accelerator.unwrap_model(model).set_noise_seed(self.args.seed, 0, index + self.args.process_index)
        out = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"])
        for key in ("task_loss", "distillation_loss"):
            self._metrics[key].append(out[key].item())
        return (out["loss"], out) if return_outputs else out["loss"]

    def log(self, logs, start_time=None):
        # Averages of the separate losses since the last log, then cleared (TRL's pattern).
        if self._metrics and "loss" in logs:
            for key, values in self._metrics.items():
                logs[key] = round(sum(values) / len(values), 6)
            self._metrics.clear()
        super().log(logs, start_time)

    # --- optimizer -------------------------------------------------------------------------
    def get_decay_parameter_names(self, model):
        """No weight decay on quantizer parameters (scales / ranges), biases or norms."""
        names = set(super().get_decay_parameter_names(model))
        student = self.accelerator.unwrap_model(model).student
        quantizer_ids = {id(p) for _, p in quantization.quantizer_parameters(student)}
        return [n for n, p in model.named_parameters() if n in names and id(p) not in quantizer_ids]

    # --- checkpoints -----------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint, then a completion marker written last (atomically, by rename).

        A run killed while a checkpoint is being written leaves a folder without the marker, which
        `find_resumable_checkpoint` skips: an incomplete checkpoint is never loaded."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            tmp = folder / (COMPLETE_MARKER + ".tmp")
            tmp.write_text(json.dumps({"global_step": self.state.global_step}))
            os.replace(tmp, folder / COMPLETE_MARKER)

    def _save(self, output_dir: str | None = None, state_dict=None):
        """A checkpoint that restores the quantized student exactly: NNCF config + state dict."""
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        student = self.accelerator.unwrap_model(self.model).student
        quantization.save_quantized(student, Path(output_dir) / STUDENT_DIR)
        if self.ema is not None:
            self.ema.save(output_dir)
        Path(output_dir, "config.json").write_text(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.accelerator.unwrap_model(model or self.model)
        src = Path(resume_from_checkpoint)
        # Rebuild from the saved NNCF config on the teacher (a copy), then take its exact state.
        state = quantization.load_quantized(model.teacher, src / STUDENT_DIR).state_dict()
        model.student.load_state_dict(state)
        if self.ema is not None and (src / EMA_FILE).is_file():
            self.ema.load(src)
