"""`ov-sd demo` (`make demo`): the main job, offline, on the bundled reference model.

QAT of the reference UNet with the `reference-int8` recipe (a short schedule), export to an OpenVINO folder with an
int8 UNet, then text-to-image with optimum-intel's `OVStableDiffusionPipeline` loaded from that folder exactly as a
user would. `--recipe reference-lcm-int8` runs the few-step consistency student instead (an LCM folder, sampled with
the steps and guidance it was trained for, `OVLatentConsistencyModelPipeline`).
"""

from __future__ import annotations

import time
from pathlib import Path

RECIPE = "reference-int8"
PROMPT = "a red circle on a blue background"
PLAIN_STEPS = 25  # the plain int8 demo's image (a consistency student's folder records its own steps)
DEFAULT_QAT_STEPS = 60  # the full recipe runs 300; 60 shows the whole job in a few minutes on 2 cores


def add_arguments(p) -> None:
    p.add_argument("--output", default="outputs/demo")
    p.add_argument("--recipe", default=RECIPE, help=f"the shipped recipe to shorten (default {RECIPE})")
    p.add_argument("--max-steps", type=int, default=DEFAULT_QAT_STEPS, help="QAT steps (the full recipe runs 300)")
    p.add_argument(
        "--calibration-samples",
        type=int,
        default=None,
        help="UNet inputs for NNCF's ranges (default: the recipe's 300)",
    )
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"denoising steps for the final image (default: {PLAIN_STEPS} for an int8 student, the steps a "
        "consistency student was trained for)",
    )


def train_argv(args, run_dir: Path) -> list[str]:
    """`ov-sd train` flags of the demo: the shipped recipe, shortened; no checkpoints, so the last step is kept
    (the recipe's best-checkpoint selection needs them) while the teacher-gap evaluation still reports progress."""
    argv = ["--recipe", args.recipe, "--output_dir", str(run_dir), "--max_steps", str(args.max_steps),
            "--save_strategy", "no", "--load_best_model_at_end", "false", "--overwrite", "true"]  # fmt: skip
    if args.calibration_samples is not None:
        argv += ["--num_calibration_samples", str(args.calibration_samples)]
    return argv


def main(args) -> int:
    from .eval.generate import generate
    from .run_folder import OPENVINO_DIR
    from .train.config import parse_config
    from .train.run import run

    out = Path(args.output)
    run_dir = out / "run"
    cfg, recipe = parse_config(train_argv(args, run_dir))
    if cfg.float_steps:  # a float-then-QAT recipe (reference-lcm-int8): its float phase is shortened alike
        cfg.float_steps = args.max_steps
    t0 = time.perf_counter()
    run(cfg, {**recipe, "max_steps": args.max_steps})
    train_s = time.perf_counter() - t0
    image = out / "sample.png"
    folder = str(run_dir / OPENVINO_DIR)
    steps = args.steps if args.steps is not None or cfg.objective == "consistency" else PLAIN_STEPS
    info = generate(folder, args.prompt, str(image), steps=steps, seed=0)  # None: the folder's trained steps
    print(f"\nQAT + export: {train_s:.0f} s; OpenVINO pipeline: {run_dir / OPENVINO_DIR}")
    print(f"'{args.prompt}' -> {image} ({info['step_s'] * 1000:.1f} ms per UNet step, {info['total_s']:.2f} s total)")
    return 0
