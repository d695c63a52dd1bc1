"""`make demo`: the main job, offline, on the bundled reference model.

QAT of the reference UNet with the `reference-int8` recipe (a short schedule), export to an
OpenVINO folder with an int8 UNet, then text-to-image with optimum-intel's
`OVStableDiffusionPipeline` loaded from that folder exactly as a user would.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "reference-int8.json"
PROMPT = "a red circle on a blue background"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="outputs/demo")
    p.add_argument("--max-steps", type=int, default=60, help="QAT steps (the full recipe runs 300)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--steps", type=int, default=25, help="denoising steps for the final image")
    args = p.parse_args(argv)

    from .config import parse_config
    from .errors import UserError
    from .generate import generate
    from .training import OPENVINO_DIR, run

    out = Path(args.output)
    run_dir = out / "run"
    try:
        cfg, recipe = parse_config(
            [
                "--recipe",
                str(RECIPE),
                "--output_dir",
                str(run_dir),
                "--max_steps",
                str(args.max_steps),
                "--save_strategy",
                "no",
                "--overwrite",
                "true",
            ]  # fmt: skip
        )
        t0 = time.perf_counter()
        run(cfg, {**recipe, "max_steps": args.max_steps})
        train_s = time.perf_counter() - t0
        image = out / "sample.png"
        info = generate(str(run_dir / OPENVINO_DIR), args.prompt, str(image), steps=args.steps, seed=0)
    except UserError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    print(f"\nQAT + export: {train_s:.0f} s; OpenVINO pipeline: {run_dir / OPENVINO_DIR}")
    print(f"'{args.prompt}' -> {image} ({info['step_s'] * 1000:.1f} ms per UNet step, {info['total_s']:.2f} s total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
