"""Model families: which pipelines the project trains and exports, and what a family's UNet needs beyond
(sample, timestep, encoder_hidden_states).

Supported (docs/families.md lists what was tested on each):

- **SD 1.x / SD 2.x** (`StableDiffusionPipeline`; SD 2.x: v-prediction, linear projections in the transformer blocks,
  a head count per block; SD-Turbo is an SD 2.1 UNet): no extra UNet input;
- **LCM** (`LatentConsistencyModelPipeline`): a UNet with `time_cond_proj_dim`, whose extra input `timestep_cond` is
  the embedded guidance scale (`guidance_embedding`), and no classifier-free guidance batch;
- **SDXL** (`StableDiffusionXLPipeline`): a UNet with `addition_embed_type="text_time"`, whose extra inputs are
  `text_embeds` (the pooled projection of the second text encoder) and `time_ids` (original size, crop top-left,
  target size: `sdxl_time_ids`), passed to diffusers' UNet as `added_cond_kwargs`; the text states are both text
  encoders' penultimate hidden states concatenated.

One owner for the family-specific parts: `extra_input_names` gives a UNet's extra inputs in optimum-intel's IR order
(`compress.convert` exports them, `compress.quantize` calibrates with them); `unet_kwargs` turns the flat extra
tensors a UNet input carries (`train.unet_inputs.UNetInputs`) into the UNet's keyword arguments; `configure_model`
gives a `train.losses.QATModel` what it needs to build them for training batches (`QATModel.unet_extra`);
`pipeline_class_name` checks a model_index.json names a supported pipeline class (`PIPELINE_CLASSES`: optimum-intel's
`OVDiffusionPipeline` then picks that class's `OV...` pipeline itself).
"""

from __future__ import annotations

import math

from .errors import UserError

# model_index.json `_class_name` -> optimum-intel's class running its OpenVINO export. OpenVINO GenAI's
# Text2ImagePipeline reads the same `_class_name` (an exported folder keeps the diffusers name).
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": "OVStableDiffusionPipeline",
    "LatentConsistencyModelPipeline": "OVLatentConsistencyModelPipeline",
    "StableDiffusionXLPipeline": "OVStableDiffusionXLPipeline",
}
DEFAULT_PIPELINE_CLASS = "StableDiffusionPipeline"  # a folder whose model_index.json names no class
# The denoising steps a model card's usage example shows: SD's usual 50; LCM's 4 (the LCM pipeline's default).
SAMPLING_STEPS = {"StableDiffusionPipeline": 50, "LatentConsistencyModelPipeline": 4, "StableDiffusionXLPipeline": 50}

TIMESTEP_COND = "timestep_cond"  # LCM: the guidance-scale embedding [B, time_cond_proj_dim]
# The guidance scales an LCM student is distilled at on training images, drawn uniformly per sample: diffusers' LCM
# distillation script (examples/consistency_distillation, --w_min 5 --w_max 15) trains on w in [5, 15], and the
# pipeline embeds w = guidance_scale - 1, so these are guidance scales 6 to 16 (LCM-Dreamshaper's advised 8 inside).
LCM_W_MIN, LCM_W_MAX = 5.0, 15.0
# The held-out teacher-gap set of an LCM: the pipeline's default guidance scale (8.5), w = 7.5, for every input.
LCM_HELDOUT_W = 7.5

# SDXL (addition_embed_type "text_time"): the UNet's added conditioning, in optimum-intel's IR order
TEXT_EMBEDS = "text_embeds"  # [B, pooled projection width of text_encoder_2] (SDXL base: 1280)
TIME_IDS = "time_ids"  # [B, 6]: original (height, width), crop (top, left), target (height, width)
SDXL_EXTRA = (TEXT_EMBEDS, TIME_IDS)
SDXL_TIME_IDS = 6  # SDXL base's; the refiner's 5 (aesthetic score) belongs to an img2img pipeline, not supported
ADDED_COND_KWARGS = "added_cond_kwargs"  # diffusers' UNet keyword holding them


def pipeline_class_name(model_index: dict) -> str:
    """The diffusers pipeline class a model_index.json names, checked to be a supported family."""
    name = str(model_index.get("_class_name") or DEFAULT_PIPELINE_CLASS)
    if name.startswith("OV") and name[2:] in PIPELINE_CLASSES:  # optimum's own name, should a folder carry it
        name = name[2:]
    if name not in PIPELINE_CLASSES:
        raise UserError(
            f"pipeline class {name!r} is not supported; supported: {', '.join(PIPELINE_CLASSES)} (docs/families.md)"
        )
    return name


def _get(config, key):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def check_unet_config(config) -> None:
    """A one-line error for a UNet config this project cannot train or export (`config`: a dict or a diffusers
    FrozenDict)."""
    unsupported = {
        "class_embed_type": "class labels (e.g. the SD 2 x4 upscaler)",
        "encoder_hid_dim_type": "projected encoder states (e.g. Kandinsky, IF)",
        "addition_embed_type": "added conditioning other than SDXL's text_time (text_embeds, time_ids)",
    }
    for key, what in unsupported.items():
        if key == "addition_embed_type" and is_sdxl(config):
            continue
        if _get(config, key) is not None:
            raise UserError(
                f"the UNet config has {key}={_get(config, key)!r} ({what}): unsupported; supported families are "
                "SD 1.x, SD 2.x, LCM and SDXL UNets (docs/families.md)"
            )
    if _get(config, "in_channels") not in (None, 4):
        raise UserError(
            f"the UNet takes {_get(config, 'in_channels')} input channels (an inpainting or depth UNet?): unsupported; "
            "supported are text-to-image UNets with 4 latent channels (docs/families.md)"
        )


def is_sdxl(config) -> bool:
    """An SDXL UNet: `text_time` added conditioning, with the sizes it needs in its config (a config naming
    `text_time` without them stays an unsupported one)."""
    return (
        _get(config, "addition_embed_type") == "text_time"
        and _get(config, "addition_time_embed_dim") is not None
        and _get(config, "projection_class_embeddings_input_dim") is not None
    )


def extra_input_names(config) -> tuple[str, ...]:
    """The UNet's inputs after (sample, timestep, encoder_hidden_states), in the order of optimum-intel's UNet IR
    (`UNetOpenVINOConfig.inputs`: text_embeds, time_ids, then timestep_cond)."""
    names = SDXL_EXTRA if is_sdxl(config) else ()
    return names + ((TIMESTEP_COND,) if _get(config, "time_cond_proj_dim") is not None else ())


def extra_input_dims(config) -> dict[str, int]:
    """Name -> width of each extra input ([B, width], float32)."""
    dims = {}
    if is_sdxl(config):  # projection_class_embeddings_input_dim = pooled width + 6 x addition_time_embed_dim
        time_dim = SDXL_TIME_IDS * int(_get(config, "addition_time_embed_dim"))
        dims = {TEXT_EMBEDS: int(_get(config, "projection_class_embeddings_input_dim")) - time_dim,
                TIME_IDS: SDXL_TIME_IDS}  # fmt: skip
    if _get(config, "time_cond_proj_dim") is not None:
        dims[TIMESTEP_COND] = int(_get(config, "time_cond_proj_dim"))
    return dims


def unet_kwargs(extra: dict) -> dict:
    """Extra UNet keyword arguments from the flat extra tensors of one batch of UNet inputs (none for SD 1.x/2.x;
    `timestep_cond` for LCM, passed as it is; SDXL's `text_embeds` and `time_ids` inside `added_cond_kwargs`)."""
    kwargs = {k: v for k, v in extra.items() if k not in SDXL_EXTRA}
    added = {k: extra[k] for k in SDXL_EXTRA if k in extra}
    if added:
        kwargs[ADDED_COND_KWARGS] = added
    return kwargs


def extra_from_unet_kwargs(config, kwargs: dict) -> dict:
    """The inverse of `unet_kwargs`: the flat extra tensors of a UNet call diffusers made with `kwargs` (the
    trajectory collector's hook sees LCM's `timestep_cond`, SDXL's `added_cond_kwargs`)."""
    added = kwargs.get(ADDED_COND_KWARGS) or {}
    return {name: added[name] if name in SDXL_EXTRA else kwargs[name] for name in extra_input_names(config)}


def sdxl_time_ids(original_size, crop_top_left, target_size, batch: int | None = None):
    """SDXL's `time_ids` [B, 6] float32: original (height, width), crop (top, left), target (height, width), as
    diffusers' SDXL pipeline (`_get_add_time_ids`) and train_text_to_image_sdxl.py build them. Each argument is a
    pair or a [B, 2] tensor (per-sample sizes and random-crop offsets); `batch` repeats pairs."""
    import torch

    parts = [torch.as_tensor(x, dtype=torch.float32).reshape(-1, 2) for x in (original_size, crop_top_left,
                                                                                target_size)]  # fmt: skip
    n = batch or max(p.shape[0] for p in parts)
    return torch.cat([p.expand(n, 2) for p in parts], dim=1)


def guidance_embedding(w, dim: int):
    """LCM's guidance-scale embedding of `w` ([B], w = guidance_scale - 1) -> [B, dim] float32, as diffusers'
    `LatentConsistencyModelPipeline.get_guidance_scale_embedding` computes it (a test checks they agree)."""
    import torch

    w = w.float() * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def heldout_extra(config, n: int, device) -> dict:
    """The caption-independent extra inputs of `n` held-out UNet inputs (fixed): LCM's embedding of
    `LCM_HELDOUT_W`, else none. (SDXL's depend on the captions: callers build them with `sdxl_encode_prompts`.)"""
    import torch

    if TIMESTEP_COND not in extra_input_names(config):
        return {}
    w = torch.full((n,), LCM_HELDOUT_W, device=device)
    return {TIMESTEP_COND: guidance_embedding(w, extra_input_dims(config)[TIMESTEP_COND])}


def configure_model(model, pipe) -> None:
    """Set `model.unet_extra` (a callable (batch_size, device) -> extra tensors, or None) for `pipe`'s family.

    LCM: each training sample gets the embedding of a guidance w drawn uniformly from [`LCM_W_MIN`, `LCM_W_MAX`] with
    the model's seeded generator (so a resumed run draws what an uninterrupted one would). An LCM has no
    noise-prediction target of its own (it is consistency-distilled), so it trains by distillation only."""
    config = pipe.unet.config
    check_unet_config(config)
    model.unet_extra = None
    if not extra_input_names(config):
        return
    if is_sdxl(config):  # its extra inputs come with each image batch (`QATModel.image_extra`)
        return
    if model.task_weight:
        raise UserError(
            f"an LCM UNet (time_cond_proj_dim) has no noise-prediction target for task_weight={model.task_weight}; "
            "set task_weight 0 (distillation against the FP32 teacher)"
        )
    dim = extra_input_dims(config)[TIMESTEP_COND]

    def lcm_extra(batch_size: int, device) -> dict:
        import torch

        g = model.generator
        u = torch.rand(batch_size, generator=g, device=g.device if g is not None else device)
        w = LCM_W_MIN + (LCM_W_MAX - LCM_W_MIN) * u.to(device)
        return {TIMESTEP_COND: guidance_embedding(w, dim)}

    model.unet_extra = lcm_extra


def sdxl_encode_prompts(text_encoder, text_encoder_2, input_ids, input_ids_2):
    """SDXL's text conditioning of token ids ([B,77] for each tokenizer) -> (encoder_hidden_states [B,77,D1+D2],
    text_embeds [B,P]): both encoders' penultimate hidden states concatenated, and the second encoder's pooled
    projection, as diffusers' `StableDiffusionXLPipeline.encode_prompt` (clip_skip None) and
    train_text_to_image_sdxl.py's `encode_prompt` compute them."""
    import torch

    states = []
    for encoder, ids in ((text_encoder, input_ids), (text_encoder_2, input_ids_2)):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        pooled = out[0]  # text_encoder_2 (CLIPTextModelWithProjection): text_embeds
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), pooled
