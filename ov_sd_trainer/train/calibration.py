"""Calibration inputs for NNCF's range initialisation of the student: real UNet inputs, two ways.

- `training` (`collect_calibration_inputs`): noisy latents of training images at uniformly random timesteps with
  their caption embeddings, one item per image, as training sees them;
- `trajectories` (`collect_trajectory_inputs`): the UNet inputs of the FP32 pipeline itself sampling the training
  captions (classifier-free guidance, the pipeline's scheduler), as optimum-intel's post-training quantization
  collects them. Measured on the reference model (`benchmarks/qat_start_error.py`), this halves the calibrated
  student's one-step error: the activation ranges then fit the inputs the UNet meets at inference (late, low-noise
  steps included), not the training distribution.
"""

from __future__ import annotations

import torch

from .data import collate

SOURCES = ("training", "trajectories")
DEFAULT_STEPS = 25  # denoising steps of each calibration trajectory
GUIDANCE = 7.5  # diffusers' default: the CFG batch the exported UNet runs


@torch.no_grad()
def collect_calibration_inputs(model, dataset, num_samples: int, seed: int, device) -> list[dict]:
    """Real UNet inputs for NNCF's range initialisation: noisy latents of training images at random
    timesteps with their caption embeddings, one sample per item (as training sees them)."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g)[:num_samples].tolist()
    items = []
    for n, i in enumerate(tqdm(order, desc="calibration inputs", leave=False)):
        row = collate([dataset[i]])
        model.set_noise_seed(seed, stream=1, index=n)  # a stream of its own, apart from training's
        latents, states = model.encode(row["pixel_values"].to(device), row["input_ids"].to(device))
        noisy, _, t = model.noisy_inputs(latents)
        items.append({"sample": noisy, "timestep": t, "encoder_hidden_states": states})
    return items


@torch.no_grad()
def collect_trajectory_inputs(pipe, prompts: list[str], num_samples: int, resolution: int, seed: int,
                              steps: int = DEFAULT_STEPS, guidance_scale: float = GUIDANCE) -> list[dict]:  # fmt: skip
    """The first `num_samples` UNet calls of `pipe` (a diffusers SD pipeline whose UNet is the FP32 teacher) sampling
    `prompts` (shuffled by `seed`, cycled) at `resolution` px; each item holds the CFG batch of one call:
    sample [2,C,h,w], timestep [2], encoder_hidden_states [2,77,D]."""
    import random

    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("trajectory calibration needs the training captions")
    order = list(prompts)
    random.Random(seed).shuffle(order)
    items: list[dict] = []

    def record(module, args, kwargs):
        if len(items) < num_samples:
            sample = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
            t = torch.as_tensor(t, device=sample.device).reshape(-1).expand(sample.shape[0]).long()
            items.append({"sample": sample.detach().clone(), "timestep": t.clone(), "encoder_hidden_states": states})

    def stop_when_full(p, step, timestep, callback_kwargs):
        if len(items) >= num_samples:
            p._interrupt = True  # diffusers skips the remaining steps
        return callback_kwargs

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    disable = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe.set_progress_bar_config(disable=True)
    try:
        with tqdm(total=num_samples, desc="calibration trajectories", leave=False) as bar:
            i = 0
            while len(items) < num_samples:
                pipe(order[i % len(order)], num_inference_steps=steps, guidance_scale=guidance_scale,
                     height=resolution, width=resolution, generator=torch.Generator().manual_seed(seed + i),
                     output_type="latent", callback_on_step_end=stop_when_full)  # fmt: skip
                pipe._interrupt = False
                bar.update(min(len(items), num_samples) - bar.n)
                i += 1
    finally:
        handle.remove()
        pipe.set_progress_bar_config(disable=disable)
    return items[:num_samples]
