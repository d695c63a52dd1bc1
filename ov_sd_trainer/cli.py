"""`ov-sd`: the project's command line (tiny pipelines, datasets, generation).

Every user error is printed as one line `ov-sd: error: ...` with exit status 2."""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def _cmd_make_tiny(args):
    from .models import TinySDConfig, build_tiny_pipeline
    from .outputs import atomic_output_dir

    with atomic_output_dir(args.output, overwrite=args.overwrite) as tmp:
        build_tiny_pipeline(tmp, TinySDConfig(resolution=args.resolution, seed=args.seed))
    print(f"tiny Stable Diffusion pipeline written to {args.output}")


def _cmd_make_dataset(args):
    from .outputs import atomic_output_dir
    from .synthetic import make_synthetic_dataset

    ds = make_synthetic_dataset(args.num_samples, seed=args.seed, resolution=args.resolution)
    with atomic_output_dir(args.output, overwrite=args.overwrite) as tmp:
        import json

        with open(tmp / "metadata.jsonl", "w") as f:
            for i, row in enumerate(ds):
                name = f"{i:06d}.png"
                row["image"].save(tmp / name)
                f.write(json.dumps({"file_name": name, "text": row["text"]}) + "\n")
    print(f"{len(ds)} captioned images written to {args.output} (imagefolder layout)")


def _cmd_generate(args):
    from .generate import generate

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


def _cmd_export(args):
    from .export import export_openvino_pipeline, load_student_from_checkpoint
    from .outputs import check_output_dir

    check_output_dir(args.output, args.overwrite)  # fail before the slow load
    student, cfg, base, recipe = load_student_from_checkpoint(args.checkpoint, use_ema=not args.no_ema)
    export_openvino_pipeline(
        base,
        student,
        args.output,
        overwrite=args.overwrite,
        recipe=recipe,
        sample_prompts=args.sample_prompt,
        sample_steps=args.sample_steps,
        resolution=cfg.get("resolution"),
    )
    print(f"OpenVINO pipeline written to {args.output}")


def _cmd_push(args):
    from .hub import push_to_hub, upload_plan

    files = upload_plan(args.model)
    if args.dry_run:
        print("\n".join(files))
        return
    url = push_to_hub(args.model, args.repo_id, token=args.token, private=args.private)
    print(f"uploaded {len(files)} files to {url}")


def _cmd_bench(args):
    from .bench import main as bench_main

    bench_main(args, argv=args.argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ov-sd", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-tiny", help="write a randomly initialised tiny SD pipeline (offline)")
    s.add_argument("--output", required=True)
    s.add_argument("--resolution", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    s.set_defaults(func=_cmd_make_tiny)

    s = sub.add_parser("make-dataset", help="write the synthetic captioned dataset as an imagefolder")
    s.add_argument("--output", required=True)
    s.add_argument("--num-samples", type=int, default=1000)
    s.add_argument("--resolution", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_make_dataset)

    s = sub.add_parser("generate", help="generate an image from an OpenVINO or diffusers pipeline")
    s.add_argument("--model", required=True, help="OpenVINO export folder, diffusers folder or Hub id")
    s.add_argument("--prompt", required=True)
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--output", required=True, help="PNG path")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--height", type=int, default=None, help="default: the size the model was trained at")
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--guidance-scale", type=float, default=7.5)
    s.add_argument("--backend", choices=("openvino", "pytorch"), default="openvino")
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("export", help="export a training checkpoint to an OpenVINO pipeline folder (int8 UNet)")
    s.add_argument("--checkpoint", required=True, help="output_dir/final or output_dir/checkpoint-N")
    s.add_argument("--output", required=True)
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    s.add_argument("--no-ema", action="store_true", help="export the raw student, not its EMA (checkpoint-N only)")
    s.add_argument("--sample-prompt", action="append", default=None, help="render a sample image (repeatable)")
    s.add_argument("--sample-steps", type=int, default=20)
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("push", help="upload an exported OpenVINO folder to the Hugging Face Hub")
    s.add_argument("--model", required=True, help="the exported OpenVINO folder")
    s.add_argument("--repo-id", required=True, help="user/name")
    s.add_argument("--token", default=None, help="default: $HF_TOKEN or the stored login")
    s.add_argument("--private", action="store_true")
    s.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded")
    s.set_defaults(func=_cmd_push)

    from .bench import add_arguments as add_bench_arguments

    s = sub.add_parser(
        "bench",
        help="latency, size and memory: PyTorch, OpenVINO FP32/default, optimum int8 PTQ, QAT int8 (+ToMe)",
        allow_abbrev=False,
    )
    add_bench_arguments(s)
    s.set_defaults(func=_cmd_bench)

    from .evaluation import add_arguments as add_eval_arguments

    add_eval_arguments(
        sub.add_parser(
            "eval", help="fidelity of OpenVINO variants to the FP32 teacher (PSNR/SSIM/MSE/judge)", allow_abbrev=False
        )
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by commands that report how they ran
    try:
        args.func(args)
    except UserError as e:
        print(f"ov-sd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
