"""Train the small reference Stable Diffusion model from scratch on the synthetic dataset.

    ov-sd make-reference --output ov_sd_trainer/assets/reference --seed 0

reproduces the committed model in `ov_sd_trainer/assets/reference/` (a standard diffusers
`StableDiffusionPipeline` folder; `assets.reference_model_path()` returns it). Two stages, like SD:

1. **Autoencoder.** An `AutoencoderKL` (VAE factor 4: 64 px images -> 16x16x4 latents) is trained on
   synthetic images with an L1 + MSE reconstruction loss and a small KL term. Its held-out
   reconstruction PSNR (images drawn from a seed not used in training) is measured and printed.
   As in SD, `vae.config.scaling_factor` is set to 1 / std of the training latents, so the UNet sees
   latents of unit variance.
2. **UNet.** A `UNet2DConditionModel` (cross-attention to the text at every resolution but the
   lowest, self-attention over the 16x16 = 256 latent tokens at the highest resolution) is trained
   with diffusers' standard noise-prediction (epsilon) objective under SD 1.x's noise schedule
   (`DDPMScheduler` with `builders.SD_SCHEDULER_CONFIG`'s betas), min-SNR loss weighting (gamma 5) and
   an EMA of the weights (the EMA weights are saved). For classifier-free guidance, 10% of the
   captions are replaced by the empty prompt "" (tokenized the same way), so guidance works at
   inference.

**Text encoder: trained jointly with the UNet** (default; `--train-text-encoder false` freezes it at its random
initialisation). SD freezes a *pretrained* CLIP; here there is none to download, and a frozen random encoder proved a
weak reader of the captions: the first reference model (1100 UNet steps, frozen encoder) reached only 40 % shape and
28 % background accuracy, with background embeddings at cosine 0.75 to each other. Training the tiny encoder (0.14 M
parameters) costs little: each step encodes only the distinct captions of its batch.

Speed tricks (2 CPU cores): images are drawn once and kept as uint8; the VAE posterior (mean, std)
of every training image is computed once and latents are re-sampled from it each step; the caption
embeddings are precomputed when the encoder is frozen; AdamW with linear warm-up and cosine decay; `torch.set_num_threads(--threads)`, default 1: on
the shared 2-core machine the model was trained on, two threads contending with other jobs ran about
3x slower than one.

The output folder gets the pipeline (safetensors, no safety checker, the PNDM scheduler of
`builders.build_components` so it infers like SD 1.5) and `training_log.json` (command line, seed,
steps, losses, time per stage, PSNR, scaling factor).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import synthetic
from .builders import SD_SCHEDULER_CONFIG, TinySDConfig, assemble_pipeline, build_components

# The reference model's architecture: the project's tiny SD layout with a wider UNet and a lighter VAE.
REFERENCE_CONFIG = dict(
    resolution=64,
    vae_channels=(16, 32, 64),  # VAE factor 4 -> 16x16 latents = 256 self-attention tokens
    unet_channels=(48, 96, 128),
    unet_layers_per_block=1,
    attention_heads=4,
    text_hidden=64,
    text_layers=2,
    text_heads=4,
    norm_groups=8,
)
EVAL_SEED_OFFSET = 1_000_003  # held-out images come from seed + this offset, never used in training


def make_images(num_images: int, seed: int, resolution: int = 64) -> tuple[torch.Tensor, list[str]]:
    """Synthetic images as a uint8 tensor (N, 3, H, W) and their captions."""
    ds = synthetic.make_synthetic_dataset(num_images, seed=seed, resolution=resolution)
    images = np.stack([np.asarray(im.convert("RGB")) for im in ds["image"]])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), list(ds["text"])


def to_model_range(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float().div_(127.5).sub_(1.0)


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.05):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


@torch.no_grad()
def vae_psnr(vae, images_uint8: torch.Tensor, batch_size: int = 64) -> float:
    """Mean PSNR (dB, images in [0, 1]) of encode (posterior mean) -> decode."""
    vae.eval()
    psnrs = []
    for i in range(0, len(images_uint8), batch_size):
        x = to_model_range(images_uint8[i : i + batch_size])
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((rec - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnrs.append(10 * torch.log10(1.0 / mse))
    return float(torch.cat(psnrs).mean())


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int, log):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(100, steps // 10 + 1), steps))
    vae.train()
    bar = tqdm(range(steps), desc="vae", dynamic_ncols=True)
    running = None
    for step in bar:
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x = to_model_range(images[idx])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        rec_loss = F.mse_loss(rec, x) + F.l1_loss(rec, x)
        kl = post.kl().mean()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{running:.4f}", kl=f"{kl.item():.1f}")
            log.append(
                dict(step=step, loss=round(loss.item(), 6), rec=round(rec_loss.item(), 6), kl=round(kl.item(), 3))
            )
    vae.eval()


@torch.no_grad()
def encode_posteriors(vae, images: torch.Tensor, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="encode latents", dynamic_ncols=True):
        d = vae.encode(to_model_range(images[i : i + batch_size])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def tokenize_prompts(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids exactly as `StableDiffusionPipeline.encode_prompt` makes them (padded to 77)."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompts_from_ids(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(ids)[0]


def train_unet(
    unet,
    lat_mean: torch.Tensor,
    lat_std: torch.Tensor,
    scaling_factor: float,
    caption_idx: torch.Tensor,
    text_encoder,
    prompt_ids: torch.Tensor,
    train_text_encoder: bool,
    empty_idx: int,
    steps: int,
    batch_size: int,
    lr: float,
    cfg_dropout: float,
    snr_gamma: float,
    ema_decay: float,
    seed: int,
    log,
):
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(
        num_train_timesteps=SD_SCHEDULER_CONFIG["num_train_timesteps"],
        beta_start=SD_SCHEDULER_CONFIG["beta_start"],
        beta_end=SD_SCHEDULER_CONFIG["beta_end"],
        beta_schedule=SD_SCHEDULER_CONFIG["beta_schedule"],
        prediction_type="epsilon",
    )
    alphas_cumprod = noise_sched.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    g = torch.Generator().manual_seed(seed)
    params = [p for p in unet.parameters() if p.requires_grad]
    if train_text_encoder:
        text_encoder.requires_grad_(True).train()
        params += list(text_encoder.parameters())
        embeddings = None
    else:  # frozen: the few distinct caption embeddings are computed once
        embeddings = encode_prompts_from_ids(text_encoder, prompt_ids)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(200, steps // 10 + 1), steps))
    unet.train()
    bar = tqdm(range(steps), desc="unet", dynamic_ncols=True)
    running = None
    n_t = noise_sched.config.num_train_timesteps
    for step in bar:
        idx = torch.randint(len(lat_mean), (batch_size,), generator=g)
        latents = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, n_t, (batch_size,), generator=g)
        noisy = noise_sched.add_noise(latents, noise, t)
        cap = caption_idx[idx].clone()
        cap[torch.rand(batch_size, generator=g) < cfg_dropout] = empty_idx
        if train_text_encoder:  # encode only the distinct captions of this batch (gradients flow into CLIP)
            uniq, inverse = torch.unique(cap, return_inverse=True)
            states = text_encoder(prompt_ids[uniq])[0][inverse]
        else:
            states = embeddings[cap]
        pred = unet(noisy, t, states).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").flatten(1).mean(1)
        if snr_gamma > 0:  # min-SNR weighting (Hang et al. 2023) for epsilon prediction
            s = snr[t]
            per_sample = per_sample * torch.clamp(s, max=snr_gamma) / s
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            log.append(dict(step=step, loss=round(loss.item(), 6), smoothed=round(running, 6)))
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.requires_grad_(False).eval()


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def add_arguments(p) -> None:
    p.add_argument("--output", required=True, help="folder for the pipeline and training_log.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=8000, help="synthetic training images")
    p.add_argument("--eval-images", type=int, default=512, help="held-out images for the VAE PSNR")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch-size", type=int, default=8)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--unet-steps", type=int, default=2700)
    p.add_argument("--unet-batch-size", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=6e-4)
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="fraction of captions replaced by ''")
    p.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR weighting; 0 disables")
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument(
        "--train-text-encoder",
        type=lambda v: {"true": True, "false": False}[v.lower()],
        default=True,
        help="train the tiny CLIP text encoder jointly with the UNet (true/false)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads; 1 is fastest on a shared 2-core machine")


def main(args) -> int:
    train_reference(args)
    return 0


def train_reference(args) -> dict:
    """Both stages with the parsed `ov-sd make-reference` arguments; returns the training record."""
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = dict(
        command="ov-sd make-reference " + " ".join(sys.argv[2:]),
        args=vars(args),
        seed=args.seed,
        config=REFERENCE_CONFIG,
        versions=dict(torch=torch.__version__, python=platform.python_version()),
        times_s={},
    )
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    cfg = TinySDConfig(**REFERENCE_CONFIG, seed=args.seed)
    tokenizer, text_encoder, vae, unet, scheduler = build_components(cfg)
    text_encoder.requires_grad_(False).eval()
    images, captions = make_images(args.num_images, args.seed, cfg.resolution)
    eval_images, _ = make_images(args.eval_images, args.seed + EVAL_SEED_OFFSET, cfg.resolution)
    record["times_s"]["data"] = round(time.perf_counter() - t0, 1)
    print(f"data: {len(images)} training images, {len(eval_images)} held-out ({record['times_s']['data']} s)")

    # Stage 1: autoencoder.
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    record["vae_log"] = []
    train_vae(
        vae, images, args.vae_steps, args.vae_batch_size, args.vae_lr, args.kl_weight, args.seed, record["vae_log"]
    )
    psnr = vae_psnr(vae, eval_images)
    lat_mean, lat_std = encode_posteriors(vae, images)
    g = torch.Generator().manual_seed(args.seed + 1)
    sampled = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=g)
    scaling_factor = float(1.0 / sampled.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    record["times_s"]["vae"] = round(time.perf_counter() - t0, 1)
    record["vae_psnr_db"] = round(psnr, 2)
    record["scaling_factor"] = scaling_factor
    print(f"VAE held-out reconstruction PSNR: {psnr:.2f} dB; scaling_factor = 1/std = {scaling_factor:.4f}")

    # Stage 2: UNet.
    t0 = time.perf_counter()
    prompts = sorted(set(captions))
    prompt_index = {c: i for i, c in enumerate(prompts)}
    prompt_ids = tokenize_prompts(tokenizer, prompts + [""])
    caption_idx = torch.tensor([prompt_index[c] for c in captions])
    torch.manual_seed(args.seed)
    record["unet_log"] = []
    train_unet(
        unet,
        lat_mean,
        lat_std,
        scaling_factor,
        caption_idx,
        text_encoder,
        prompt_ids,
        args.train_text_encoder,
        len(prompts),
        args.unet_steps,
        args.unet_batch_size,
        args.unet_lr,
        args.cfg_dropout,
        args.snr_gamma,
        args.ema_decay,
        args.seed,
        record["unet_log"],
    )
    record["times_s"]["unet"] = round(time.perf_counter() - t0, 1)
    record["distinct_prompts"] = len(prompts)

    pipe = assemble_pipeline(tokenizer, text_encoder, vae, unet, scheduler)
    pipe.save_pretrained(out, safe_serialization=True)
    record["times_s"]["total"] = round(time.perf_counter() - t_start, 1)
    record["pipeline_size_mb"] = round(dir_size_mb(out), 2)
    (out / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"saved {out} ({record['pipeline_size_mb']} MB); times (s): {record['times_s']}; "
        f"VAE PSNR {record['vae_psnr_db']} dB"
    )
    return record
