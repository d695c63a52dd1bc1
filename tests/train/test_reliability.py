"""Crash and resume with a real `accelerate launch -m ov_sd_trainer.train` killed by SIGKILL; incomplete checkpoints;
determinism; two processes with gloo (DDP, and FSDP sharding the student; both for the consistency objective too)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ov_sd_trainer.compress import quantize
from ov_sd_trainer.pipeline_folder import UNET_XML
from ov_sd_trainer.run_folder import COMPLETE_MARKER, FINAL_DIR, OPENVINO_DIR, find_resumable_checkpoint
from ov_sd_trainer.train.config import parse_config
from ov_sd_trainer.train.consistency import TARGET_FILE
from ov_sd_trainer.train.run import run

STEPS = 12  # the SIGKILL test's run: the kill lands after step 2, ten steps before the end


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


# Same seed, same losses: tests/train/test_trainer.py (a 2-step run of the shared run's flags logs its losses exactly).


@pytest.fixture(scope="module")
def ddp_run(recipe, tmp_path_factory):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine (torchrun + gloo DDP), 4 steps with
    export: checked by `test_two_processes_gloo`."""
    out = tmp_path_factory.mktemp("ddp") / "mp"
    return {"out": out, "info": _launch_two(recipe, out, "--export", "true", fsdp=False)}


@pytest.mark.slow  # two processes (~65 s), run in CI; exact resume and one-process `accelerate launch` stay default
def test_two_processes_gloo(ddp_run):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine: torchrun + gloo DDP."""
    out, info = ddp_run["out"], ddp_run["info"]
    assert info["world_size"] == 2 and info["global_step"] == 4
    start, end = info["quantizer_digests_at_start"], info["quantizer_digests_at_end"]
    assert len(start) == 2 and start[0] == start[1], "ranks started from different quantizer ranges"
    assert len(end) == 2 and end[0] == end[1], "quantizer parameters diverged across ranks"
    assert start[0] != end[0], "training did not move the quantizers"
    # only the main process wrote: one export, checkpoints, and no leftover calibration hand-over
    assert (out / OPENVINO_DIR / UNET_XML).is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoint-2", "checkpoint-4", FINAL_DIR, "loss.png", "openvino", "training_recipe.json"]
    )


LCM_FLAGS = ("--objective", "consistency", "--time_cond_proj_dim", "8", "--num_ddim_timesteps", "10")


@pytest.fixture(scope="module")
def lcm_ddp_run(recipe, tmp_path_factory):
    """`objective consistency` under DDP (torchrun + gloo, 2 processes), 4 steps, checkpoints at 2 and 4: checked by
    `test_two_processes_gloo_consistency` and the reference of the FSDP consistency test."""
    out = tmp_path_factory.mktemp("lcm-ddp") / "lcm"
    return {"out": out, "info": _launch_two(recipe, out, *LCM_FLAGS, fsdp=False)}


@pytest.mark.slow  # two processes (~60 s), run in CI
def test_two_processes_gloo_consistency(lcm_ddp_run):
    """`objective consistency` under DDP: the ranks calibrate once (the main process's student handed over), stay
    identical through training (quantizers and target network alike), and the main process saves the target network
    with each checkpoint."""
    out, info = lcm_ddp_run["out"], lcm_ddp_run["info"]
    assert info["world_size"] == 2 and info["global_step"] == 4
    start, end = info["quantizer_digests_at_start"], info["quantizer_digests_at_end"]
    assert start[0] == start[1] and end[0] == end[1] and start[0] != end[0]
    assert all(h["consistency_loss"] > 0 for h in info["log_history"] if "loss" in h)
    assert (out / "checkpoint-2" / TARGET_FILE).is_file()


@pytest.mark.slow  # two FSDP launches (~2.5 min), run in CI
def test_fsdp_consistency_shards_student_and_target_and_matches_ddp(recipe, lcm_ddp_run, tmp_path):
    """`accelerate launch --config_file recipes/accelerate/fsdp-full-shard.yaml` on the CPU (gloo, 2 processes), with
    `objective consistency`: the student and the target network are sharded (each rank holds about half), the run
    trains to what DDP trains (losses, student and target network), checkpoints whole tensors (student, EMA,
    optimizer, target network: no per-rank shards), exports, and a resume from a sharded checkpoint equals the
    uninterrupted run exactly: student, EMA, optimizer (the final EMA student and checkpoint-4 depend on all three)
    and the target network. The FSDP machinery (`train/fsdp.py`, the sharded EMA, checkpoints, export) is the
    distillation objective's too; this run adds the target network, so it covers both objectives in one pair of
    launches (the distillation objective's two processes: `test_two_processes_gloo`)."""
    out, ddp_out = tmp_path / "fsdp", lcm_ddp_run["out"]
    info = _launch_two(recipe, out, *LCM_FLAGS, "--export", "true", fsdp=True)
    shard = info["sharding"]
    assert shard is not None and info["world_size"] == 2 and info["global_step"] == 4
    local, total = shard["student_params_local"], shard["student_params"]
    assert len(local) == 2 and all(abs(n / total - 0.5) < 0.01 for n in local), shard  # really sharded
    assert sum(local) >= total  # (FSDP pads the last rank's shard of a tensor, never drops any of it)
    start = info["quantizer_digests_at_start"]
    assert start[0] == start[1] and info["quantizer_digests_at_end"][0] != start[0]
    assert (out / OPENVINO_DIR / UNET_XML).is_file()
    for step in (2, 4):  # whole tensors each save: student, EMA, optimizer, target network
        names = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert {"student", "ema.safetensors", "optimizer.pt", "scheduler.pt", TARGET_FILE} <= names
    losses = [[h["consistency_loss"] for h in i["log_history"] if "loss" in h] for i in (info, lcm_ddp_run["info"])]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-3)
    name = quantize.STATE_SAFETENSORS
    for sub, ref in ((f"checkpoint-4/{TARGET_FILE}", f"checkpoint-2/{TARGET_FILE}"),
                     (f"checkpoint-4/student/{name}", f"checkpoint-2/student/{name}")):  # fmt: skip
        gap = _relative_gap(out / sub, ddp_out / sub, out / ref)  # (whole tensors, the same names as DDP's)
        print(f"{sub}: FSDP vs DDP {gap:.2e} of the steps-3-4 movement")
        assert gap < 0.02, (sub, gap)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    _launch_two(recipe, resumed, *LCM_FLAGS, "--resume_from_checkpoint", "latest", fsdp=True)
    for sub in (f"checkpoint-4/{TARGET_FILE}", f"checkpoint-4/student/{name}", "checkpoint-4/ema.safetensors",
                f"{FINAL_DIR}/student/{name}"):  # fmt: skip
        assert _max_diff(out / sub, resumed / sub) == 0, sub


FSDP_CONFIG = Path(__file__).resolve().parents[2] / "ov_sd_trainer" / "recipes" / "accelerate" / "fsdp-full-shard.yaml"


def _launch_two(recipe, out, *extra, fsdp: bool):
    how = ["--config_file", str(FSDP_CONFIG)] if fsdp else ["--multi_gpu", "--mixed_precision", "no",
                                                               "--dynamo_backend", "no"]  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2", "--num_machines", "1",
           "-m", "ov_sd_trainer.train", "--recipe", str(recipe), "--output_dir", str(out), "--max_steps", "4", *extra]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads((out / FINAL_DIR / "training_info.json").read_text())


def _max_diff(a, b):
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


def _relative_gap(a, b, ref):
    """||a - b|| / ||a - ref|| over all tensors: how far two runs end apart, relative to how far training moved a
    from `ref`. A wrong gradient average (sum, or one rank's gradient) gives ~1; float noise gives ~0."""
    sa, sb, sr = (load_file(str(x)) for x in (a, b, ref))
    assert sa.keys() == sb.keys() == sr.keys()
    gap = sum(((sa[k].double() - sb[k].double()) ** 2).sum().item() for k in sa) ** 0.5
    moved = sum(((sa[k].double() - sr[k].double()) ** 2).sum().item() for k in sa) ** 0.5
    assert moved > 0
    return gap / moved
