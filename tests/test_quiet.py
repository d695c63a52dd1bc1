"""Quiet by default: an `ov-sd` command prints its own output and none of the known third-party noise; `--verbose`
brings the noise back (which also shows that the command really triggers it, so the quiet check can fail).

One real command, the cheapest that triggers most of the noise: `ov-sd generate` on a diffusers folder, which
optimum-intel exports to OpenVINO on the fly (torch traces the models: TracerWarnings; offline it first reads the
folder as a Hub id: `[Errno 2] ... models----tmp...`; every optimum-intel pipeline load: the safety-checker notice).
The quiet and the verbose run go side by side (two processes, one thread each)."""

import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "ov_sd_trainer.cli"]
# Printed by the command in both modes (transformers' `loss_type=None` and `Multiple distributions found for package
# optimum` too, but the latter depends on the installed packages, so it is only checked for absence)
NOISE = (
    "TracerWarning",
    "[Errno 2] No such file or directory",
    "Could not infer whether the model was already converted",
    "You have disabled the safety checker",
    "loss_type=None",
    "Loading pipeline components",
)
ALWAYS_QUIET = ("Multiple distributions found for package", "Failed to load CPU gemm_4bit_forward", "INFO:nncf")


@pytest.mark.slow  # two `ov-sd generate` processes, each exporting on the fly (~90 s on one core): CI
def test_generate_is_quiet_unless_verbose(tiny_pipeline, tmp_path):
    argv = ["generate", "--model", str(tiny_pipeline), "--prompt", "a red circle", "--steps", "2"]
    runs = {
        mode: subprocess.Popen(
            CLI + argv + ["--output", str(tmp_path / f"{mode}.png")] + (["--verbose"] if mode == "verbose" else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in ("quiet", "verbose")
    }
    out = {mode: p.communicate(timeout=600) for mode, p in runs.items()}
    for mode, p in runs.items():
        assert p.returncode == 0, f"{mode}: {out[mode][1][-3000:]}"
        assert (tmp_path / f"{mode}.png").is_file()
        assert (
            f"saved {tmp_path / f'{mode}.png'} (64x64, 2 steps, guidance 7.5, optimum)" in out[mode][0]
        )  # the result line
    quiet = "".join(out["quiet"])
    verbose = "".join(out["verbose"])
    assert [n for n in NOISE + ALWAYS_QUIET if n in quiet] == []
    assert [n for n in NOISE if n not in verbose] == []
    # what stays: the result on stdout, and on stderr only the pipeline's denoising bar
    assert out["quiet"][0].strip().splitlines() == [out["quiet"][0].strip()]
    others = [line for line in out["quiet"][1].splitlines() if line.strip() and "/2 [" not in line]
    assert others == []


def test_verbose_is_a_global_flag_before_or_after_the_command():
    from ov_sd_trainer import cli

    base = ["--model", "m", "--prompt", "p", "--output", "o.png"]
    for argv, verbose in ((["--verbose", "generate", *base], True), (["generate", *base, "--verbose"], True),
                          (["generate", *base], False)):  # fmt: skip
        args, extra = cli.build_parser("generate").parse_known_args(argv)
        assert (args.verbose, extra) == (verbose, [])
    # train passes unknown flags on to its own parser: --verbose must not reach it
    args, extra = cli.build_parser("train").parse_known_args(["train", "--recipe", "r", "--verbose"])
    assert (args.verbose, extra) == (True, ["--recipe", "r"])


def test_a_failing_quiet_setting_never_breaks_the_import(caplog, monkeypatch):
    import importlib

    from ov_sd_trainer import logs

    monkeypatch.delitem(sys.modules, "colorsys", raising=False)  # a small stdlib module, imported afresh
    seen = []
    logs.after_import("colorsys", lambda module: seen.append(module.__name__) or 1 / 0)
    with caplog.at_level("WARNING", logger=logs.__name__):
        module = importlib.import_module("colorsys")
    assert module.rgb_to_hsv(1, 0, 0) == (0, 1, 1) and seen == ["colorsys"]
    assert "could not quiet colorsys (division by zero)" in caplog.text
