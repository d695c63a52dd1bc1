"""Stable Diffusion pipelines with random weights, built offline: tiny ones for tests, the SD 1.5 architecture for
speed benchmarks.

The tiny pipeline has SD's structure at a small scale: a CLIP text encoder, a KL autoencoder,
and a UNet whose highest-resolution blocks hold transformer blocks with self-attention and
cross-attention to the text (so quantization and token merging meet the same ops as in SD 1.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from . import synthetic
from .tokenizer import build_clip_tokenizer


@dataclass
class TinySDConfig:
    resolution: int = 64  # image side in pixels
    vae_channels: tuple[int, ...] = (32, 64, 64)  # 3 blocks -> VAE factor 4: 64 px -> 16x16 latents (256 tokens)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_layers_per_block: int = 1
    attention_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    norm_groups: int = 8
    seed: int = 0

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


# SD 1.x's noise schedule, so that training targets and inference schedulers behave like SD's.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
)


def build_components(cfg: TinySDConfig | None = None, tokenizer_dir: str | Path | None = None):
    """Return (tokenizer, text_encoder, vae, unet, scheduler), randomly initialised from cfg.seed."""
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = cfg or TinySDConfig()
    if cfg.resolution % cfg.vae_factor:
        raise UserError(f"resolution {cfg.resolution} is not divisible by the VAE factor {cfg.vae_factor}")
    torch.manual_seed(cfg.seed)
    if tokenizer_dir is None:  # the tokenizer lives in memory once loaded: its files can go
        with tempfile.TemporaryDirectory(prefix="ov-sd-tok-") as tmp:
            tokenizer = build_clip_tokenizer(tmp, synthetic.vocabulary())
    else:
        tokenizer = build_clip_tokenizer(tokenizer_dir, synthetic.vocabulary())
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * 4,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg.text_hidden,
    )
    text_encoder = CLIPTextModel(text_config)
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=cfg.norm_groups,
        sample_size=cfg.resolution,
    )
    m = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // cfg.vae_factor,
        in_channels=4,
        out_channels=4,
        # cross-attention blocks at every resolution but the lowest, like SD 1.5
        down_block_types=("CrossAttnDownBlock2D",) * (m - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (m - 1),
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.attention_heads,  # diffusers' SD configs use this field as the head count
        norm_num_groups=cfg.norm_groups,
    )
    scheduler = PNDMScheduler(**SD_SCHEDULER_CONFIG, skip_prk_steps=True, set_alpha_to_one=False)
    return tokenizer, text_encoder, vae, unet, scheduler


def assemble_pipeline(tokenizer, text_encoder, vae, unet, scheduler):
    """A `StableDiffusionPipeline` from its parts, with no safety checker (none exists offline)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_pipeline(output_dir: str | Path | None = None, cfg: TinySDConfig | None = None):
    """A randomly initialised tiny `StableDiffusionPipeline`; saved as a diffusers folder if asked."""
    pipe = assemble_pipeline(*build_components(cfg))
    if output_dir is not None:
        pipe.save_pretrained(output_dir, safe_serialization=True)
    return pipe


def build_sd15_unet(seed: int = 0):
    """The SD 1.5 UNet architecture (859.5 M parameters) with random weights, built offline.

    Latency does not depend on weight values, so this is a fair speed benchmark;
    quality numbers need a trained model. diffusers' `UNet2DConditionModel` defaults are SD 1.x's layout
    (320/640/1280/1280 channels, 2 layers per block, 8 heads); SD 1.5 reads 768-wide CLIP-L states."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)


def build_sd15_pipeline(output_dir: str | Path | None = None, seed: int = 0):
    """A full SD 1.5-architecture pipeline with random weights (CLIP ViT-L/14 text encoder, SD's VAE):
    for speed and footprint benchmarks at 512 px only. The tokenizer is the project's offline one."""
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="ov-sd-tok-") as tmp:
        tokenizer = build_clip_tokenizer(tmp, synthetic.vocabulary())
    text_encoder = CLIPTextModel(
        CLIPTextConfig(  # CLIP ViT-L/14's text tower, as in SD 1.5 (the vocabulary is the project's)
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=tokenizer.model_max_length,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=768,
        )
    )
    vae = AutoencoderKL(  # SD's autoencoder: factor 8, 4 latent channels
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    unet = build_sd15_unet(seed)
    scheduler = PNDMScheduler(**SD_SCHEDULER_CONFIG, skip_prk_steps=True, set_alpha_to_one=False)
    pipe = assemble_pipeline(tokenizer, text_encoder, vae, unet, scheduler)
    if output_dir is not None:
        pipe.save_pretrained(output_dir, safe_serialization=True)
    return pipe


# --------------------------------------------------------------------------------------------------------------------
# `ov-sd make-tiny`
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(s) -> None:
    s.add_argument("--output", required=True)
    s.add_argument("--resolution", type=int, default=TinySDConfig.resolution)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def main(args) -> int:
    from ..outputs import atomic_output_dir

    with atomic_output_dir(args.output, overwrite=args.overwrite) as tmp:
        build_tiny_pipeline(tmp, TinySDConfig(resolution=args.resolution, seed=args.seed))
    print(f"tiny Stable Diffusion pipeline written to {args.output}")
    return 0
