"""Text-to-image generation: `ov-sd generate` (one image, OpenVINO or PyTorch) and `generate_set`, the one loop that
generates a prompt set from fixed initial latents for every evaluation (prompt accuracy, fidelity).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import UserError
from ..pipeline_folder import (
    is_openvino_pipeline,
    load_ov_pipeline,
    load_pipeline,
    looks_local,
    native_size,
    static_batch,
)

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5  # diffusers' default
BACKENDS = ("openvino", "pytorch")


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
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE,
    backend: str = "openvino",
    negative_prompt: str | None = None,
):
    """Generate one image and save it as PNG. Returns a dict with timings."""
    import numpy as np
    import torch

    if not Path(model).expanduser().exists() and looks_local(model):
        raise UserError(f"model {model!r} does not exist; pass an OpenVINO or diffusers pipeline folder or a Hub id")
    out = Path(output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--output {output!r} must end in .png or .jpg")
    t0 = time.perf_counter()
    if backend == "openvino":
        if height is None or width is None:
            height, width = native_size(model)
        pipe = load_ov_pipeline(model, height, width)
        # optimum-intel draws its initial latents with numpy's global generator when given one.
        generator = np.random.RandomState(seed)
    elif backend == "pytorch":
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


def initial_latents(jobs: list[dict], shape: tuple[int, int, int]) -> torch.Tensor:
    """(N, C, h, w) starting noise, one generator per image seeded by (1000 * seed + prompt index), so results do
    not depend on the batch size nor on the backend's own random generator."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(1000 * j["seed"] + j["index"])) for j in jobs]
    )


class _FinalLatents:
    """`callback_on_step_end` keeping the latents after the latest step (the final ones once the loop ends)."""

    def __init__(self):
        self.latents = None

    def __call__(self, pipe, step, timestep, callback_kwargs):
        self.latents = torch.as_tensor(callback_kwargs["latents"]).detach().float().clone()
        return callback_kwargs


def generate_set(pipe, jobs: list[dict], latents: torch.Tensor, *, steps: int, guidance_scale: float,
                 batch_size: int, height: int, width: int, desc: str = "generate", progress: bool = True):  # fmt: skip
    """Images (PIL) and final latents (N, C, h, w) of `jobs`; a static OpenVINO batch is padded and cut."""
    from tqdm.auto import tqdm

    static = static_batch(pipe.text_encoder) if is_openvino_pipeline(pipe) else None
    if static is not None:
        batch_size = static
    images, finals = [], []
    for start in tqdm(range(0, len(jobs), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
        chunk = jobs[start : start + batch_size]
        lat = latents[start : start + batch_size]
        pad = batch_size - len(chunk) if static is not None else 0
        if pad:
            chunk = chunk + [chunk[-1]] * pad
            lat = torch.cat([lat, lat[-1:].expand(pad, *lat.shape[1:])])
        grab = _FinalLatents()
        out = pipe(
            [j["prompt"] for j in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            latents=lat.clone(),
            callback_on_step_end=grab,
        )
        n = len(chunk) - pad
        images.extend(out.images[:n])
        finals.append(grab.latents[:n])
    return images, torch.cat(finals)


# --------------------------------------------------------------------------------------------------------------------
# `ov-sd generate`
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(s) -> None:
    s.add_argument("--model", required=True, help="OpenVINO export folder, diffusers folder or Hub id")
    s.add_argument("--prompt", required=True)
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--output", required=True, help="PNG path")
    s.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--height", type=int, default=None, help="default: the size the model was trained at")
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE)
    s.add_argument("--backend", choices=BACKENDS, default="openvino")


def main(args) -> int:
    info = generate(
        args.model,
        args.prompt,
        args.output,
        steps=args.steps,
        seed=args.seed,
        height=args.height,
        width=args.width,
        guidance_scale=args.guidance_scale,
        backend=args.backend,
        negative_prompt=args.negative_prompt,
    )
    print(
        f"saved {args.output} ({info['width']}x{info['height']}, {info['steps']} steps): "
        f"{info['step_s'] * 1000:.1f} ms/step, {info['total_s']:.2f} s generation, {info['load_s']:.1f} s load+compile"
    )
    return 0
