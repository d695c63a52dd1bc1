"""The bundled offline assets and the code that rebuilds them.

Data (package data, committed): `reference/`, a small Stable Diffusion pipeline trained from scratch on the synthetic
set (`reference_training` rebuilds it: `ov-sd make-reference`), and `judge/`, the classifier that reads shape, colour
and background off generated images (`eval.judge`; `eval.judge_training` rebuilds it: `ov-sd make-judge`). Code: `synthetic` (the captioned
dataset), `tokenizer` (an offline CLIP tokenizer), `builders` (tiny and SD 1.5-architecture pipelines with random
weights). Nothing here downloads.
"""

from __future__ import annotations

from pathlib import Path

REFERENCE = "reference"  # as a model name (`pretrained_model_name_or_path`): the bundled reference model
ASSETS_DIR = Path(__file__).resolve().parent


def reference_model_path() -> Path:
    """The committed reference pipeline folder (a diffusers `StableDiffusionPipeline` folder)."""
    return ASSETS_DIR / "reference"


def judge_path() -> Path:
    """The committed judge folder (config.json + model.safetensors)."""
    return ASSETS_DIR / "judge"


def resolve_model_path(name: str) -> str:
    """`reference` -> the bundled model's folder; anything else (a folder or a Hub id) as it is."""
    return str(reference_model_path()) if name == REFERENCE else name
