"""The fixed prompt sets: every attribute combination of the synthetic dataset, captioned like the training data."""

from __future__ import annotations

from ..assets import synthetic
from ..errors import UserError


def prompt_set(subset: int | None = None) -> list[dict]:
    """The evaluation prompt set (132 prompts): dicts with index, shape, color, background and prompt; optionally
    an evenly spaced subset of `subset` of them."""
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


def calibration_prompts(seed: int = 0) -> list[str]:
    """Every caption of the synthetic dataset (132), shuffled: calibration prompts for the reference model."""
    import random

    prompts = [synthetic.caption_for(*c) for c in synthetic.all_combinations()]
    random.Random(seed).shuffle(prompts)
    return prompts


def jobs_for(subset: int | None, seeds: int, first_seed: int = 0) -> list[dict]:
    """(prompt, seed) jobs, seed-major: every prompt of the set for seed `first_seed`, then the next seed, ..."""
    return [dict(p, seed=s) for s in range(first_seed, first_seed + seeds) for p in prompt_set(subset)]
