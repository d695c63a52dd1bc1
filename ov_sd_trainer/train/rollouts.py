"""Held-out rollouts: the student and the teacher sample the same captions from the same seeded noise, and the
student is scored on how close its final images come to the teacher's. `calibration_draws` keeps the calibration
whose rollouts score best (`train.calibration`).

Per-step errors compound over a trajectory, so a calibration is judged on what the image depends on: from seeded
noise, teacher and student each sample the caption with the pipeline's own scheduler and classifier-free guidance
(`GUIDANCE`), `steps` steps; the final latents are decoded by the frozen VAE and compared in pixels in [0, 1], the
range `ov-sd eval`'s PSNR measures (`rollout_image_mse`; `rollout_mse` is the final-latent MSE).

(Training on rollouts, in latents and in pixels, was measured and removed: docs/fidelity.md.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import tokenize
from .unet_inputs import GUIDANCE


class RolloutPrompts(torch.utils.data.Dataset):
    """Held-out caption token ids [N,77] (`prompt_ids`) and the seed of each item's initial noise (`noise_seed`)."""

    def __init__(self, prompt_ids: torch.Tensor, seeds: torch.Tensor):
        self.prompt_ids, self.seeds = prompt_ids, seeds

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"prompt_ids": self.prompt_ids[i], "noise_seed": self.seeds[i]}


def rollout_gap_set(tokenizer, num: int, seed: int, resolution: int, dataset_name: str = "synthetic",
                    caption_column: str = "text", image_column: str = "image") -> RolloutPrompts:  # fmt: skip
    """`num` held-out captions (as the teacher-gap set draws them) with a held-out noise seed each."""
    from .teacher_gap import HELDOUT_SEED_OFFSET, heldout_rows

    ds = heldout_rows(num, seed, resolution, dataset_name, caption_column, image_column)
    seeds = torch.arange(num, dtype=torch.long) + seed + HELDOUT_SEED_OFFSET
    return RolloutPrompts(tokenize(tokenizer, ds[caption_column]), seeds)


class Rollout:
    """Samples with a `QATModel`'s student and teacher exactly as the pipeline does (its scheduler, CFG)."""

    def __init__(self, scheduler, tokenizer, text_encoder, latent_shape: tuple[int, int, int], steps: int,
                 guidance_scale: float = GUIDANCE):  # fmt: skip
        self.scheduler_config = scheduler.config
        self.scheduler_cls = type(scheduler)
        self.latent_shape, self.steps, self.guidance_scale = latent_shape, steps, guidance_scale
        self._teacher_final: dict[tuple, torch.Tensor] = {}  # (seeds, caption ids) -> the teacher's final latents
        device = next(text_encoder.parameters()).device
        with torch.no_grad():
            self.uncond = text_encoder(tokenize(tokenizer, [""]).to(device), return_dict=False)[0].float()

    def scheduler(self):
        """A fresh scheduler (multistep ones keep history) set to `steps`."""
        s = self.scheduler_cls.from_config(self.scheduler_config)
        s.set_timesteps(self.steps)
        return s

    def noise(self, seeds, device) -> torch.Tensor:
        """The initial latents of `seeds`, one generator per item: an item's noise does not depend on its batch."""
        return torch.cat(
            [torch.randn((1, *self.latent_shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        ).to(device)

    def step(self, model, net, scheduler, latents, t, states):
        """One guided denoising step of `net` (the CFG batch as diffusers builds it: [uncond, cond])."""
        n = len(latents)
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        cond = torch.cat([self.uncond.expand(n, -1, -1), states])
        eps = model.unet(net, x, t.reshape(1).expand(2 * n), cond).float()
        uncond_eps, cond_eps = eps.chunk(2)
        guided = uncond_eps + self.guidance_scale * (cond_eps - uncond_eps)
        return scheduler.step(guided, t, latents, return_dict=False)[0]

    def sample(self, model, net, states, noise):
        """`net`'s final latent of the whole schedule from `noise`."""
        scheduler = self.scheduler()
        latents = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            latents = self.step(model, net, scheduler, latents, t, states)
        return latents

    @torch.no_grad()
    def gap(self, model, prompt_ids, noise_seed) -> dict:
        """Held-out: the MSE between the student's and the teacher's final latents (`rollout_mse`, whole
        trajectories) and decoded images in [0, 1] (`rollout_image_mse`). The frozen teacher's are sampled once per
        held-out batch and kept (every calibration draw is scored on the same batches)."""
        states = model.text_encoder(prompt_ids, return_dict=False)[0].float()
        seeds = tuple(noise_seed.tolist())
        noise = self.noise(seeds, prompt_ids.device)
        student = self.sample(model, model.student, states, noise)
        key = (seeds, tuple(prompt_ids.flatten().tolist()))
        if key not in self._teacher_final:
            final = self.sample(model, model.teacher, states, noise)
            self._teacher_final[key] = (final, to_unit(decode(model.vae, final)))
        teacher, teacher_image = self._teacher_final[key]
        mse = F.mse_loss(student, teacher)
        image_mse = F.mse_loss(to_unit(decode(model.vae, student)), teacher_image)
        return {"rollout_mse": mse, "rollout_image_mse": image_mse}


def decode(vae, latents):
    """Latents -> images in [-1, 1] through the frozen VAE decoder."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0].float().clamp(-1, 1)


def to_unit(images):
    """[-1, 1] -> [0, 1], the range of `ov-sd eval`'s PSNR."""
    return (images + 1) / 2


def make_rollout(pipe, resolution: int, steps: int) -> Rollout:
    """A `Rollout` on `pipe`'s scheduler, tokenizer and text encoder at `resolution` px."""
    factor = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, resolution // factor, resolution // factor)
    return Rollout(pipe.scheduler, pipe.tokenizer, pipe.text_encoder, shape, steps)
