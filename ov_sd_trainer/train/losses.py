"""`QATModel`: the student, the frozen FP32 teacher, VAE, text encoder and noise schedule, and the losses.

loss = `task_weight` x task MSE against the scheduler's target (epsilon / v / sample, optionally Min-SNR
weighted) + `distillation_weight` x MSE(student, teacher); `task_weight` 0 is pure distillation. With a
`consistency` objective (`train.consistency.ConsistencyObjective`, `objective: consistency`) the loss is latent
consistency distillation instead. Everything the
Trainer moves, wraps in DDP and calls lives here: `forward(pixel_values, input_ids)` returns the losses, and going
through the wrapped model's forward is what makes DDP synchronise the student's gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import families
from ..compress.checkpointing import enable_gradient_checkpointing


class QATModel(nn.Module):
    """Student (trainable), teacher, VAE and text encoder (frozen) and the noise schedule."""

    def __init__(self, student, teacher, vae, text_encoder, noise_scheduler, *, distillation_weight: float,
                 task_weight: float, prediction_type: str | None = None, snr_gamma: float | None = None,
                 noise_offset: float = 0.0, text_encoder_2=None):  # fmt: skip
        # the loss weights have no default here: `QATConfig` owns them (distillation 1, task 0)
        super().__init__()
        self.student, self.teacher, self.vae, self.text_encoder = student, teacher, vae, text_encoder
        self.text_encoder_2 = text_encoder_2  # SDXL's second encoder (pooled text embeddings), else None
        for frozen in self._frozen():
            frozen.requires_grad_(False)
            frozen.eval()
        self.noise_scheduler = noise_scheduler
        self.distillation_weight = distillation_weight
        self.task_weight = task_weight
        self.prediction_type = prediction_type or noise_scheduler.config.prediction_type
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset
        self.generator: torch.Generator | None = None
        self.unet_extra = None  # (batch_size, device) -> extra UNet inputs of a training batch (`families`)
        # Latent consistency distillation (`objective: consistency`): the objective, its target network (a
        # `ConsistencyTarget` callback: a plain attribute, not a submodule, so DDP and the optimizer never see it) and
        # the empty prompt's text states (the teacher's unconditional CFG half). None for plain distillation.
        self.consistency = None
        self.consistency_target = None
        self.uncond_states: torch.Tensor | None = None
        self.time_cond_proj_dim: int | None = None  # the consistency student's guidance embedding width

    @staticmethod
    def unet(net, sample, timestep, encoder_hidden_states, extra: dict | None = None):
        """`net`'s prediction (student or teacher), with a family's extra inputs (`families.unet_kwargs`). Float
        inputs are cast to `net`'s dtype (a bfloat16 teacher, `cast_teacher`); callers take the output as float."""
        dtype = net.dtype
        sample, encoder_hidden_states = sample.to(dtype), encoder_hidden_states.to(dtype)
        extra = {k: v.to(dtype) if v.is_floating_point() else v for k, v in (extra or {}).items()}
        kwargs = families.unet_kwargs(extra)
        return net(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]

    def cast_teacher(self, dtype: torch.dtype):
        """Hold the frozen teacher in `dtype` (bfloat16: half its memory, e.g. SDXL on a 24 GB GPU). Done after
        calibration and the held-out sets are built, which run the teacher inside the diffusers pipeline."""
        self.teacher.to(dtype)

    def set_noise_seed(self, seed: int, stream: int, index: int):
        """Seed the noise, timesteps and latent sampling of the next forward.

        Each micro-batch draws from a generator seeded by (seed, stream, index), never from torch's
        global RNG, so a run resumed from a checkpoint draws exactly what an uninterrupted run would."""
        device = next(self.student.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(((seed * 1_000_003 + stream) * 1_000_033) + index)

    def fp32_student_base(self):
        """A fresh FP32 UNet of the student's architecture, what a saved student is rebuilt on: the teacher itself,
        or for a consistency student the teacher plus its guidance embedding (`make_student_unet`)."""
        if self.time_cond_proj_dim is None:
            return self.teacher
        from ..lcm import make_student_unet

        return make_student_unet(self.teacher, self.time_cond_proj_dim)

    def _frozen(self):
        return [m for m in (self.teacher, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    def train(self, mode: bool = True):
        # Only the student ever trains; the frozen parts stay in eval (no dropout, fixed norms).
        super().train(mode)
        for frozen in self._frozen():
            frozen.eval()
        return self

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Called by Trainer when `gradient_checkpointing=True` (a UNet lacks this method)."""
        enable_gradient_checkpointing(self.student)

    @torch.no_grad()
    def encode(self, pixel_values, input_ids, input_ids_2=None):
        """pixel_values [B,3,H,W] in [-1,1], input_ids [B,77] -> latents [B,4,h,w], text states [B,77,D], and for
        SDXL (`input_ids_2` of its second tokenizer) the pooled text embeddings [B,P] (else None)."""
        latents = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist.sample(generator=self.generator)
        latents = latents * self.vae.config.scaling_factor
        if self.text_encoder_2 is None:
            return latents.float(), self.text_encoder(input_ids, return_dict=False)[0], None
        states, pooled = families.sdxl_encode_prompts(self.text_encoder, self.text_encoder_2, input_ids, input_ids_2)
        return latents.float(), states, pooled

    def image_extra(self, latents, pooled=None, original_size=None, crop_top_left=None, size=None) -> dict:
        """The family's extra UNet inputs of a batch of training images: SDXL's pooled embeddings and time ids
        (original size and crop of each image, target `size`), else `unet_extra`'s (LCM's guidance embedding)."""
        if pooled is not None:
            time_ids = families.sdxl_time_ids(original_size, crop_top_left, size, batch=len(latents))
            return {families.TEXT_EMBEDS: pooled.float(), families.TIME_IDS: time_ids.to(latents.device)}
        return self.unet_extra(latents.shape[0], latents.device) if self.unet_extra else {}

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

    @torch.no_grad()
    def teacher_gap(self, sample, timestep, encoder_hidden_states, target=None, **extra):
        """On fixed UNet inputs (`teacher_gap`): the student's noise-prediction MSE against the teacher's
        (`teacher_mse`) and, where the true target is known, against it (`task_loss`), averaged over the batch."""
        pred = self.unet(self.student, sample, timestep, encoder_hidden_states, extra).float()
        teacher_pred = self.unet(self.teacher, sample, timestep, encoder_hidden_states, extra)
        gap = F.mse_loss(pred, teacher_pred.float())
        out = {"loss": gap, "teacher_mse": gap}
        if target is not None:
            out["task_loss"] = F.mse_loss(pred, target.float())
        return out

    def forward(self, pixel_values=None, input_ids=None, evaluate: bool = False, input_ids_2=None,
                original_size=None, crop_top_left=None, **unet_inputs):  # fmt: skip
        """Training on images (`pixel_values`, `input_ids`); `evaluate=True`: a teacher-gap batch of precomputed UNet
        inputs (`sample`, `timestep`, `encoder_hidden_states`, a family's extra inputs, `target`)."""
        if evaluate:
            return self.teacher_gap(**unet_inputs)
        if self.consistency is not None:
            latents, states, _ = self.encode(pixel_values, input_ids)
            return self.consistency(self, latents, states, self.uncond_states, self.generator)
        latents, states, pooled = self.encode(pixel_values, input_ids, input_ids_2)
        noisy, noise, t = self.noisy_inputs(latents)
        extra = self.image_extra(latents, pooled, original_size, crop_top_left, pixel_values.shape[-2:])
        pred = self.unet(self.student, noisy, t, states, extra).float()
        target = self.target(latents, noise, t).float()
        if self.snr_gamma is None:
            task = F.mse_loss(pred, target)
        else:  # Min-SNR weighting, https://arxiv.org/abs/2303.09556 (as in diffusers' examples)
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, t)
            w = torch.minimum(snr, torch.full_like(snr, self.snr_gamma))
            w = w / (snr + 1) if self.prediction_type == "v_prediction" else w / snr
            task = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        if not self.task_weight:
            task = task.detach()  # logged, not trained on (pure distillation)
        if self.distillation_weight:
            with torch.no_grad():
                teacher_pred = self.unet(self.teacher, noisy, t, states, extra).float()
            distill = F.mse_loss(pred, teacher_pred)
        else:
            distill = torch.zeros((), device=pred.device)
        loss = self.task_weight * task + self.distillation_weight * distill
        return {"loss": loss, "task_loss": task.detach(), "distillation_loss": distill.detach()}
