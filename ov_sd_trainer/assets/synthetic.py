"""Synthetic captioned dataset: the offline stand-in for `lambdalabs/pokemon-blip-captions`.

Each image is one coloured shape on a plain coloured background, drawn procedurally; its caption
states exactly what is drawn ("a red circle on a blue background"). Same schema as the Pokemon
dataset: columns `image` (PIL) and `text`. Deterministic for a seed, any size. The attribute
columns (`shape`, `color`, `background`) are kept so that tests and the prompt-fidelity judge can
check image/caption agreement; training only reads `image` and `text`.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
# RGB values chosen far apart so colour is unambiguous even after a blurry VAE decode.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "blue": COLORS["blue"],
    "green": COLORS["green"],
    "red": COLORS["red"],
}
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges like a real photo's


def caption_for(shape: str, color: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (shape, color, background) the generator can draw; shape colour != background."""
    return [(s, c, b) for s, c, b in itertools.product(SHAPES, COLORS, BACKGROUNDS) if COLORS[c] != BACKGROUNDS[b]]


def vocabulary() -> list[str]:
    """All words that captions use (the offline tokenizer gets whole-word tokens for them)."""
    words = {"a", "an", "on", "background", "the", "of", "and", "with", "image", "photo"}
    words.update(SHAPES, COLORS, BACKGROUNDS)
    return sorted(words)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # equilateral, pointing up, centred on its bounding box
        h = r * math.sqrt(3)
        return [(cx, cy - h / 2 - r * 0.1), (cx + r, cy + h / 2 - r * 0.1), (cx - r, cy + h / 2 - r * 0.1)]
    if shape == "cross":  # plus sign with arms one third of the width
        w = r / 3
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw_shape(
    shape: str,
    color: str,
    background: str,
    resolution: int = 64,
    size: float = 0.3,
    center: tuple[float, float] = (0.5, 0.5),
) -> Image.Image:
    """Draw one shape. `size` is the half-width as a fraction of the image, `center` in [0, 1]^2."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if color not in COLORS or background not in BACKGROUNDS:
        raise ValueError(f"unknown colour {color!r}/{background!r}; expected {list(COLORS)} / {list(BACKGROUNDS)}")
    n = resolution * SUPERSAMPLE
    img = Image.new("RGB", (n, n), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    cx, cy, r = center[0] * n, center[1] * n, size * n
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
    else:
        d.polygon(_polygon(shape, cx, cy, r), fill=COLORS[color])
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)


def sample_attributes(num_samples: int, seed: int = 0) -> list[dict]:
    """Deterministic attribute draws: shape/colour/background uniform over valid combinations,
    size in [0.2, 0.35] of the image, centre so that the shape stays inside the frame."""
    rng = np.random.default_rng(seed)
    combos = all_combinations()
    rows = []
    for _ in range(num_samples):
        shape, color, background = combos[rng.integers(len(combos))]
        size = float(rng.uniform(0.2, 0.35))
        margin = size + 0.03
        center = (float(rng.uniform(margin, 1 - margin)), float(rng.uniform(margin, 1 - margin)))
        rows.append(dict(shape=shape, color=color, background=background, size=size, center=center))
    return rows


def make_synthetic_dataset(num_samples: int = 1000, seed: int = 0, resolution: int = 64):
    """A `datasets.Dataset` with columns image (PIL), text, shape, color, background."""
    import datasets

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
    rows = sample_attributes(num_samples, seed)
    data = {
        "image": [
            draw_shape(r["shape"], r["color"], r["background"], resolution, r["size"], r["center"]) for r in rows
        ],
        "text": [caption_for(r["shape"], r["color"], r["background"]) for r in rows],
        "shape": [r["shape"] for r in rows],
        "color": [r["color"] for r in rows],
        "background": [r["background"] for r in rows],
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "shape": datasets.Value("string"),
            "color": datasets.Value("string"),
            "background": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(data, features=features)


# --------------------------------------------------------------------------------------------------------------------
# `ov-sd make-dataset`
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(s) -> None:
    s.add_argument("--output", required=True)
    s.add_argument("--num-samples", type=int, default=1000)
    s.add_argument("--resolution", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def main(args) -> int:
    """Write the synthetic set as an `imagefolder` (PNG files + metadata.jsonl), which `dataset_name` accepts."""
    import json

    from ..outputs import atomic_output_dir

    ds = make_synthetic_dataset(args.num_samples, seed=args.seed, resolution=args.resolution)
    with atomic_output_dir(args.output, overwrite=args.overwrite) as tmp:
        with open(tmp / "metadata.jsonl", "w") as f:
            for i, row in enumerate(ds):
                name = f"{i:06d}.png"
                row["image"].save(tmp / name)
                f.write(json.dumps({"file_name": name, "text": row["text"]}) + "\n")
    print(f"{len(ds)} captioned images written to {args.output} (imagefolder layout)")
    return 0
