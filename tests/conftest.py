"""Test-wide settings (offline, one intra-op thread) and the fixtures several test modules share.

One thread: tiny models gain nothing from a second one, and on a 2-core machine with any other load an OpenMP team
of 2 spin-waits (a small conv measured 32 ms with 2 threads vs 1.1 ms with 1)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the CLI / accelerate subprocesses

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Fixtures of the export / eval / bench tests (a shared FP32 export, ...) live in their own module.
pytest_plugins = ["export_fixtures"]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """One tiny diffusers SD pipeline folder (64 px, seed 0), shared read-only by every test that needs a base model."""
    from ov_sd_trainer.assets.builders import TinySDConfig, build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny") / "pipe"
    build_tiny_pipeline(path, TinySDConfig(seed=0))
    return path


@pytest.fixture(scope="session")
def qat_run(tmp_path_factory, tiny_pipeline):
    """One finished tiny QAT run (3 steps, export at the end, a recorded Hub push): its run folder and export.

    Shared by the export, model-card, push, CLI and bad-input tests; they read it and write elsewhere."""
    from ov_sd_trainer.run_folder import OPENVINO_DIR
    from ov_sd_trainer.train.config import parse_config
    from ov_sd_trainer.train.run import run

    root = tmp_path_factory.mktemp("qat-run")
    argv = [
        "--pretrained_model_name_or_path", str(tiny_pipeline), "--dataset_name", "synthetic:12",
        "--output_dir", str(root / "run"), "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--num_calibration_samples", "4", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--disable_tqdm", "true", "--learning_rate", "1e-4",
    ]  # fmt: skip
    argv += ["--push_to_hub", "true", "--hub_model_id", "me/tiny-int8", "--hub_token", "t0k"]
    cfg, recipe = parse_config(argv)
    pushed = []
    with pytest.MonkeyPatch.context() as mp:  # the recipe's push goes through export.hub.push_to_hub: record it
        mp.setattr("ov_sd_trainer.export.hub.push_to_hub", lambda folder, repo, **kw: pushed.append((folder, repo, kw)))
        out = run(cfg, {"pretrained_model_name_or_path": str(tiny_pipeline), "max_steps": 3})
    return {"base": tiny_pipeline, "out": out, "ov": out / OPENVINO_DIR, "root": root, "pushed": pushed}
