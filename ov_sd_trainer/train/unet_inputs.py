"""Real UNet inputs the student is calibrated, trained and evaluated on, from two sources.

- `training` (`collect_calibration_inputs`): noisy latents of training images at uniformly random timesteps with
  their caption embeddings, as the task loss sees them;
- `trajectories` (`collect_trajectory_inputs`): the UNet calls of the FP32 pipeline itself sampling the training
  captions (classifier-free guidance, the pipeline's scheduler), with the teacher's output for each, as
  optimum-intel's post-training quantization collects its calibration data. Measured on the reference model
  (`benchmarks/qat_start_error.py`), calibrating on them halves the calibrated student's one-step error: the ranges
  then fit the inputs the UNet meets at inference (late, low-noise steps, the unconditional half of each CFG batch),
  not the training distribution.

`UNetInputs` holds precomputed inputs as a dataset (the held-out teacher-gap set, `train.teacher_gap`).
"""

from __future__ import annotations

import torch

from .. import families
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
        ids_2 = row["input_ids_2"].to(device) if "input_ids_2" in row else None
        latents, states, pooled = model.encode(row["pixel_values"].to(device), row["input_ids"].to(device), ids_2)
        noisy, _, t = model.noisy_inputs(latents)
        extra = model.image_extra(latents, pooled, row.get("original_size"), row.get("crop_top_left"),
                                  row["pixel_values"].shape[-2:])  # fmt: skip
        items.append({"sample": noisy, "timestep": t, "encoder_hidden_states": states, **extra})
    return items


PROMPTS_PER_CALL = 8  # trajectories sampled together: one pipeline call, the UNet at batch 2 x 8


def _trajectories(pipe, prompts: list[str], seed: int, resolution: int, steps: int, guidance_scale: float,
                  max_calls: int | None = None) -> list[list[dict]]:  # fmt: skip
    """Sample `prompts` together (one pipeline call, latents from `torch.Generator().manual_seed(seed)`) and return,
    per prompt, its trajectory: the first `max_calls` (default all) UNet calls, each as one item holding that prompt's
    CFG pair of inputs (sample [2,C,h,w], timestep [2], encoder_hidden_states [2,77,D], and a family's extra inputs,
    e.g. LCM's timestep_cond [2,E], SDXL's text_embeds [2,P] and time_ids [2,6]) and the UNet's output for it (`teacher_pred` [2,C,h,w]: the FP32 teacher's noise
    prediction, before guidance). Without CFG (guidance <= 1, or an LCM, whose guidance is an input) an item holds one
    input. (diffusers' LCM pipeline has no interrupt: it runs all `steps`, the calls past `max_calls` unrecorded.)"""
    n = len(prompts)
    per_prompt: list[list[dict]] = [[] for _ in range(n)]
    max_calls = steps if max_calls is None else max_calls

    def record(module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        t = torch.as_tensor(t, device=sample.device).reshape(-1).expand(sample.shape[0]).long()
        pred = output[0] if isinstance(output, tuple) else output.sample
        call = {"sample": sample, "timestep": t, "encoder_hidden_states": states, "teacher_pred": pred}
        # a family's extra inputs (LCM: timestep_cond; SDXL: text_embeds, time_ids from added_cond_kwargs)
        call.update(families.extra_from_unet_kwargs(module.config, kwargs))
        # diffusers' CFG batch is [unconditional x n, conditional x n]: prompt i's pair is rows i and n + i
        rows = [[i, n + i] for i in range(n)] if sample.shape[0] == 2 * n else [[i] for i in range(n)]
        for i, r in enumerate(rows):
            if len(per_prompt[i]) < max_calls:
                per_prompt[i].append({k: v[r].detach().clone() for k, v in call.items()})

    def stop_when_full(p, step, timestep, callback_kwargs):
        if step + 1 >= max_calls:
            p._interrupt = True  # diffusers skips the remaining steps
        return callback_kwargs

    handle = pipe.unet.register_forward_hook(record, with_kwargs=True)
    try:
        pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale, height=resolution,
             width=resolution, generator=torch.Generator().manual_seed(seed), output_type="latent",
             callback_on_step_end=stop_when_full)  # fmt: skip
    finally:
        pipe._interrupt = False
        handle.remove()
    return per_prompt


def quiet_progress(pipe):
    """Silence the pipeline's own progress bar (ours counts calls); returns the undo."""
    disable = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe.set_progress_bar_config(disable=True)
    return lambda: pipe.set_progress_bar_config(disable=disable)


@torch.no_grad()
def collect_trajectory_inputs(pipe, prompts: list[str], num_samples: int, resolution: int, seed: int,
                              steps: int = DEFAULT_STEPS, guidance_scale: float = GUIDANCE,
                              desc: str = "teacher trajectories") -> list[dict]:  # fmt: skip
    """`num_samples` UNet calls of `pipe` (a diffusers SD pipeline whose UNet is the FP32 teacher) sampling `prompts`
    (shuffled by `seed`, cycled; `PROMPTS_PER_CALL` trajectories at a time, batch k seeded by `seed + k`) at
    `resolution` px, whole trajectories one after another (the last one cut): each item holds one call's CFG pair,
    sample [2,C,h,w], timestep [2], encoder_hidden_states [2,77,D], teacher_pred [2,C,h,w]. Deterministic: the
    first N items are the same whatever `num_samples` >= N is asked for."""
    import random

    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("trajectory inputs need the training captions")
    order = list(prompts)
    random.Random(seed).shuffle(order)
    items: list[dict] = []
    undo = quiet_progress(pipe)
    try:
        with tqdm(total=num_samples, desc=desc, leave=False) as bar:
            k = 0
            while len(items) < num_samples:
                batch = [order[(k * PROMPTS_PER_CALL + j) % len(order)] for j in range(PROMPTS_PER_CALL)]
                for trajectory in _trajectories(pipe, batch, seed + k, resolution, steps, guidance_scale):
                    items += trajectory
                bar.update(min(len(items), num_samples) - bar.n)
                k += 1
    finally:
        undo()
    return items[:num_samples]


class UNetInputs(torch.utils.data.Dataset):
    """Precomputed single UNet inputs, dict of stacked tensors: sample [N,C,h,w], timestep [N] (long),
    encoder_hidden_states [N,77,D], a family's extra inputs (LCM: timestep_cond [N,E]), and optionally target
    [N,C,h,w] (the true target)."""

    def __init__(self, items: dict[str, torch.Tensor]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items["sample"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.items.items()}
