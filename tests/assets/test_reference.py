"""The committed reference model, its training script and the quality command."""

from __future__ import annotations

import json

import pytest
import torch

from ov_sd_trainer import assets, cli
from ov_sd_trainer.errors import UserError
from ov_sd_trainer.eval import accuracy as quality
from ov_sd_trainer.eval.prompts import prompt_set


def _folder_mb(path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(str(assets.reference_model_path()), safety_checker=None)
    p.set_progress_bar_config(disable=True)
    return p


def test_committed_model_is_a_small_sd_pipeline():
    path = assets.reference_model_path()
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"][1] == "PNDMScheduler"
    assert list(path.rglob("*.safetensors")) and not list(path.rglob("*.bin"))
    assert _folder_mb(path) <= 25
    log = json.loads((path / "training_log.json").read_text())
    assert log["seed"] == 0 and log["args"]["unet_steps"] > 0


def test_committed_model_generates_offline(pipe):
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.unet.config.sample_size**2 >= 256  # self-attention over >= 256 latent tokens
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the training latents
    out = pipe(
        ["a red circle on a blue background", "a yellow cross on a black background"],
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
    )
    assert [im.size for im in out.images] == [(64, 64), (64, 64)]


def test_quality_command_prints_table(capsys, tmp_path):
    out_json = tmp_path / "q.json"
    args = ["--model", str(assets.reference_model_path()), "--steps", "3", "--seeds", "1", "--subset", "4"]
    assert cli.main(["quality", *args, "--output-json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "| shape | color | background | all three |" in out
    result = json.loads(out_json.read_text())
    assert result["n"] == 4 and len(result["rows"]) == 4
    assert 0 <= result["color"] <= 1


def test_prompt_accuracy_takes_a_loaded_pipeline(pipe):
    result = quality.prompt_accuracy(pipe, steps=2, seeds=2, subset=3, batch_size=4, progress=False)
    assert result["n"] == 6 and result["settings"]["prompts"] == 3
    assert set(result["by_value"]) == {"shape", "color", "background"}
    # the starting noise depends on (seed, prompt) only, not on the batching
    again = quality.prompt_accuracy(pipe, steps=2, seeds=2, subset=3, batch_size=2, progress=False)
    assert [r["predicted"] for r in again["rows"]] == [r["predicted"] for r in result["rows"]]
    # --first-seed shifts the seeds: seed 1 alone reproduces the seed-1 half of the run above
    shifted = quality.prompt_accuracy(pipe, steps=2, seeds=1, first_seed=1, subset=3, batch_size=4, progress=False)
    assert [r["seed"] for r in shifted["rows"]] == [1, 1, 1] and shifted["settings"]["first_seed"] == 1
    assert [r["predicted"] for r in shifted["rows"]] == [r["predicted"] for r in result["rows"] if r["seed"] == 1]
    assert "(seeds 1-1)" in quality.markdown_table(shifted)
    with pytest.raises(UserError, match="--first-seed must be >= 0"):
        quality.prompt_accuracy(pipe, steps=2, first_seed=-1, subset=3, progress=False)


def test_prompt_set_covers_every_combination():
    from ov_sd_trainer.assets import synthetic

    prompts = prompt_set()
    assert len(prompts) == len(synthetic.all_combinations())
    assert len(prompt_set(10)) == 10


def test_training_script_runs_end_to_end(tmp_path):
    from diffusers import StableDiffusionPipeline

    assert cli.main(
        [
            "make-reference", "--output", str(tmp_path), "--num-images", "48", "--eval-images", "8",
            "--vae-steps", "2", "--vae-batch-size", "4", "--unet-steps", "2", "--unet-batch-size", "4",
        ]
    ) == 0  # fmt: skip
    log = record = json.loads((tmp_path / "training_log.json").read_text())
    assert log["args"]["vae_steps"] == 2 and set(log["times_s"]) >= {"vae", "unet", "total"}
    assert record["scaling_factor"] > 0 and "vae_psnr_db" in log
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path), safety_checker=None)
    assert pipe.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])


@pytest.mark.slow
def test_committed_model_exports_to_openvino(tmp_path):
    from optimum.intel import OVStableDiffusionPipeline

    ov = OVStableDiffusionPipeline.from_pretrained(str(assets.reference_model_path()), export=True)
    ov.save_pretrained(tmp_path)
    result = quality.prompt_accuracy(str(tmp_path), steps=3, seeds=1, subset=4, batch_size=4, backend="openvino")
    assert result["n"] == 4 and result["settings"]["backend"] == "openvino"
