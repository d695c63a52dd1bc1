"""Stable Diffusion pipelines with random weights, built offline: tiny ones for tests, the SD 1.5 architecture for
speed benchmarks.

The tiny pipeline has SD's structure at a small scale: a CLIP text encoder, a KL autoencoder,
and a UNet whose highest-resolution blocks hold transformer blocks with self-attention and
cross-attention to the text (so quantization and token merging meet the same ops as in SD 1.5).
`TinySDConfig.family` picks the family's traits (`TINY_FAMILIES`): `sd1` (SD 1.x), `sd2` (SD 2.x: v-prediction
DDIM scheduler, linear projections in the transformer blocks, a head count per block, upcast attention, GELU text
encoder) or `lcm` (a latent consistency model: the UNet takes LCM's guidance embedding, `time_cond_proj_dim`, and
runs with `LCMScheduler` in a `LatentConsistencyModelPipeline`), or `sdxl` (`build_sdxl_components`: SDXL's layout, two
CLIP text encoders, the second with a projection whose pooled output is the UNet's `text_embeds`, a UNet with
`addition_embed_type="text_time"` reading both encoders' states concatenated, `EulerDiscreteScheduler`, in a
`StableDiffusionXLPipeline`). All have random weights. `build_sdxl_unet` / `build_sdxl_pipeline` give SDXL base's
real architecture (random weights) for speed benchmarks.
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
    family: str = "sd1"  # one of TINY_FAMILIES

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


# SD 2.x's scheduler (stabilityai/stable-diffusion-2-1: DDIM, v-prediction), SD 1.x's noise schedule.
SD2_SCHEDULER_CONFIG = dict(SD_SCHEDULER_CONFIG, prediction_type="v_prediction", clip_sample=False,
                            set_alpha_to_one=False)  # fmt: skip
# LCM's scheduler (SimianLuo/LCM_Dreamshaper_v7's scheduler_config.json), SD 1.x's noise schedule.
LCM_SCHEDULER_CONFIG = dict(SD_SCHEDULER_CONFIG, original_inference_steps=50, set_alpha_to_one=True,
                            clip_sample=False, timestep_spacing="leading", timestep_scaling=10.0)  # fmt: skip
TINY_LCM_COND_DIM = 32  # time_cond_proj_dim of the tiny LCM (LCM-Dreamshaper's is 256)
TINY_FAMILIES = ("sd1", "sd2", "lcm", "sdxl")
# SDXL base's scheduler (stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json: EulerDiscrete, leading).
SDXL_SCHEDULER_CONFIG = dict(SD_SCHEDULER_CONFIG, timestep_spacing="leading", interpolation_type="linear",
                             use_karras_sigmas=False)  # fmt: skip
TINY_SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim of the tiny SDXL (SDXL base's is 256), 6 time ids
SDXL_TIME_IDS = 6  # (original height, width, crop top, left, target height, width)


def _scheduler(family: str):
    from diffusers import DDIMScheduler, LCMScheduler, PNDMScheduler

    if family == "sd2":
        return DDIMScheduler(**SD2_SCHEDULER_CONFIG)
    if family == "lcm":
        return LCMScheduler(**LCM_SCHEDULER_CONFIG)
    return PNDMScheduler(**SD_SCHEDULER_CONFIG, skip_prk_steps=True, set_alpha_to_one=False)


def _sd_vae(**kwargs):
    """The full-size SD autoencoder architecture (factor 8, 4 latent channels), random weights; `kwargs` set the
    family's sample size and scaling factor."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        **kwargs,
    )


def _tiny_vae(cfg, **kwargs):
    """The tiny pipelines' VAE (one block per level of `cfg.vae_channels`)."""
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=cfg.norm_groups,
        sample_size=cfg.resolution,
        **kwargs,
    )


def build_components(cfg: TinySDConfig | None = None, tokenizer_dir: str | Path | None = None):
    """Return (tokenizer, text_encoder, vae, unet, scheduler), randomly initialised from cfg.seed."""
    import tempfile

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = cfg or TinySDConfig()
    if cfg.family == "sdxl":
        raise UserError(
            "unknown tiny model family 'sdxl' for build_components (one text encoder); SDXL's parts: "
            "build_sdxl_components"
        )
    if cfg.family not in TINY_FAMILIES:
        raise UserError(f"unknown tiny model family {cfg.family!r}; choose one of {', '.join(TINY_FAMILIES)}")
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
        hidden_act="gelu" if cfg.family == "sd2" else "quick_gelu",  # OpenCLIP ViT-H (SD 2) vs CLIP ViT-L (SD 1)
    )
    text_encoder = CLIPTextModel(text_config)
    vae = _tiny_vae(cfg)
    m = len(cfg.unet_channels)
    # diffusers' SD configs use attention_head_dim as the head count
    family_kwargs: dict = dict(attention_head_dim=cfg.attention_heads)
    if cfg.family == "sd2":  # SD 2.x: heads per block (diffusers' attention_head_dim), as [5, 10, 20, 20] in SD 2.1
        heads = tuple(max(1, c // 16) for c in cfg.unet_channels)
        family_kwargs = dict(attention_head_dim=heads, use_linear_projection=True, upcast_attention=True)
    elif cfg.family == "lcm":
        family_kwargs["time_cond_proj_dim"] = TINY_LCM_COND_DIM
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
        norm_num_groups=cfg.norm_groups,
        **family_kwargs,
    )
    return tokenizer, text_encoder, vae, unet, _scheduler(cfg.family)


def _clip_text_config(tokenizer, hidden: int, layers: int, heads: int, hidden_act: str, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim,
        hidden_act=hidden_act,
    )


def _sdxl_unet_kwargs(text_dims: tuple[int, int], time_embed_dim: int) -> dict:
    """The UNet config keys SDXL adds: `text_time` conditioning on the pooled projection of the second text encoder
    (`text_embeds` [B, text_dims[1]]) and 6 time ids, each embedded in `time_embed_dim` sinusoids; cross-attention to
    both encoders' states concatenated."""
    return dict(
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=text_dims[1] + SDXL_TIME_IDS * time_embed_dim,
        cross_attention_dim=sum(text_dims),
        use_linear_projection=True,
    )


def build_sdxl_components(cfg: TinySDConfig | None = None) -> dict:
    """The parts of a tiny SDXL-architecture pipeline (random weights from cfg.seed), as `StableDiffusionXLPipeline`'s
    keyword arguments: two CLIP text encoders of width `cfg.text_hidden` (the second a `CLIPTextModelWithProjection`,
    as OpenCLIP bigG in SDXL), two tokenizers (the offline one), a KL autoencoder, a UNet with SDXL's block layout
    (no attention at the highest resolution, more transformer layers deeper, linear projections, heads per block)
    and `text_time` conditioning, and SDXL base's `EulerDiscreteScheduler`."""
    import tempfile

    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = cfg or TinySDConfig(family="sdxl")
    if cfg.resolution % cfg.vae_factor:
        raise UserError(f"resolution {cfg.resolution} is not divisible by the VAE factor {cfg.vae_factor}")
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="ov-sd-tok-") as tmp:
        tokenizer = build_clip_tokenizer(Path(tmp) / "1", synthetic.vocabulary())
        tokenizer_2 = build_clip_tokenizer(Path(tmp) / "2", synthetic.vocabulary())
    hidden = cfg.text_hidden // 2  # the UNet reads both encoders' states concatenated: cfg.text_hidden wide
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden, cfg.text_layers, cfg.text_heads, "quick_gelu",
                                                   hidden))  # fmt: skip
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(tokenizer_2, hidden, cfg.text_layers, cfg.text_heads, "gelu", hidden)
    )
    vae = _tiny_vae(cfg, scaling_factor=0.13025)  # SDXL's VAE
    m = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // cfg.vae_factor,
        in_channels=4,
        out_channels=4,
        # SDXL: no attention at the highest resolution, cross-attention below (SDXL base: 1, 2, 10 layers)
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (m - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (m - 1) + ("UpBlock2D",),
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        transformer_layers_per_block=tuple(min(i + 1, 2) for i in range(m)),
        attention_head_dim=tuple(max(1, c // 16) for c in cfg.unet_channels),
        norm_num_groups=cfg.norm_groups,
        **_sdxl_unet_kwargs((hidden, hidden), TINY_SDXL_TIME_EMBED_DIM),
    )
    return dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG))  # fmt: skip


def assemble_sdxl_pipeline(**parts):
    """A `StableDiffusionXLPipeline` from its parts (`build_sdxl_components`), no watermarker (not installed)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)


def assemble_pipeline(tokenizer, text_encoder, vae, unet, scheduler):
    """A `StableDiffusionPipeline` (a `LatentConsistencyModelPipeline` for an LCM UNet) from its parts, with no
    safety checker (none exists offline)."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    cls = LatentConsistencyModelPipeline if unet.config.time_cond_proj_dim is not None else StableDiffusionPipeline
    return cls(
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
    """A randomly initialised tiny pipeline of `cfg.family` (`StableDiffusionPipeline`, an LCM's or SDXL's); saved as
    a diffusers folder if asked."""
    if cfg is not None and cfg.family == "sdxl":
        pipe = assemble_sdxl_pipeline(**build_sdxl_components(cfg))
    else:
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

    from diffusers import PNDMScheduler
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
    vae = _sd_vae(sample_size=512, scaling_factor=0.18215)  # SD 1.5's
    unet = build_sd15_unet(seed)
    scheduler = PNDMScheduler(**SD_SCHEDULER_CONFIG, skip_prk_steps=True, set_alpha_to_one=False)
    pipe = assemble_pipeline(tokenizer, text_encoder, vae, unet, scheduler)
    if output_dir is not None:
        pipe.save_pretrained(output_dir, safe_serialization=True)
    return pipe


# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (the keys that shape the network)
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    layers_per_block=2,
    **_sdxl_unet_kwargs((768, 1280), 256),  # 2816 = 1280 + 6 x 256; cross_attention_dim 2048
)


def build_sdxl_unet(seed: int = 0):
    """The SDXL base UNet architecture (2.57 B parameters) with random weights, built offline: for speed benchmarks
    at 1024 px (128x128 latents). Its IR inputs add `text_embeds` [B,1280] and `time_ids` [B,6]."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SDXL_UNET_CONFIG)


def build_sdxl_pipeline(output_dir: str | Path | None = None, seed: int = 0):
    """A full SDXL base-architecture `StableDiffusionXLPipeline` with random weights (CLIP ViT-L and OpenCLIP bigG text
    towers, SDXL's VAE, `build_sdxl_unet`): for speed and footprint benchmarks at 1024 px only. The tokenizers are the
    project's offline one."""
    import tempfile

    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="ov-sd-tok-") as tmp:
        tokenizer = build_clip_tokenizer(Path(tmp) / "1", synthetic.vocabulary())
        tokenizer_2 = build_clip_tokenizer(Path(tmp) / "2", synthetic.vocabulary())
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, 768, 12, 12, "quick_gelu", 768))  # CLIP ViT-L/14
    bigg = _clip_text_config(tokenizer_2, 1280, 32, 20, "gelu", 1280)  # OpenCLIP ViT-bigG/14
    bigg.intermediate_size = 5120
    text_encoder_2 = CLIPTextModelWithProjection(bigg)
    vae = _sd_vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # SDXL's
    pipe = assemble_sdxl_pipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                  tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=build_sdxl_unet(seed),
                                  scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG))  # fmt: skip
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
    s.add_argument("--family", choices=TINY_FAMILIES, default=TinySDConfig.family, help="sd1, sd2, lcm or sdxl")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def main(args) -> int:
    from ..outputs import atomic_output_dir

    with atomic_output_dir(args.output, overwrite=args.overwrite) as tmp:
        build_tiny_pipeline(tmp, TinySDConfig(resolution=args.resolution, seed=args.seed, family=args.family))
    print(f"tiny {args.family} pipeline written to {args.output}")
    return 0
