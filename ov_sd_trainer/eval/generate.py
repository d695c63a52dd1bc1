"""Text-to-image generation: `ov-sd generate` (one image, OpenVINO or PyTorch) and `generate_set`, the one loop that
generates a prompt set from fixed initial latents for every evaluation (prompt accuracy, fidelity).

An OpenVINO folder runs in one of two runtimes (`--runtime`): `optimum` (optimum-intel's `OVStableDiffusionPipeline`, or
its class of the folder's family, `families.PIPELINE_CLASSES`; diffusers' loop in Python) or `genai` (OpenVINO GenAI's `Text2ImagePipeline`, the C++ loop, no torch needed by the
pipeline itself). `--seed` draws the initial noise the same way everywhere, `torch.Generator().manual_seed(seed)`
(GenAI: `TorchGenerator(seed)`, which follows torch's seeding), so one seed gives the same image in both runtimes
and in the PyTorch backend (up to the models' numerics).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..export.tiny_decoder import DECODERS, decoder_view
from ..pipeline_folder import (
    check_genai_folder,
    check_image_size,
    check_model_source,
    is_diffusers_folder,
    is_openvino_pipeline,
    load_ov_pipeline,
    load_pipeline,
    native_size,
    openvino_addon_pip_hint,
    pipeline_class_name,
    static_batch,
    trained_sampling,
)

logger = logging.getLogger(__name__)
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5  # diffusers' default
BACKENDS = ("openvino", "pytorch")
RUNTIMES = ("optimum", "genai")  # for backend openvino: optimum-intel's pipeline or OpenVINO GenAI's
GENAI_DEVICE = "CPU"


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
    steps: int | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    backend: str = "openvino",
    negative_prompt: str | None = None,
    runtime: str = "optimum",
    decoder: str | None = None,
):
    """Generate one image and save it as PNG. Returns a dict with timings.

    `steps` / `guidance_scale` None: what the folder was trained for (`pipeline_folder.trained_sampling`: a
    consistency student's export, an LCM folder), else DEFAULT_STEPS / DEFAULT_GUIDANCE.
    `runtime` (backend openvino only): "optimum" (`OVStableDiffusionPipeline`) or "genai" (OpenVINO GenAI's
    `Text2ImagePipeline`; the folder must hold the tokenizer IRs, `pipeline_folder.check_genai_folder`).
    `decoder` (an OpenVINO folder with a tiny decoder, `ov-sd tiny-decoder`): 'tiny' or 'full' for this image,
    the folder left as it is (`export.tiny_decoder.decoder_view`); None: the folder's active one."""
    out = Path(output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--output {output!r} must end in .png or .jpg")
    if out.is_dir():
        raise UserError(f"--output {output!r} is a folder; pass an image file path")
    if backend not in BACKENDS:
        raise UserError(f"backend {backend!r} is unknown; use openvino or pytorch")
    if runtime not in RUNTIMES:
        raise UserError(f"runtime {runtime!r} is unknown; use {' or '.join(RUNTIMES)}")
    check_image_size(height, width)
    if runtime == "optimum":  # GenAI runs local OpenVINO folders only: `_generate_genai` checks those
        check_model_source(model)
    trained = trained_sampling(model) or {}
    steps = trained.get("steps", DEFAULT_STEPS) if steps is None else steps
    guidance_scale = trained.get("guidance_scale", DEFAULT_GUIDANCE) if guidance_scale is None else guidance_scale
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if decoder is not None:
        if backend != "openvino":
            raise UserError("--decoder chooses an OpenVINO folder's VAE decoder; drop --backend pytorch")
        with decoder_view(model, decoder) as view:
            info = generate(str(view), prompt, output, steps, seed, height, width, guidance_scale, backend,
                            negative_prompt, runtime)  # fmt: skip
        return {**info, "decoder": decoder}
    if negative_prompt is not None and Path(model).expanduser().is_dir():
        if pipeline_class_name(Path(model).expanduser()) == "LatentConsistencyModelPipeline":
            raise UserError(
                f"--model {model!r} is a latent consistency model, which takes no negative prompt (it was distilled "
                "with the empty one); drop --negative-prompt"
            )
    if runtime == "genai":
        if backend != "openvino":
            raise UserError("--runtime genai runs OpenVINO folders; drop --backend pytorch")
        return _generate_genai(model, prompt, out, steps, seed, height, width, guidance_scale, negative_prompt)
    t0 = time.perf_counter()
    if backend == "openvino":
        if height is None or width is None:
            height, width = native_size(model)
        pipe = load_ov_pipeline(model, height, width, guidance_scale=guidance_scale)
    else:
        pipe = load_pipeline(model)
        pipe.set_progress_bar_config(disable=False)
        if height is None or width is None:
            height = width = pipe.unet.config.sample_size * pipe.vae_scale_factor
    # optimum-intel's pipeline is diffusers' loop: a torch generator draws the same noise as the PyTorch backend and
    # as GenAI's TorchGenerator(seed)
    generator = torch.Generator().manual_seed(seed)
    load_s = time.perf_counter() - t0
    timer = StepTimer()
    t1 = time.perf_counter()
    kwargs = {"negative_prompt": negative_prompt} if negative_prompt is not None else {}  # LCM pipelines take none
    image = pipe(
        prompt,
        **kwargs,
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
    return dict(load_s=load_s, total_s=total_s, step_s=timer.mean_step_s, steps=steps, height=height, width=width,
                guidance_scale=guidance_scale, runtime=runtime if backend == "openvino" else backend)  # fmt: skip


def load_genai_pipeline(folder: str | Path, height: int, width: int, guidance_scale: float = DEFAULT_GUIDANCE,
                        device: str = GENAI_DEVICE, **properties):  # fmt: skip
    """OpenVINO GenAI's `Text2ImagePipeline` on an OpenVINO folder, reshaped to static shapes (one image of
    `height` x `width`; the UNet batch follows `guidance_scale`, 2 with classifier-free guidance) and compiled, as
    `load_ov_pipeline` does for optimum. `properties`: OpenVINO compile properties (e.g. INFERENCE_PRECISION_HINT)."""
    folder = check_genai_folder(str(folder), "--model")
    try:
        import openvino_genai
    except ImportError as e:
        raise UserError(
            f"--runtime genai needs openvino-genai ({e}); {openvino_addon_pip_hint('openvino-genai')}"
        ) from e
    try:
        pipe = openvino_genai.Text2ImagePipeline(str(folder))
        pipe.reshape(1, height, width, guidance_scale)
        pipe.compile(device, **properties)
    except RuntimeError as e:  # GenAI's messages start with the C++ source location; the reason is the last line
        reason = [line for line in str(e).splitlines() if line.strip()][-1]
        raise UserError(f"OpenVINO GenAI cannot load {str(folder)!r}: {reason}") from e
    return pipe


def _generate_genai(model, prompt, out: Path, steps, seed, height, width, guidance_scale, negative_prompt) -> dict:
    from PIL import Image

    if is_diffusers_folder(Path(model).expanduser()):
        raise UserError(
            f"--model {model!r} is a diffusers folder; --runtime genai runs OpenVINO folders (`ov-sd export`, "
            "`ov-sd ptq`), or drop --runtime genai"
        )
    folder = check_genai_folder(model, "--model")
    if height is None or width is None:
        height, width = native_size(folder)
    t0 = time.perf_counter()
    pipe = load_genai_pipeline(folder, height, width, guidance_scale)
    load_s = time.perf_counter() - t0
    import openvino_genai  # importable: load_genai_pipeline checked

    _warn_long_prompts(folder, [prompt, negative_prompt or ""])
    kwargs = {"negative_prompt": negative_prompt} if negative_prompt is not None else {}
    timer = StepTimer()

    def on_step(step: int, num_steps: int, latent) -> bool:
        timer(pipe, step, None, None)
        return False  # True would stop the generation

    t1 = time.perf_counter()
    image = pipe.generate(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        generator=openvino_genai.TorchGenerator(seed),
        callback=on_step,
        **kwargs,
    )
    total_s = time.perf_counter() - t1
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.data[0]).save(out)
    return dict(load_s=load_s, total_s=total_s, step_s=timer.mean_step_s, steps=steps, height=height, width=width,
                guidance_scale=guidance_scale, runtime="genai")  # fmt: skip


def _warn_long_prompts(folder: Path, prompts: list[str]) -> None:
    """GenAI 2026.4 cuts a prompt longer than the text encoder's positions (77) without the end-of-text token that
    diffusers' truncation keeps: say so, since the image then differs a little from optimum's."""
    import openvino_genai

    try:
        limit = int(json.loads((folder / "text_encoder" / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError):
        return
    tokenizer = openvino_genai.Tokenizer(str(folder / "tokenizer"))
    for prompt in prompts:
        n = tokenizer.encode(prompt).input_ids.get_shape()[1]
        if n > limit:
            logger.warning(
                "the prompt has %d tokens; OpenVINO GenAI keeps the first %d without the end-of-text token that "
                "optimum/diffusers keep, so the image differs slightly from --runtime optimum's",
                n,
                limit,
            )


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
    """Images (PIL) and final latents (N, C, h, w) of `jobs`; a static OpenVINO batch is padded and cut. A
    stochastic scheduler's sampling noise comes from a generator seeded by each chunk's first job (so, unlike the
    initial latents, it depends on the batch size)."""
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
            # the noise a stochastic scheduler adds during sampling (LCM, Euler ancestral), the same for every
            # pipeline of a comparison; deterministic ones (PNDM, DDIM) draw none
            generator=torch.Generator().manual_seed(1000 * chunk[0]["seed"] + chunk[0]["index"]),
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
    s.add_argument("--steps", type=int, default=None,
                   help=f"default: what the folder was trained for (an LCM student's), else {DEFAULT_STEPS}")  # fmt: skip
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--height", type=int, default=None, help="default: the size the model was trained at")
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--guidance-scale", type=float, default=None,
                   help=f"default: what the folder was trained for (an LCM student's), else {DEFAULT_GUIDANCE}")  # fmt: skip
    s.add_argument("--decoder", choices=DECODERS, default=None,
                   help="an OpenVINO folder with a tiny decoder (`ov-sd tiny-decoder`): decode with this one; "
                   "default: the folder's active decoder. The folder is not changed")  # fmt: skip
    s.add_argument("--backend", choices=BACKENDS, default="openvino")
    s.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="optimum",
        help="for an OpenVINO folder: optimum-intel's OVStableDiffusionPipeline or OpenVINO GenAI's Text2ImagePipeline",
    )


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
        runtime=args.runtime,
        decoder=args.decoder,
    )
    decoder = f", {info['decoder']} decoder" if info.get("decoder") else ""
    print(
        f"saved {args.output} ({info['width']}x{info['height']}, {info['steps']} steps, guidance "
        f"{info['guidance_scale']:g}, {info['runtime']}{decoder}): "
        f"{info['step_s'] * 1000:.1f} ms/step, {info['total_s']:.2f} s generation, {info['load_s']:.1f} s load+compile"
    )
    return 0
