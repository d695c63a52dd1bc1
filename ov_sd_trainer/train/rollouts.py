"""Rollout distillation: train the student on its own sampling trajectories, against the teacher's final latents.

Per-step distillation (on noisy images or on the teacher's sampling states) minimises the one-step error, but a
small error that is the same at every step compounds over a trajectory: measured on the reference model, trajectory
distillation brought the UNet noise MSE to PTQ's level while the images fell ~2 dB below the calibrated start
(docs/fidelity.md). A rollout objective scores what the image depends on:

- from seeded noise, the teacher and the student both sample the caption with the pipeline's own scheduler and
  classifier-free guidance (`GUIDANCE`), `steps` steps;
- the student runs its first `k` UNet calls without gradient (its own drifted states, k drawn per batch), then
  `window` calls with gradient; the loss is the MSE between its latent after call k + window and the teacher's
  latent at the same point. So training sees, and learns to correct, the drift the student itself accumulates.

`RolloutPrompts` is the training dataset (caption token ids), `rollout_gap_set` the held-out evaluation (full
trajectories from held-out seeds; `eval_rollout_mse` = final-latent MSE, the selection metric for
`metric_for_best_model: rollout_mse`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .data import tokenize
from .unet_inputs import GUIDANCE


class RolloutPrompts(torch.utils.data.Dataset):
    """Caption token ids [N,77] (`prompt_ids`), and for a held-out set the seed of each item's initial noise."""

    def __init__(self, prompt_ids: torch.Tensor, seeds: torch.Tensor | None = None):
        self.prompt_ids, self.seeds = prompt_ids, seeds

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"prompt_ids": self.prompt_ids[i]}
        if self.seeds is not None:
            item["noise_seed"] = self.seeds[i]
        return item


def rollout_gap_set(tokenizer, num: int, seed: int, resolution: int, dataset_name: str = "synthetic",
                    caption_column: str = "text", image_column: str = "image") -> RolloutPrompts:  # fmt: skip
    """`num` held-out captions (as the teacher-gap set draws them) with a held-out noise seed each."""
    from .teacher_gap import HELDOUT_SEED_OFFSET, _heldout_rows

    ds = _heldout_rows(num, seed, resolution, dataset_name, caption_column, image_column)
    seeds = torch.arange(num, dtype=torch.long) + seed + HELDOUT_SEED_OFFSET
    return RolloutPrompts(tokenize(tokenizer, ds[caption_column]), seeds)


class Rollout:
    """Samples with a `QATModel`'s student and teacher exactly as the pipeline does (its scheduler, CFG)."""

    def __init__(self, scheduler, tokenizer, text_encoder, latent_shape: tuple[int, int, int], steps: int,
                 guidance_scale: float = GUIDANCE):  # fmt: skip
        self.scheduler_config = scheduler.config
        self.scheduler_cls = type(scheduler)
        self.latent_shape, self.steps, self.guidance_scale = latent_shape, steps, guidance_scale
        self.calls = len(self.scheduler().timesteps)  # UNet calls of one trajectory (PNDM: steps + 1)
        self._teacher_final: dict[tuple, torch.Tensor] = {}  # (seeds, caption ids) -> the teacher's final latents
        device = next(text_encoder.parameters()).device
        with torch.no_grad():
            self.uncond = text_encoder(tokenize(tokenizer, [""]).to(device), return_dict=False)[0].float()

    def scheduler(self):
        """A fresh scheduler (multistep ones keep history) set to `steps`."""
        s = self.scheduler_cls.from_config(self.scheduler_config)
        s.set_timesteps(self.steps)
        return s

    def noise(self, n: int, device, generator=None, seeds=None) -> torch.Tensor:
        if seeds is not None:  # one generator per item: an item's noise does not depend on its batch
            return torch.cat(
                [torch.randn((1, *self.latent_shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
            ).to(device)
        return torch.randn((n, *self.latent_shape), generator=generator, device=device)

    def step(self, model, net, scheduler, latents, t, states, extra=None):
        """One guided denoising step of `net` (the CFG batch as diffusers builds it: [uncond, cond])."""
        n = len(latents)
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        cond = torch.cat([self.uncond.expand(n, -1, -1), states])
        eps = model.unet(net, x, t.reshape(1).expand(2 * n), cond, extra).float()
        uncond_eps, cond_eps = eps.chunk(2)
        guided = uncond_eps + self.guidance_scale * (cond_eps - uncond_eps)
        return scheduler.step(guided, t, latents, return_dict=False)[0]

    def sample(self, model, net, states, noise, stop: int | None = None, grad_from: int | None = None,
               start: int = 0, scheduler=None):  # fmt: skip
        """`net`'s latent after UNet calls `start` to `stop` (default: all, from `noise`); gradient flows only from
        call `grad_from`. Returns (latents, scheduler): continuing from a state needs the scheduler's history too."""
        if scheduler is None:
            scheduler = self.scheduler()
            noise = noise * scheduler.init_noise_sigma
        latents = noise
        for i, t in enumerate(scheduler.timesteps[start:stop], start=start):
            with torch.set_grad_enabled(grad_from is not None and i >= grad_from):
                latents = self.step(model, net, scheduler, latents, t, states)
        return latents, scheduler

    def loss(self, model, prompt_ids, window: int, start_from: str = "student") -> dict:
        """The training loss of one batch of captions: window start k drawn from `model.generator`. `start_from`
        student: the student's own state after k calls (its accumulated drift included); teacher: the teacher's
        state and scheduler history after k calls (the window's own error only)."""
        g = model.generator
        device = prompt_ids.device
        with torch.no_grad():
            states = model.text_encoder(prompt_ids, return_dict=False)[0].float()
        window = min(window, self.calls)
        k = int(torch.randint(0, self.calls - window + 1, (1,), generator=g, device=g.device).item())
        noise = self.noise(len(prompt_ids), device, generator=g)
        with torch.no_grad():
            at_k, scheduler = self.sample(model, model.teacher, states, noise, stop=k)
            resume = copy.deepcopy(scheduler) if start_from == "teacher" else None
            target, _ = self.sample(model, model.teacher, states, at_k, start=k, stop=k + window, scheduler=scheduler)
        if resume is not None:
            latents, _ = self.sample(model, model.student, states, at_k, start=k, stop=k + window, grad_from=k,
                                     scheduler=resume)  # fmt: skip
        else:
            latents, _ = self.sample(model, model.student, states, noise, stop=k + window, grad_from=k)
        mse = F.mse_loss(latents, target)
        return {"loss": model.distillation_weight * mse, "distillation_loss": mse.detach()}

    @torch.no_grad()
    def gap(self, model, prompt_ids, noise_seed) -> dict:
        """Held-out: MSE between the student's and the teacher's final latents (whole trajectories). The frozen
        teacher's are sampled once per held-out batch and kept."""
        states = model.text_encoder(prompt_ids, return_dict=False)[0].float()
        seeds = tuple(noise_seed.tolist())
        noise = self.noise(len(prompt_ids), prompt_ids.device, seeds=seeds)
        student, _ = self.sample(model, model.student, states, noise)
        key = (seeds, tuple(prompt_ids.flatten().tolist()))
        if key not in self._teacher_final:
            self._teacher_final[key] = self.sample(model, model.teacher, states, noise)[0]
        teacher = self._teacher_final[key]
        mse = F.mse_loss(student, teacher)
        return {"loss": mse, "rollout_mse": mse}


def make_rollout(pipe, resolution: int, steps: int) -> Rollout:
    """A `Rollout` on `pipe`'s scheduler, tokenizer and text encoder at `resolution` px."""
    factor = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, resolution // factor, resolution // factor)
    return Rollout(pipe.scheduler, pipe.tokenizer, pipe.text_encoder, shape, steps)
