"""optimum-intel's `OVStableDiffusionPipeline` with step caching (DeepCache).

    pipe = OVDeepCacheStableDiffusionPipeline.from_pretrained(folder, compile=False)
    pipe.reshape(batch_size=1, height=64, width=64, num_images_per_prompt=1)
    pipe.compile()
    image = pipe("a red circle on a blue background", num_inference_steps=25, cache_interval=3).images[0]

The folder is an ordinary OpenVINO pipeline folder with `unet_deepcache/` added by `ov-sd deepcache`. UNet call k of
a generation (k = 0, 1, ...) runs `unet_deepcache/full.xml` when k % cache_interval == 0 and keeps its deep
feature; the calls in between run `unet_deepcache/shallow.xml` with that feature. `cache_interval=1` (the default)
is the plain pipeline: the folder's own `unet/` runs every step and the extra IRs are not even compiled.
Everything else (text encoder, scheduler, VAE, guidance) is optimum-intel's and diffusers' own code: the pipeline
only swaps the UNet's forward for the duration of one call.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from optimum.intel import OVStableDiffusionPipeline

from ..compress.convert import UNET_OUTPUT_NAME
from ..compress.deepcache import DEEP_FEATURE_NAME, check_interval
from ..errors import UserError
from ..export.deepcache import DEEPCACHE_DIR, FULL_XML, SHALLOW_XML, has_deepcache


class _CachedUNetPart:
    """One of the two step-caching IRs, reshaped and compiled like the pipeline's own UNet."""

    def __init__(self, xml: Path) -> None:
        import openvino as ov

        self.model = ov.Core().read_model(xml)
        self.request = None

    def reshape(self, shapes: dict[str, list[int]]) -> None:
        self.model.reshape({p: shapes[p.get_any_name()] for p in self.model.inputs if p.get_any_name() in shapes})
        self.request = None

    def compile(self, device: str, ov_config: dict) -> None:
        import openvino as ov

        if self.request is None:
            self.request = ov.Core().compile_model(self.model, device, ov_config)


class OVDeepCacheStableDiffusionPipeline(OVStableDiffusionPipeline):
    """`OVStableDiffusionPipeline` + `cache_interval` (see the module doc). Load it with `from_pretrained` as the
    parent class; `pipe(..., cache_interval=N)` or `pipe.cache_interval = N` picks the interval."""

    cache_interval: int = 1
    # class-level defaults: the parent's __init__ already calls reshape()
    _dc_parts: dict[str, _CachedUNetPart] | None = None
    _dc_shapes: dict | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deepcache_stats = {"full": 0, "shallow": 0, "full_s": 0.0, "shallow_s": 0.0}

    # --------------------------------------------------------------------------------------------------------------
    @property
    def deepcache_folder(self) -> Path:
        from tempfile import TemporaryDirectory

        save_dir = self.model_save_dir
        return Path(save_dir.name if isinstance(save_dir, TemporaryDirectory) else save_dir) / DEEPCACHE_DIR

    def _parts(self) -> dict[str, _CachedUNetPart]:
        if self._dc_parts is None:
            root = self.deepcache_folder.parent
            if not has_deepcache(root):
                raise UserError(
                    f"{str(root)!r} has no step-caching IRs ({FULL_XML.as_posix()}, {SHALLOW_XML.as_posix()}); add "
                    f"them with `ov-sd deepcache --run RUN_DIR` (or --fp32 DIFFUSERS --model {root})"
                )
            self._dc_parts = {"full": _CachedUNetPart(root / FULL_XML), "shallow": _CachedUNetPart(root / SHALLOW_XML)}
            if self._dc_shapes is not None:
                self._reshape_parts()
        return self._dc_parts

    def _reshape_parts(self) -> None:
        """The plain UNet's static input shapes, and the deep feature's as the full IR infers it from them."""
        parts = self._dc_parts
        shapes = self._dc_shapes
        parts["full"].reshape(shapes)
        feature = parts["full"].model.output(DEEP_FEATURE_NAME).get_partial_shape()
        parts["shallow"].reshape({**shapes, DEEP_FEATURE_NAME: feature})

    def reshape(self, batch_size: int, height: int, width: int, num_images_per_prompt: int = -1, num_frames: int = -1):
        super().reshape(batch_size, height, width, num_images_per_prompt, num_frames)
        self._dc_shapes = {p.get_any_name(): p.get_partial_shape() for p in self.unet.model.inputs}
        if self._dc_parts is not None:
            self._reshape_parts()
        return self

    def clear_requests(self):
        super().clear_requests()
        for part in (self._dc_parts or {}).values():
            part.request = None

    # --------------------------------------------------------------------------------------------------------------
    def __call__(self, *args, cache_interval: int | None = None, **kwargs):
        interval = check_interval(self.cache_interval if cache_interval is None else cache_interval)
        if interval == 1:
            return super().__call__(*args, **kwargs)
        parts = self._parts()
        for part in parts.values():
            part.compile(self.unet._device, self.unet.ov_config)
        state = {"step": 0, "feature": None}
        stats = self.deepcache_stats

        def forward(sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None,
                    cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=False):  # fmt: skip
            if any(v is not None for v in (text_embeds, time_ids, timestep_cond)) or cross_attention_kwargs:
                raise UserError("step caching supports Stable Diffusion 1.x/2.x UNet inputs only")
            inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
            t0 = time.perf_counter()
            if state["step"] % interval == 0:
                kind = "full"
                out = parts["full"].request(inputs, share_inputs=True)
                # copy: the request's output buffer is reused by its next inference
                state["feature"] = np.array(out[DEEP_FEATURE_NAME], copy=True)
            else:
                kind = "shallow"
                out = parts["shallow"].request({**inputs, DEEP_FEATURE_NAME: state["feature"]}, share_inputs=True)
            noise = torch.from_numpy(np.array(out[UNET_OUTPUT_NAME], copy=True))
            stats[kind] += 1
            stats[f"{kind}_s"] += time.perf_counter() - t0
            state["step"] += 1
            return {UNET_OUTPUT_NAME: noise} if return_dict else (noise,)

        unet = self.unet
        unet.forward = forward  # instance attribute: OVPipelinePart.__call__ calls self.forward
        try:
            return super().__call__(*args, **kwargs)
        finally:
            del unet.forward


def load_deepcache_pipeline(folder: str | Path, height: int, width: int, batch_size: int = 1,
                            ov_config: dict | None = None) -> OVDeepCacheStableDiffusionPipeline:  # fmt: skip
    """Load, reshape to static shapes and compile (as `pipeline_folder.load_ov_pipeline` does for the plain one)."""
    from ..pipeline_folder import check_openvino_folder, match_vae_decoder_batch

    folder = check_openvino_folder(str(folder), "--model")
    kwargs = {"ov_config": ov_config} if ov_config else {}
    pipe = OVDeepCacheStableDiffusionPipeline.from_pretrained(str(folder), compile=False, **kwargs)
    pipe.reshape(batch_size=batch_size, height=height, width=width, num_images_per_prompt=1)
    match_vae_decoder_batch(pipe, batch_size, height, width)
    pipe.compile()
    return pipe
