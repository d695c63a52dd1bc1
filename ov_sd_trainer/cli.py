"""`ov-sd`: the project's one command line. `ov-sd <command> --help` for each command's options.

Each command lives in the module of its pipeline stage, which exposes `add_arguments(parser)` and `main(args)`; this
file only dispatches (importing just the chosen command's module) and owns the one error path: bad input is printed
as one line `ov-sd: error: ...` with exit status 2. Options are written `--kebab-case`; every command also accepts
the underscore spelling (`--max_steps`, the QATConfig field names that recipes use). Output is quiet by default
(`logs.configure`); `--verbose`, before or after the command, shows every library's warnings and logs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import logs
from .errors import UserError

# name -> (module, one-line help), grouped by pipeline stage
COMMANDS: dict[str, tuple[str, str]] = {
    # train
    "train": ("ov_sd_trainer.train.run", "quantization-aware training of the UNet (--recipe NAME, QATConfig flags)"),
    "train-decoder": (
        "ov_sd_trainer.train.decoder",
        "distil a tiny conv-only VAE decoder (TAESD architecture) from the pipeline's VAE",
    ),
    "demo": ("ov_sd_trainer.demo", "the main job offline on the bundled model: short QAT, export, one image"),
    # export
    "export": ("ov_sd_trainer.export.openvino", "export a training checkpoint to an OpenVINO pipeline folder"),
    "deepcache": ("ov_sd_trainer.export.deepcache", "add step-caching (DeepCache) UNet IRs to an OpenVINO folder"),
    "tiny-decoder": (
        "ov_sd_trainer.export.tiny_decoder",
        "put a trained tiny VAE decoder into an OpenVINO folder, or switch between its decoders",
    ),
    "push": ("ov_sd_trainer.export.hub", "upload an exported OpenVINO folder to the Hugging Face Hub"),
    "prepare-genai": (
        "ov_sd_trainer.export.openvino",
        "add the tokenizer IRs OpenVINO GenAI needs to an older OpenVINO folder (and list its scheduler's betas)",
    ),
    # eval
    "generate": ("ov_sd_trainer.eval.generate", "generate an image from an OpenVINO or diffusers pipeline"),
    "ptq": ("ov_sd_trainer.eval.ptq", "optimum-intel's post-training quantization (hybrid or full int8): the peer"),
    "eval": ("ov_sd_trainer.eval.fidelity", "fidelity of OpenVINO variants to the FP32 teacher (PSNR/SSIM/MSE/judge)"),
    "quality": ("ov_sd_trainer.eval.accuracy", "prompt accuracy of a pipeline on the fixed prompt set (the judge)"),
    "bench": ("ov_sd_trainer.eval.bench.run", "latency, size and memory of every variant side by side"),
    "regression": ("ov_sd_trainer.eval.regression", "short QAT + PTQ + eval of the reference model, checked"),
    # assets
    "make-tiny": ("ov_sd_trainer.assets.builders", "write a randomly initialised tiny SD pipeline (offline)"),
    "make-dataset": ("ov_sd_trainer.assets.synthetic", "write the synthetic captioned dataset as an imagefolder"),
    "make-reference": ("ov_sd_trainer.assets.reference_training", "train the bundled reference model from scratch"),
    "make-judge": ("ov_sd_trainer.eval.judge_training", "train the prompt-fidelity judge"),
    "judge": ("ov_sd_trainer.eval.judge_training", "held-out accuracy of the judge"),
}
# Commands whose module exposes other names than add_arguments / main (two commands in one module).
ENTRY_POINTS = {
    "make-judge": ("add_make_arguments", "make_main"),
    "prepare-genai": ("add_prepare_genai_arguments", "prepare_genai_main"),
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised as UserError), no abbreviations, and `--a_b` aliases of `--a-b`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        return super().add_argument(*names, *_underscore_aliases(names), **kwargs)

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        group.add_argument = _with_aliases(group.add_argument)
        return group

    def add_mutually_exclusive_group(self, **kwargs):
        group = super().add_mutually_exclusive_group(**kwargs)
        group.add_argument = _with_aliases(group.add_argument)
        return group

    def error(self, message):
        raise UserError(f"{message}; see `{self.prog} --help`")


def _underscore_aliases(names) -> list[str]:
    """`--batch-size` -> `--batch_size` (so both spellings work in every command)."""
    return ["--" + n[2:].replace("-", "_") for n in names if n.startswith("--") and "-" in n[2:]]


def _with_aliases(add):
    def add_argument(*names, **kwargs):
        return add(*names, *_underscore_aliases(names), **kwargs)

    return add_argument


def _entry(command: str):
    module = importlib.import_module(COMMANDS[command][0])
    add, main = ENTRY_POINTS.get(command, ("add_arguments", "main"))
    return module, getattr(module, add), getattr(module, main)


def build_parser(command: str | None = None) -> Parser:
    """The `ov-sd` parser; only `command`'s module is imported to add its options (the rest stay lazy)."""
    p = Parser(prog="ov-sd", description=__doc__.split("\n\n")[0])
    p.add_argument(logs.VERBOSE_FLAG, action="store_true", help=logs.VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, (_, help_text) in COMMANDS.items():
        if name != command or command is None:
            sub.add_parser(name, help=help_text)
            continue
        module, add, _ = _entry(name)
        passes_through = getattr(module, "PASSES_UNKNOWN_ARGS", False)  # train: its own HfArgumentParser
        s = sub.add_parser(name, help=help_text, description=help_text, add_help=not passes_through)
        # also after the command; SUPPRESS keeps the subparser from resetting a --verbose given before it
        s.add_argument(logs.VERBOSE_FLAG, action="store_true", default=argparse.SUPPRESS, help=logs.VERBOSE_HELP)
        add(s)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the root parser has no option with a value
    # Before the parser is built: building it imports the command's module, and some libraries speak as they import.
    # The parser then takes --verbose as a flag (so it does not reach the command's own options).
    logs.configure(verbose=logs.VERBOSE_FLAG in argv)
    try:
        parser = build_parser(command)
        args, extra = parser.parse_known_args(argv)
        module, _, run = _entry(args.command)
        args.argv = argv  # recorded by commands that report how they ran
        if getattr(module, "PASSES_UNKNOWN_ARGS", False):
            return run(args, extra) or 0
        if extra:
            raise UserError(f"unrecognized arguments: {' '.join(extra)}; see `ov-sd {args.command} --help`")
        return run(args) or 0
    except UserError as e:
        print(f"ov-sd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
