"""The teacher-gap set: fixed, seeded, held-out UNet inputs on which the student is compared with its FP32 teacher.

Held-out synthetic images (drawn from a seed the training data never uses) encoded by the VAE (posterior mean),
noised at timesteps spread evenly over the schedule with fixed noise, and paired with their captions' text
embeddings. The set is computed once; during training the Trainer's own evaluation loop (`eval_strategy`,
`eval_steps`) runs the student on it and logs `eval_teacher_mse` (student vs teacher noise prediction, the number the
export should keep small) and `eval_task_loss` (student vs the true target), so that `load_best_model_at_end` with
`metric_for_best_model="teacher_mse"` keeps the best student. `benchmarks/qat_start_error.py` uses the same set, and
`heldout_rows` gives the held-out captions of the calibration draws' rollouts (`train.rollouts`).
"""

from __future__ import annotations

import torch

from .. import families
from .data import tokenize
from .unet_inputs import UNetInputs

HELDOUT_SEED_OFFSET = 7_777_777  # held-out images come from seed + this offset; training data uses `seed` itself
NOISE_SEED = 2024


@torch.no_grad()
def build_teacher_gap_set(model, tokenizer, num: int, seed: int, resolution: int, dataset_name: str = "synthetic",
                          caption_column: str = "text", image_column: str = "image") -> UNetInputs:  # fmt: skip
    """`num` held-out UNet inputs for `model` (a `QATModel`: its VAE, text encoder and noise schedule).

    For the synthetic dataset the images are fresh ones from `seed + HELDOUT_SEED_OFFSET`; for any other dataset
    the last `num` rows serve (shuffle-free, so the choice is fixed; they are also seen in training)."""
    from torchvision.transforms import functional as TF

    ds = heldout_rows(num, seed, resolution, dataset_name, caption_column, image_column)
    pixels = torch.stack(
        [
            TF.to_tensor(TF.center_crop(TF.resize(im.convert("RGB"), resolution), resolution)) * 2 - 1
            for im in list(ds[image_column])
        ]
    )
    ids = tokenize(tokenizer, ds[caption_column])
    device = next(model.student.parameters()).device
    vae = model.vae
    latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
    n = len(latents)
    extra = {}
    if families.is_sdxl(model.teacher.config):  # both encoders' states, the pooled projection, uncropped time ids
        ids_2 = tokenize(model.pipeline.tokenizer_2, ds[caption_column])
        states, pooled = families.sdxl_encode_prompts(model.text_encoder, model.text_encoder_2, ids, ids_2)
        size = (resolution, resolution)
        extra = {families.TEXT_EMBEDS: pooled.float().to(device),
                 families.TIME_IDS: families.sdxl_time_ids(size, (0, 0), size, n).to(device)}  # fmt: skip
        states = states.float().to(device)
    else:
        states = model.text_encoder(ids.to(device), return_dict=False)[0].float()
        extra = families.heldout_extra(model.teacher.config, n, device)  # LCM: a fixed guidance embedding
    n_train = model.noise_scheduler.config.num_train_timesteps
    timesteps = torch.tensor([int((i + 0.5) * n_train / n) for i in range(n)], dtype=torch.long, device=device)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(NOISE_SEED)).to(device)
    sample = model.noise_scheduler.add_noise(latents, noise, timesteps)
    items = {"sample": sample, "timestep": timesteps, "encoder_hidden_states": states}
    items.update(extra)
    if families.TIMESTEP_COND not in extra:  # an LCM has no noise-prediction target (`families`)
        items["target"] = model.target(latents, noise, timesteps).float()
    return UNetInputs(items)


def heldout_rows(num, seed, resolution, dataset_name, caption_column, image_column):
    """Held-out rows: fresh synthetic ones from `seed + HELDOUT_SEED_OFFSET`, else the dataset's last `num`."""
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
    return ds
