"""Prompt-fidelity quality of a text-to-image pipeline, measured offline with the judge.

    python -m ov_sd_trainer.quality --model ov_sd_trainer/assets/reference --steps 25 --guidance-scale 7.5 --seeds 3

generates one image per (prompt, seed) for the fixed prompt set (every attribute combination from
`synthetic.all_combinations()`, captioned like the training data), lets the judge
(`judge.load_judge()`) read shape, colour and background off each image and prints a markdown table
of per-attribute accuracy (and `all`: all three right) with the time taken.

`prompt_accuracy(pipe_or_path, ...)` is the API: it takes a pipeline folder, a loaded diffusers
`StableDiffusionPipeline` or an optimum-intel `OVStableDiffusionPipeline`. The starting noise of
each image is drawn from `torch.Generator().manual_seed(1000 * seed + prompt_index)` and passed as
`latents`, so results do not depend on the batch size nor on the backend's random generator.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import synthetic
from .errors import UserError
from .judge import ATTRIBUTES, load_judge, score


def prompt_set(subset: int | None = None) -> list[dict]:
    """The fixed prompt set: every combination, optionally an evenly spaced subset of `subset` of them."""
    combos = synthetic.all_combinations()
    if subset is not None:
        if subset < 1:
            raise UserError(f"--subset must be >= 1, got {subset}")
        if subset < len(combos):
            step = len(combos) / subset
            combos = [combos[int(i * step)] for i in range(subset)]
    return [
        dict(index=i, shape=s, color=c, background=b, prompt=synthetic.caption_for(s, c, b))
        for i, (s, c, b) in enumerate(combos)
    ]


def _is_openvino_pipeline(pipe) -> bool:
    return type(pipe).__module__.startswith("optimum.intel")


def _static_batch(pipe) -> int | None:
    """The prompt batch an OpenVINO pipeline was statically reshaped to, or None if dynamic."""
    from .generate import static_input_batch

    return static_input_batch(pipe.text_encoder)


def _match_ov_decoder_batch(pipe, batch_size: int, height: int, width: int) -> None:
    """Reshape an already-loaded OV pipeline's VAE decoder to the prompt batch (see generate)."""
    from .generate import _match_vae_decoder_batch

    try:
        _match_vae_decoder_batch(pipe, batch_size, height, width)
    except ValueError as exc:  # compile_only pipelines cannot be reshaped
        raise UserError(
            f"the OpenVINO pipeline's VAE decoder cannot take batches of {batch_size}; load it with compile=False "
            f"(or reshape it with num_images_per_prompt={batch_size})"
        ) from exc


def _image_size(pipe) -> tuple[int, int]:
    h = getattr(pipe, "height", -1)
    w = getattr(pipe, "width", -1)
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return h, w
    side = int(pipe.unet.config["sample_size"]) * int(pipe.vae_scale_factor)
    return side, side


def load_for_quality(model: str | Path, backend: str = "pytorch", batch_size: int = 16):
    from .models import load_pipeline

    model = str(model)
    if backend == "pytorch":
        pipe = load_pipeline(model)
    elif backend == "openvino":
        from .generate import _default_size, load_ov_pipeline

        pipe = load_ov_pipeline(model, *_default_size(model), batch_size=batch_size)
    else:
        raise UserError(f"backend {backend!r} is unknown; use openvino or pytorch")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_accuracy(
    pipe_or_path,
    steps: int = 25,
    guidance_scale: float = 7.5,
    seeds: int = 3,
    subset: int | None = None,
    batch_size: int = 16,
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
    from tqdm.auto import tqdm

    if steps < 1 or seeds < 1:
        raise UserError(f"--steps and --seeds must be >= 1, got {steps} and {seeds}")
    if first_seed < 0:
        raise UserError(f"--first-seed must be >= 0, got {first_seed}")
    t_start = time.perf_counter()
    pipe = pipe_or_path
    if isinstance(pipe_or_path, str | Path):
        pipe = load_for_quality(pipe_or_path, backend, batch_size)
    else:
        backend = "openvino" if _is_openvino_pipeline(pipe) else "pytorch"
    static = _static_batch(pipe) if backend == "openvino" else None
    if static is not None:
        batch_size = static
        _match_ov_decoder_batch(pipe, batch_size, *_image_size(pipe))
    judge = judge or load_judge()
    height, width = _image_size(pipe)
    latent_shape = (pipe.unet.config["in_channels"], height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    jobs = [dict(p, seed=s) for s in range(first_seed, first_seed + seeds) for p in prompt_set(subset)]
    images = []
    t_gen = time.perf_counter()
    batches = range(0, len(jobs), batch_size)
    for start in tqdm(batches, desc="generate", disable=not progress, dynamic_ncols=True):
        chunk = jobs[start : start + batch_size]
        pad = batch_size - len(chunk) if static is not None else 0
        chunk_in = chunk + [chunk[-1]] * pad
        latents = torch.stack(
            [
                torch.randn(latent_shape, generator=torch.Generator().manual_seed(1000 * j["seed"] + j["index"]))
                for j in chunk_in
            ]
        )
        out = pipe(
            [j["prompt"] for j in chunk_in],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            latents=latents,
        )
        images.extend(out.images[: len(chunk)])
    generate_s = time.perf_counter() - t_gen
    preds = judge.predict(images)
    result = score(preds, [{a: j[a] for a in ATTRIBUTES} for j in jobs])
    result["by_value"] = _by_value(jobs, preds)
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


def _by_value(jobs: list[dict], preds: list[dict]) -> dict:
    """Accuracy of each attribute split by its expected value (which shapes/colours fail)."""
    out: dict = {}
    for a in ATTRIBUTES:
        counts: dict[str, list[int]] = {}
        for j, p in zip(jobs, preds):
            c = counts.setdefault(j[a], [0, 0])
            c[0] += p[a] == j[a]
            c[1] += 1
        out[a] = {v: round(ok / n, 4) for v, (ok, n) in counts.items()}
    return out


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ov_sd_trainer.quality", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="diffusers or OpenVINO pipeline folder")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--first-seed", type=int, default=0, help="seeds used: FIRST_SEED .. FIRST_SEED + SEEDS - 1 (held-out checks)"
    )
    p.add_argument("--backend", choices=("pytorch", "openvino"), default="pytorch")
    p.add_argument("--subset", type=int, default=None, help="use N evenly spaced prompts of the 132")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per pipeline call")
    p.add_argument("--judge", default=None, help="judge folder (default: the committed one)")
    p.add_argument("--output-json", default=None)
    p.add_argument("--save-images", default=None, help="folder to save the generated images in")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
