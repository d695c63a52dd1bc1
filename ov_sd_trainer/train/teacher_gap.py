"""The teacher-gap set: fixed, seeded, held-out UNet inputs on which the student is compared with its FP32 teacher.

Held-out synthetic images (drawn from a seed the training data never uses) are encoded by the VAE (posterior mean),
noised at timesteps spread evenly over the schedule with fixed noise, and paired with their captions' text
embeddings. The set is computed once; during training the Trainer's own evaluation loop (`eval_strategy`,
`eval_steps`) runs the student on it and logs `eval_teacher_mse` (student vs teacher noise prediction, the number the
export should keep small) and `eval_task_loss` (student vs the true target), so that `load_best_model_at_end` with
`metric_for_best_model="teacher_mse"` keeps the best student. `benchmarks/qat_start_error.py` uses the same set.
"""

from __future__ import annotations

import torch

HELDOUT_SEED_OFFSET = 7_777_777  # held-out images come from seed + this offset; training data uses `seed` itself
NOISE_SEED = 2024


class TeacherGapSet(torch.utils.data.Dataset):
    """Precomputed items: sample [4,h,w], timestep [] (long), encoder_hidden_states [77,D], target [4,h,w]."""

    def __init__(self, items: dict[str, torch.Tensor]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items["sample"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.items.items()}


@torch.no_grad()
def build_teacher_gap_set(model, tokenizer, num: int, seed: int, resolution: int, dataset_name: str = "synthetic",
                          caption_column: str = "text", image_column: str = "image") -> TeacherGapSet:  # fmt: skip
    """`num` held-out UNet inputs for `model` (a `QATModel`: its VAE, text encoder and noise schedule).

    For the synthetic dataset the images are fresh ones from `seed + HELDOUT_SEED_OFFSET`; for any other dataset
    the last `num` rows serve (shuffle-free, so the choice is fixed; they are also seen in training)."""
    from torchvision.transforms import functional as TF

    from .data import load_captioned_dataset

    name = "synthetic" if dataset_name.startswith("synthetic") else dataset_name
    ds = load_captioned_dataset(
        name,
        image_column=image_column,
        caption_column=caption_column,
        synthetic_size=num,
        synthetic_resolution=resolution,
        seed=seed + HELDOUT_SEED_OFFSET,
    )
    if name != "synthetic":
        ds = ds.select(range(max(0, len(ds) - num), len(ds)))
    pixels = torch.stack(
        [
            TF.to_tensor(TF.center_crop(TF.resize(im.convert("RGB"), resolution), resolution)) * 2 - 1
            for im in list(ds[image_column])
        ]
    )
    ids = tokenizer(
        list(ds[caption_column]), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip
    device = next(model.student.parameters()).device
    vae = model.vae
    latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
    states = model.text_encoder(ids.to(device), return_dict=False)[0].float()
    n = len(latents)
    n_train = model.noise_scheduler.config.num_train_timesteps
    timesteps = torch.tensor([int((i + 0.5) * n_train / n) for i in range(n)], dtype=torch.long, device=device)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(NOISE_SEED)).to(device)
    sample = model.noise_scheduler.add_noise(latents, noise, timesteps)
    target = model.target(latents, noise, timesteps).float()
    return TeacherGapSet({"sample": sample, "timestep": timesteps, "encoder_hidden_states": states, "target": target})
