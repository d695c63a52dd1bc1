"""Crash and resume with a real `accelerate launch -m ov_sd_trainer.train` killed by SIGKILL; incomplete checkpoints;
determinism; two processes with gloo."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ov_sd_trainer.compress import quantize
from ov_sd_trainer.run_folder import COMPLETE_MARKER, FINAL_DIR, find_resumable_checkpoint
from ov_sd_trainer.train.config import parse_config
from ov_sd_trainer.train.run import run

STEPS = 24


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_pipeline):
    root = tmp_path_factory.mktemp("crash")
    path = root / "recipe.json"
    path.write_text(
        json.dumps(
            {
                "pretrained_model_name_or_path": str(tiny_pipeline),
                "dataset_name": "synthetic:16",
                "max_steps": STEPS,
                "per_device_train_batch_size": 2,
                "num_calibration_samples": 4,
                "learning_rate": 1e-4,
                "lr_scheduler_type": "cosine",
                "save_strategy": "steps",
                "save_steps": 2,
                "save_total_limit": 2,
                "logging_steps": 1,
                "report_to": "none",
                "use_cpu": True,
                "export": False,
                "ema_decay": 0.9,
                "seed": 7,
                "disable_tqdm": True,
            }  # fmt: skip
        )
    )
    return path


def launch(recipe, out, *extra):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ov_sd_trainer.train", "--recipe", str(recipe),
           "--output_dir", str(out), *extra]  # fmt: skip
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # ~60 s; exact resume stays in the default run (test_trainer.py: resume after 2 of 4 steps)
def test_sigkill_then_resume_equals_uninterrupted(recipe, tmp_path):
    # the uninterrupted reference, in-process
    cfg, raw = parse_config(["--recipe", str(recipe), "--output_dir", str(tmp_path / "full")])
    full = run(cfg, raw)

    proc = launch(recipe, tmp_path / "crash")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if find_resumable_checkpoint(tmp_path / "crash") is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished (or died) before it could be killed:\n" + proc.stdout.read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = find_resumable_checkpoint(tmp_path / "crash")
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < STEPS
    assert not (tmp_path / "crash" / FINAL_DIR).exists()

    proc = launch(recipe, tmp_path / "crash", "--resume_from_checkpoint", "latest")
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log[-3000:]

    # final student (EMA applied), and the last checkpoint's raw student and EMA: all equal
    name = quantize.STATE_SAFETENSORS
    pairs = [
        (full / FINAL_DIR / "student" / name, tmp_path / "crash" / FINAL_DIR / "student" / name),
        (full / f"checkpoint-{STEPS}" / "student" / name, tmp_path / "crash" / f"checkpoint-{STEPS}" / "student" / name),
        (full / f"checkpoint-{STEPS}" / "ema.safetensors", tmp_path / "crash" / f"checkpoint-{STEPS}" / "ema.safetensors"),
    ]  # fmt: skip
    for a, b in pairs:
        sa, sb = load_file(str(a)), load_file(str(b))
        assert sa.keys() == sb.keys()
        scales = [k for k in sa if "__nncf_hooks" in k]
        assert scales, "quantizer parameters are part of the comparison"
        for k in sa:
            # bit-identical in practice (seeded noise and augmentation); the stated tolerance allows
            # for a different summation order if a process restarts on another thread count
            assert torch.allclose(sa[k], sb[k], rtol=1e-6, atol=1e-8), (a.parent.name, k)


def test_incomplete_checkpoint_is_skipped(tmp_path, caplog):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / COMPLETE_MARKER).write_text("{}")
    with caplog.at_level("WARNING"):
        assert find_resumable_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert "checkpoint-6" in caplog.text and "incomplete" in caplog.text
    (tmp_path / "checkpoint-4" / COMPLETE_MARKER).unlink()
    assert find_resumable_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_same_seed_same_losses(recipe, tmp_path):
    logs = []
    for name in ("a", "b"):
        argv = ["--recipe", str(recipe), "--output_dir", str(tmp_path / name), "--max_steps", "3",
                "--save_strategy", "no"]  # fmt: skip
        cfg, raw = parse_config(argv)
        out = run(cfg, raw)
        info = json.loads((out / FINAL_DIR / "training_info.json").read_text())
        logs.append([(h["loss"], h["task_loss"], h["distillation_loss"]) for h in info["log_history"] if "loss" in h])
    assert len(logs[0]) == 3 and logs[0] == logs[1]


def test_two_processes_gloo(recipe, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine: torchrun + gloo DDP."""
    out = tmp_path / "mp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ov_sd_trainer.train",
           "--recipe", str(recipe), "--output_dir", str(out), "--max_steps", "4", "--export", "true"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    info = json.loads((out / FINAL_DIR / "training_info.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == 4
    start, end = info["quantizer_digests_at_start"], info["quantizer_digests_at_end"]
    assert len(start) == 2 and start[0] == start[1], "ranks started from different quantizer ranges"
    assert len(end) == 2 and end[0] == end[1], "quantizer parameters diverged across ranks"
    assert start[0] != end[0], "training did not move the quantizers"
    # only the main process wrote: one export, checkpoints, and no leftover calibration hand-over
    assert (out / "openvino" / "unet" / "openvino_model.xml").is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoint-2", "checkpoint-4", FINAL_DIR, "loss.png", "openvino", "training_recipe.json"]
    )
