"""Step caching (DeepCache, Ma et al. 2023) for a diffusers `UNet2DConditionModel`, FP32 or NNCF-quantized.

Adjacent denoising steps have nearly the same deep features. Every `cache_interval`-th step runs the whole UNet
(`DeepCacheUNet.full`) and keeps the *deep feature*: the output of the second-to-last up block, i.e. the hidden
state that enters the last up block. The steps in between run only the shallow path (`DeepCacheUNet.shallow`):
`conv_in`, the time embedding, the first down block (its resnets and attentions; its downsampler only feeds the
deep path and is skipped) and the last up block, with the cached deep feature in place of everything deeper, then
`conv_norm_out`/`conv_out`. This is the `deepcache` package's `DeepCacheSDHelper` with
`cache_branch_id = layers_per_block` (block 0, all its layers), its uniform schedule.

Exactness: `full` runs the same modules and top-level ops in the same order as `UNet2DConditionModel.forward`
(tested equal to it, bit for bit, FP32 and quantized), and `shallow` with the feature `full` cached from the same
inputs gives `full`'s output (float tolerance: the same ops, the downsampler skipped).

NNCF 3.x names each hooked op by a module-relative name plus a call counter that runs across the whole forward (the
resnets' `conv1` of every block share the name `conv1/conv2d/<n>`). The shallow path skips blocks, so before the
last up block it sets NNCF's op counters to the values the full forward has at that point (recorded by `full`, or
by one full forward on the first shallow call): the same quantizers fire on the same ops as in the full UNet.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch

from ..errors import UserError
from .quantize import UNET_INPUT_NAMES, hook_storage, unwrap_model

DEEP_FEATURE_NAME = "deep_feature"  # the IR input/output name of the cached feature


def check_supported(unet: torch.nn.Module) -> None:
    """Step caching covers SD 1.x/2.x-style UNets: no class/added embeddings, no timestep_cond, >= 2 up blocks."""
    model = unwrap_model(unet)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "up_blocks") or not hasattr(model, "down_blocks"):
        raise UserError(f"step caching needs a diffusers UNet2DConditionModel, got {type(model).__name__}")
    unsupported = {
        key: config.get(key)
        for key in ("class_embed_type", "addition_embed_type", "time_cond_proj_dim", "num_class_embeds")
        if config.get(key) is not None
    }
    if unsupported:
        raise UserError(f"step caching supports Stable Diffusion 1.x/2.x UNets only; this one sets {unsupported}")
    if len(model.up_blocks) < 2 or len(model.down_blocks) < 2:
        raise UserError("step caching needs a UNet with at least two down and two up blocks")


def deep_feature_channels(unet: torch.nn.Module) -> int:
    """Channels of the cached feature (the second-to-last up block's output = `block_out_channels[1]`)."""
    return int(unwrap_model(unet).config.block_out_channels[1])


class DeepCacheUNet(torch.nn.Module):
    """`full(sample, timestep, encoder_hidden_states) -> (noise, deep_feature)` and
    `shallow(sample, timestep, encoder_hidden_states, deep_feature) -> noise` over one diffusers UNet (shared, not
    copied: an NNCF student keeps its quantizers). `forward` is `full`."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        check_supported(unet)
        self.unet = unwrap_model(unet)
        self._op_calls_at_last_up: dict[str, int] | None = None  # NNCF's counters before the last up block

    # ---------------------------------------------------------------------------------------------------------------
    def forward(self, sample, timestep, encoder_hidden_states):
        return self.full(sample, timestep, encoder_hidden_states)

    def full(self, sample, timestep, encoder_hidden_states):
        with self._hook_mode() as mode:
            sample, emb, text, upsample = self._stem(mode, sample, timestep, encoder_hidden_states)
            h = self.unet.conv_in(sample)
            res_samples = (h,)
            for block in self.unet.down_blocks:
                h, res = self._down(block, h, emb, text)
                res_samples += res
            if self.unet.mid_block is not None:
                h = self._mid(h, emb, text)
            upsample_size = None
            last = len(self.unet.up_blocks) - 1
            for i, block in enumerate(self.unet.up_blocks):
                n = len(block.resnets)
                res, res_samples = res_samples[-n:], res_samples[:-n]
                if i < last and upsample:
                    upsample_size = res_samples[-1].shape[2:]
                if i == last:
                    deep = h
                    if mode is not None:
                        self._op_calls_at_last_up = dict(mode.op_calls)
                h = self._up(block, h, emb, text, res, upsample_size)
            return self._head(mode, h), deep

    def shallow(self, sample, timestep, encoder_hidden_states, deep_feature):
        if self._op_calls_at_last_up is None and hook_storage(self.unet) is not None:
            self.full(sample, timestep, encoder_hidden_states)  # once: NNCF's counters at the last up block
        with self._hook_mode() as mode:
            sample, emb, text, _ = self._stem(mode, sample, timestep, encoder_hidden_states)
            h = self.unet.conv_in(sample)
            first = self.unet.down_blocks[0]
            downsamplers = first.downsamplers
            first.downsamplers = None  # its output feeds only the (cached) deep path
            try:
                _, res = self._down(first, h, emb, text)
            finally:
                first.downsamplers = downsamplers
            last = self.unet.up_blocks[-1]
            res = ((h,) + tuple(res))[: len(last.resnets)]  # what the full forward hands the last up block
            if mode is not None:
                mode.op_calls = defaultdict(int, self._op_calls_at_last_up)
            h = self._up(last, deep_feature, emb, text, res, None)
            return self._head(mode, h)

    # ---------------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _hook_mode(self):
        """NNCF's FunctionHookMode for the student (what its wrapped forward enters), or None for an FP32 UNet."""
        storage = hook_storage(self.unet)
        if storage is None or storage.is_empty():
            yield None
            return
        from nncf.torch.function_hook.hook_executor_mode import FunctionHookMode

        with FunctionHookMode(model=self.unet, hook_storage=storage) as mode:
            yield mode

    def _stem(self, mode, sample, timestep, encoder_hidden_states):
        """UNet2DConditionModel.forward up to conv_in, in its op order (NNCF counts top-level ops too)."""
        unet = self.unet
        if mode is not None:  # NNCF's hooks on the model inputs, by argument name (process_model_inputs)
            values = dict(zip(UNET_INPUT_NAMES, (sample, timestep, encoder_hidden_states), strict=True))
            values = {k: mode.execute_hooks_for_model_input(k, v) if isinstance(v, torch.Tensor) else v
                      for k, v in values.items()}  # fmt: skip
            sample, timestep, encoder_hidden_states = (values[k] for k in UNET_INPUT_NAMES)
        factor = 2**unet.num_upsamplers
        upsample = any(dim % factor != 0 for dim in sample.shape[-2:])
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, None)
        unet.get_class_embed(sample=sample, class_labels=None)  # None for supported UNets; kept for op order
        aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs={})
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        text = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs={})
        return sample, emb, text, upsample

    @staticmethod
    def _down(block, h, emb, text):
        if getattr(block, "has_cross_attention", False):
            return block(hidden_states=h, temb=emb, encoder_hidden_states=text, attention_mask=None,
                         cross_attention_kwargs=None, encoder_attention_mask=None)  # fmt: skip
        return block(hidden_states=h, temb=emb)

    def _mid(self, h, emb, text):
        mid = self.unet.mid_block
        if getattr(mid, "has_cross_attention", False):
            return mid(h, emb, encoder_hidden_states=text, attention_mask=None, cross_attention_kwargs=None,
                       encoder_attention_mask=None)  # fmt: skip
        return mid(h, emb)

    @staticmethod
    def _up(block, h, emb, text, res, upsample_size):
        if getattr(block, "has_cross_attention", False):
            return block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=text,
                         cross_attention_kwargs=None, upsample_size=upsample_size, attention_mask=None,
                         encoder_attention_mask=None)  # fmt: skip
        return block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)

    def _head(self, mode, h):
        unet = self.unet
        if unet.conv_norm_out:
            h = unet.conv_norm_out(h)
            h = unet.conv_act(h)
        h = unet.conv_out(h)
        if mode is not None:  # the hooks NNCF may hold on the output of forward(..., return_dict=False)
            h = mode.execute_hooks_for_model_output("output_0", h)
        return h


class FullUNet(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states) -> (noise prediction, deep feature): the IR `full.xml`."""

    def __init__(self, cache: DeepCacheUNet) -> None:
        super().__init__()
        self.cache = cache

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.cache.full(sample, timestep, encoder_hidden_states)


class ShallowUNet(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states, deep_feature) -> noise prediction: the IR `shallow.xml`."""

    def __init__(self, cache: DeepCacheUNet) -> None:
        super().__init__()
        self.cache = cache

    def forward(self, sample, timestep, encoder_hidden_states, deep_feature):
        return self.cache.shallow(sample, timestep, encoder_hidden_states, deep_feature)


def check_interval(cache_interval) -> int:
    if isinstance(cache_interval, bool) or not isinstance(cache_interval, int) or cache_interval < 1:
        raise UserError(f"cache_interval must be a positive integer (1 = no caching), got {cache_interval!r}")
    return cache_interval


@contextlib.contextmanager
def step_cache(pipe, cache_interval: int):
    """Run a diffusers `StableDiffusionPipeline` with step caching inside the `with` block: UNet call k (counted
    from 0 at the block's start and again at each scheduler.timesteps[0]) runs `full` when k % interval == 0,
    else `shallow` with the last cached feature. `cache_interval=1` leaves the UNet untouched."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    check_interval(cache_interval)
    if cache_interval == 1:
        yield pipe
        return
    unet = pipe.unet
    cache = DeepCacheUNet(unet)
    state = {"step": 0, "feature": None}

    def forward(sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        extra = [k for k, v in kwargs.items() if v is not None and k != "cross_attention_kwargs"] + list(args)
        if extra or kwargs.get("cross_attention_kwargs"):
            raise UserError(f"step caching does not support the UNet arguments {extra or ['cross_attention_kwargs']}")
        t = torch.as_tensor(timestep).reshape(-1)[0]
        if state["step"] and t == pipe.scheduler.timesteps[0]:  # a new generation inside the same block
            state["step"] = 0
        if state["step"] % cache_interval == 0:
            out, state["feature"] = cache.full(sample, timestep, encoder_hidden_states)
        else:
            out = cache.shallow(sample, timestep, encoder_hidden_states, state["feature"])
        state["step"] += 1
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    had_own = "forward" in unet.__dict__
    previous = unet.__dict__.get("forward")
    unet.forward = forward
    try:
        yield pipe
    finally:
        if had_own:
            unet.forward = previous
        else:
            del unet.forward
