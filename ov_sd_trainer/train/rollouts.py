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

Latent error is not what the images are measured on: the VAE decoder weighs it unevenly (on the reference model,
rollouts cut the final-latent error by a quarter to a third while image PSNR did not move). Two pixel-space parts
therefore: `rollout_pixel_weight` > 0 adds, at the window's last UNet call, the MSE between the decoded clean images
the student and the teacher predict there (frozen VAE decoder, pixels in [-1, 1], weighted by the schedule's
alpha_bar at that timestep so that high-noise steps are not amplified), and the held-out evaluation decodes the final
latents too (`rollout_image_mse`, pixels in [0, 1], and `rollout_psnr` = -10 log10 of it: what `ov-sd eval`'s PSNR
measures).

`RolloutPrompts` is the training dataset (caption token ids), `rollout_gap_set` the held-out evaluation (full
trajectories from held-out seeds; `eval_rollout_mse` = final-latent MSE, `eval_rollout_psnr` the decoded images':
the selection metrics for `metric_for_best_model: rollout_mse` or `rollout_psnr`).
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

    def step(self, model, net, scheduler, latents, t, states, extra=None, with_x0: bool = False):
        """One guided denoising step of `net` (the CFG batch as diffusers builds it: [uncond, cond]). `with_x0`:
        also the clean latent the guided prediction implies at `t` (`predicted_x0`)."""
        n = len(latents)
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        cond = torch.cat([self.uncond.expand(n, -1, -1), states])
        eps = model.unet(net, x, t.reshape(1).expand(2 * n), cond, extra).float()
        uncond_eps, cond_eps = eps.chunk(2)
        guided = uncond_eps + self.guidance_scale * (cond_eps - uncond_eps)
        out = scheduler.step(guided, t, latents, return_dict=False)[0]
        return (out, predicted_x0(scheduler, latents, guided, t)) if with_x0 else out

    def sample(self, model, net, states, noise, stop: int | None = None, grad_from: int | None = None,
               start: int = 0, scheduler=None, with_x0: bool = False):  # fmt: skip
        """`net`'s latent after UNet calls `start` to `stop` (default: all, from `noise`); gradient flows only from
        call `grad_from`. Returns (latents, scheduler): continuing from a state needs the scheduler's history too;
        `with_x0`: (latents, scheduler, (clean latent predicted at the last call, its timestep))."""
        if scheduler is None:
            scheduler = self.scheduler()
            noise = noise * scheduler.init_noise_sigma
        latents, last = noise, None
        for i, t in enumerate(scheduler.timesteps[start:stop], start=start):
            with torch.set_grad_enabled(grad_from is not None and i >= grad_from):
                latents = self.step(model, net, scheduler, latents, t, states, with_x0=with_x0)
                if with_x0:
                    latents, last = latents[0], (latents[1], t)
        return (latents, scheduler, last) if with_x0 else (latents, scheduler)

    def loss(self, model, prompt_ids, window: int, start_from: str = "student", pixel_weight: float = 0.0) -> dict:
        """The training loss of one batch of captions: window start k drawn from `model.generator`. `start_from`
        student: the student's own state after k calls (its accumulated drift included); teacher: the teacher's
        state and scheduler history after k calls (the window's own error only). `pixel_weight`: see the module."""
        g = model.generator
        device = prompt_ids.device
        with torch.no_grad():
            states = model.text_encoder(prompt_ids, return_dict=False)[0].float()
        window = min(window, self.calls)
        k = int(torch.randint(0, self.calls - window + 1, (1,), generator=g, device=g.device).item())
        noise = self.noise(len(prompt_ids), device, generator=g)
        pixels = pixel_weight > 0  # the clean-latent estimates are only computed for the pixel term
        with torch.no_grad():
            at_k, scheduler = self.sample(model, model.teacher, states, noise, stop=k)
            resume = copy.deepcopy(scheduler) if start_from == "teacher" else None
            target, _, *t_x0 = self.sample(model, model.teacher, states, at_k, start=k, stop=k + window,
                                           scheduler=scheduler, with_x0=pixels)  # fmt: skip
        if resume is not None:
            latents, _, *x0 = self.sample(model, model.student, states, at_k, start=k, stop=k + window, grad_from=k,
                                          scheduler=resume, with_x0=pixels)  # fmt: skip
        else:
            latents, _, *x0 = self.sample(model, model.student, states, noise, stop=k + window, grad_from=k,
                                          with_x0=pixels)  # fmt: skip
        mse = F.mse_loss(latents, target)
        out = {"distillation_loss": mse.detach()}
        loss = mse
        if pixels:
            (student_x0, t), (teacher_x0, _) = x0[0], t_x0[0]
            with torch.no_grad():
                teacher_image = decode(model.vae, teacher_x0)
            weight = scheduler.alphas_cumprod[int(t)].item()
            pixel = weight * F.mse_loss(decode(model.vae, student_x0), teacher_image)
            loss = loss + pixel_weight * pixel
            out["pixel_loss"] = pixel.detach()
        out["loss"] = model.distillation_weight * loss
        return out

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
            final = self.sample(model, model.teacher, states, noise)[0]
            self._teacher_final[key] = (final, to_unit(decode(model.vae, final)))
        teacher, teacher_image = self._teacher_final[key]
        mse = F.mse_loss(student, teacher)
        image_mse = F.mse_loss(to_unit(decode(model.vae, student)), teacher_image)
        return {"loss": mse, "rollout_mse": mse, "rollout_image_mse": image_mse}


def predicted_x0(scheduler, latents, guided, t):
    """The clean latent implied by a guided prediction at `t` (epsilon or v), for alpha_bar schedulers (DDPM, DDIM,
    PNDM, ...: the model input is the latent itself)."""
    alpha = scheduler.alphas_cumprod[int(t)].to(latents.device, latents.dtype)
    if scheduler.config.prediction_type == "v_prediction":
        return alpha.sqrt() * latents - (1 - alpha).sqrt() * guided
    return (latents - (1 - alpha).sqrt() * guided) / alpha.sqrt()


def decode(vae, latents):
    """Latents -> images in [-1, 1] through the frozen VAE decoder (gradient flows to the latents)."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0].float().clamp(-1, 1)


def to_unit(images):
    """[-1, 1] -> [0, 1], the range of `ov-sd eval`'s PSNR."""
    return (images + 1) / 2


def check_pixel_scheduler(scheduler) -> None:
    """`rollout_pixel_weight` needs the clean-latent estimate of an alpha_bar scheduler whose model input is the
    latent itself; a sigma scheduler (Euler, ...) scales it."""
    from ..errors import UserError

    if getattr(scheduler, "alphas_cumprod", None) is None or float(scheduler.init_noise_sigma) != 1.0:
        raise UserError(
            f"rollout_pixel_weight needs an alpha_bar scheduler (DDIM, PNDM, DDPM); {type(scheduler).__name__} "
            "scales its inputs: set rollout_pixel_weight 0 or use a DDIM/PNDM scheduler"
        )


def make_rollout(pipe, resolution: int, steps: int) -> Rollout:
    """A `Rollout` on `pipe`'s scheduler, tokenizer and text encoder at `resolution` px."""
    factor = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, resolution // factor, resolution // factor)
    return Rollout(pipe.scheduler, pipe.tokenizer, pipe.text_encoder, shape, steps)
