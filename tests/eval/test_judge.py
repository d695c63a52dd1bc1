"""The committed prompt-fidelity judge: held-out accuracy, API and scoring."""

from __future__ import annotations

import pytest

from ov_sd_trainer import assets, cli
from ov_sd_trainer.assets import synthetic
from ov_sd_trainer.eval import judge as judge_mod
from ov_sd_trainer.eval import judge_training

HELD_OUT_SEED = 31_337  # not the judge's training seed


@pytest.fixture(scope="module")
def judge():
    return judge_mod.load_judge()


def test_committed_judge_is_small_and_complete():
    folder = assets.judge_path()
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 5 * 2**20, f"judge folder is {size / 2**20:.1f} MB"


def test_held_out_accuracy_per_attribute(judge):
    assert judge.config["train"]["seed"] != HELD_OUT_SEED
    images, attrs = judge_training.draw_images(600, HELD_OUT_SEED)
    result = judge_mod.score(judge.predict(images), attrs)
    for attribute in ("shape", "color", "background"):
        assert result[attribute] >= 0.98, f"{attribute} accuracy {result[attribute]:.3f} on held-out images"


def test_predict_handles_other_sizes_and_degraded_images(judge):
    images = [
        synthetic.draw_shape("triangle", "orange", "black", resolution=128),
        synthetic.draw_shape("cross", "purple", "white", resolution=48, size=0.25, center=(0.4, 0.55)),
    ]
    preds = judge.predict(images)
    assert preds == [
        dict(shape="triangle", color="orange", background="black"),
        dict(shape="cross", color="purple", background="white"),
    ]
    assert judge.predict([]) == []


def test_score_counts_each_attribute_and_all_three():
    expected = [dict(shape="circle", color="red", background="blue")] * 4
    preds = [
        dict(shape="circle", color="red", background="blue"),
        dict(shape="square", color="red", background="blue"),
        dict(shape="circle", color="green", background="blue"),
        dict(shape="circle", color="red", background="blue"),
    ]
    result = judge_mod.score(preds, expected)
    assert result == dict(shape=0.75, color=0.75, background=1.0, all=0.5, n=4)
    with pytest.raises(ValueError):
        judge_mod.score(preds[:1], expected)


def test_eval_cli_prints_table(capsys):
    assert cli.main(["judge", "--num-images", "200", "--seed", str(HELD_OUT_SEED)]) == 0
    out = capsys.readouterr().out
    assert "| clean |" in out and "| augmented |" in out
