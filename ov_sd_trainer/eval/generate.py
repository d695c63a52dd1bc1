"""Text-to-image generation with OpenVINO (optimum-intel's pipeline) or PyTorch (diffusers)."""

from __future__ import annotations

import time
from pathlib import Path

from .errors import UserError


def is_openvino_folder(path: str | Path) -> bool:
    return (Path(path) / "unet" / "openvino_model.xml").is_file()


def load_ov_pipeline(model: str, height: int, width: int, batch_size: int = 1, export: bool | None = None):
    """Load, reshape to static shapes and compile an `OVStableDiffusionPipeline`.

    A diffusers (PyTorch) folder is exported to OpenVINO on the fly (`export=True`)."""
    from optimum.intel import OVStableDiffusionPipeline

    if export is None:
        export = not is_openvino_folder(model)
    pipe = OVStableDiffusionPipeline.from_pretrained(model, export=export, compile=False)
    pipe.reshape(batch_size=batch_size, height=height, width=width, num_images_per_prompt=1)
    _match_vae_decoder_batch(pipe, batch_size, height, width)
    pipe.compile()
    return pipe


def static_input_batch(part) -> int | None:
    """The static batch of an OpenVINO pipeline part's first input, or None if dynamic."""
    try:
        dim = part.model.inputs[0].get_partial_shape()[0]
        return dim.get_length() if dim.is_static else None
    except (AttributeError, IndexError):
        return None


def _match_vae_decoder_batch(pipe, batch_size: int, height: int, width: int) -> None:
    """optimum-intel's `reshape` gives the VAE decoder a static batch of `num_images_per_prompt`,
    while diffusers decodes the whole prompt batch at once: reshape the decoder to the prompt batch."""
    if static_input_batch(pipe.vae_decoder) in (None, batch_size):
        return
    pipe.vae_decoder.model = pipe._reshape_vae_decoder(pipe.vae_decoder.model, height, width, batch_size)
    pipe.vae_decoder.clear_requests()


class StepTimer:
    """A diffusers `callback_on_step_end` that records the wall time of each denoising step."""

    def __init__(self, progress=None):
        self.times: list[float] = []
        self._last = time.perf_counter()
        self.progress = progress

    def __call__(self, pipe, step, timestep, callback_kwargs):
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now
        return callback_kwargs

    @property
    def mean_step_s(self) -> float:
        # The first step carries one-off work (first inference request), so report the rest when we can.
        t = self.times[1:] if len(self.times) > 1 else self.times
        return sum(t) / max(len(t), 1)


def generate(
    model: str,
    prompt: str,
    output: str,
    steps: int = 25,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float = 7.5,
    backend: str = "openvino",
    negative_prompt: str | None = None,
):
    """Generate one image and save it as PNG. Returns a dict with timings."""
    import numpy as np
    import torch

    if not Path(model).expanduser().exists() and model.startswith((".", "/", "~")):
        raise UserError(f"model {model!r} does not exist; pass an OpenVINO or diffusers pipeline folder or a Hub id")
    out = Path(output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--output {output!r} must end in .png or .jpg")
    t0 = time.perf_counter()
    if backend == "openvino":
        if height is None or width is None:
            height, width = _default_size(model)
        pipe = load_ov_pipeline(model, height, width)
        # optimum-intel draws its initial latents with numpy's global generator when given one.
        generator = np.random.RandomState(seed)
    elif backend == "pytorch":
        from .models import load_pipeline

        pipe = load_pipeline(model)
        pipe.set_progress_bar_config(disable=False)
        generator = torch.Generator().manual_seed(seed)
        if height is None or width is None:
            height = width = pipe.unet.config.sample_size * pipe.vae_scale_factor
    else:
        raise UserError(f"backend {backend!r} is unknown; use openvino or pytorch")
    load_s = time.perf_counter() - t0
    timer = StepTimer()
    t1 = time.perf_counter()
    image = pipe(
        prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        generator=generator,
        callback_on_step_end=timer,
    ).images[0]
    total_s = time.perf_counter() - t1
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return dict(load_s=load_s, total_s=total_s, step_s=timer.mean_step_s, steps=steps, height=height, width=width)


def _default_size(model: str) -> tuple[int, int]:
    """The image size a pipeline folder was trained for: UNet sample_size x VAE factor."""
    import json

    root = Path(model)
    try:
        unet_cfg = json.loads((root / "unet" / "config.json").read_text())
        vae_cfg = json.loads(
            (root / ("vae_decoder" if is_openvino_folder(root) else "vae") / "config.json").read_text()
        )
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        return unet_cfg["sample_size"] * factor, unet_cfg["sample_size"] * factor
    except (OSError, KeyError, ValueError):
        return 512, 512
