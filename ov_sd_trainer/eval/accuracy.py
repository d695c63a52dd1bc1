"""Prompt-fidelity quality of a text-to-image pipeline, measured offline with the judge: `ov-sd quality`.

    ov-sd quality --model ov_sd_trainer/assets/reference --steps 25 --guidance-scale 5 --seeds 3

generates one image per (prompt, seed) for the fixed prompt set (`prompts.prompt_set`: every attribute combination
of the synthetic dataset, captioned like the training data), lets the judge read shape, colour and background off
each image and prints a markdown table of per-attribute accuracy (and `all`: all three right) with the time taken.

`prompt_accuracy(pipe_or_path, ...)` is the API: it takes a pipeline folder, a loaded diffusers
`StableDiffusionPipeline` or an optimum-intel `OVStableDiffusionPipeline`. Images come from `generate.generate_set`
with the initial latents of `generate.initial_latents`, so results do not depend on the batch size nor on the
backend's random generator, and equal the teacher row of `ov-sd eval`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import UserError
from ..pipeline_folder import (
    image_size,
    is_openvino_pipeline,
    load_ov_pipeline,
    load_pipeline,
    match_vae_decoder_batch,
    native_size,
    static_batch,
)
from .generate import BACKENDS, DEFAULT_GUIDANCE, DEFAULT_STEPS, generate_set, initial_latents
from .judge import ATTRIBUTES, accuracy_by_value, load_judge, score
from .prompts import jobs_for

DEFAULT_SEEDS = 3
DEFAULT_BATCH = 16  # prompts per pipeline call


def load_for_quality(model: str | Path, backend: str = "pytorch", batch_size: int = DEFAULT_BATCH):
    """A pipeline folder loaded for generating the prompt set (OpenVINO: reshaped to `batch_size` prompts)."""
    model = str(model)
    if backend == "pytorch":
        pipe = load_pipeline(model)
    elif backend == "openvino":
        pipe = load_ov_pipeline(model, *native_size(model), batch_size=batch_size)
    else:
        raise UserError(f"backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_accuracy(
    pipe_or_path,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    seeds: int = DEFAULT_SEEDS,
    subset: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    backend: str = "pytorch",
    judge=None,
    progress: bool = True,
    save_images: str | Path | None = None,
    first_seed: int = 0,
) -> dict:
    """Generate the prompt set with `seeds` seeds (`first_seed`, `first_seed` + 1, ...), judge the images and
    return accuracies.

    `pipe_or_path`: a pipeline folder (loaded with `backend`), or a loaded diffusers
    `StableDiffusionPipeline` / optimum-intel `OVStableDiffusionPipeline` (a statically reshaped OV
    pipeline is fed batches of its static size). Returns dict(shape, color, background, all, n,
    time_s, generate_s, settings, rows) where rows hold each image's prompt, seed and prediction."""
    if steps < 1 or seeds < 1:
        raise UserError(f"--steps and --seeds must be >= 1, got {steps} and {seeds}")
    if first_seed < 0:
        raise UserError(f"--first-seed must be >= 0, got {first_seed}")
    t_start = time.perf_counter()
    pipe = pipe_or_path
    if isinstance(pipe_or_path, str | Path):
        pipe = load_for_quality(pipe_or_path, backend, batch_size)
    else:
        backend = "openvino" if is_openvino_pipeline(pipe) else "pytorch"
    static = static_batch(pipe.text_encoder) if backend == "openvino" else None
    if static is not None:
        batch_size = static
        match_vae_decoder_batch(pipe, batch_size, *image_size(pipe))
    judge = judge or load_judge()
    height, width = image_size(pipe)
    latent_shape = (pipe.unet.config["in_channels"], height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    jobs = jobs_for(subset, seeds, first_seed)
    t_gen = time.perf_counter()
    images, _ = generate_set(
        pipe,
        jobs,
        initial_latents(jobs, latent_shape),
        steps=steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        height=height,
        width=width,
        progress=progress,
    )
    generate_s = time.perf_counter() - t_gen
    preds = judge.predict(images)
    result = score(preds, [{a: j[a] for a in ATTRIBUTES} for j in jobs])
    result["by_value"] = accuracy_by_value(jobs, preds)
    if save_images is not None:
        folder = Path(save_images)
        folder.mkdir(parents=True, exist_ok=True)
        for j, im in zip(jobs, images):
            im.save(folder / f"{j['index']:03d}_s{j['seed']}_{j['prompt'].replace(' ', '_')}.png")
    result.update(
        time_s=round(time.perf_counter() - t_start, 1),
        generate_s=round(generate_s, 1),
        settings=dict(
            steps=steps,
            guidance_scale=guidance_scale,
            seeds=seeds,
            first_seed=first_seed,
            prompts=len(jobs) // seeds,
            backend=backend,
            batch_size=batch_size,
            height=height,
            width=width,
        ),
        rows=[
            dict(prompt=j["prompt"], seed=j["seed"], expected={a: j[a] for a in ATTRIBUTES}, predicted=p)
            for j, p in zip(jobs, preds)
        ],
    )
    return result


def markdown_table(result: dict, model: str = "") -> str:
    s = result["settings"]
    first = s["first_seed"]
    seeds = f"{s['prompts']} x {s['seeds']}" + (f" (seeds {first}-{first + s['seeds'] - 1})" if first else "")
    lines = [
        "| model | backend | steps | guidance | prompts x seeds | shape | color | background | all three | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {model} | {s['backend']} | {s['steps']} | {s['guidance_scale']} | {seeds} "
        f"| {result['shape']:.1%} | {result['color']:.1%} | {result['background']:.1%} | {result['all']:.1%} "
        f"| {result['time_s']} |",
    ]
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="diffusers or OpenVINO pipeline folder")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS)
    p.add_argument(
        "--first-seed", type=int, default=0, help="seeds used: FIRST_SEED .. FIRST_SEED + SEEDS - 1 (held-out checks)"
    )
    p.add_argument("--backend", choices=BACKENDS, default="pytorch")
    p.add_argument("--subset", type=int, default=None, help="use N evenly spaced prompts of the 132")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="prompts per pipeline call")
    p.add_argument("--judge", default=None, help="judge folder (default: the committed one)")
    p.add_argument("--output-json", default=None)
    p.add_argument("--save-images", default=None, help="folder to save the generated images in")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def main(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    judge = load_judge(args.judge) if args.judge else None
    result = prompt_accuracy(
        args.model,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        seeds=args.seeds,
        subset=args.subset,
        batch_size=args.batch_size,
        backend=args.backend,
        judge=judge,
        save_images=args.save_images,
        first_seed=args.first_seed,
    )
    print(markdown_table(result, Path(args.model).name or args.model))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(dict(model=args.model, **result), indent=1) + "\n")
    return 0
