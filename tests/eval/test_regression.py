"""The regression run's checks (the run itself is `make regression`, called from .ci/run)."""

import json

from ov_sd_trainer import cli
from ov_sd_trainer.eval import regression
from ov_sd_trainer.train.config import shipped_recipes

THRESHOLDS = json.loads(regression.DEFAULT_THRESHOLDS.read_text())


def _eval(qat_shape=0.9, qat_psnr=25.0, qat_mse=0.01):
    acc = dict(shape=0.9, color=0.85, background=0.9)
    return {
        "variants": [
            dict(name="fp32", accuracy=acc),
            dict(name="qat", accuracy=dict(acc, shape=qat_shape), psnr=qat_psnr, ssim=0.9, latent_mse=qat_mse,
                 noise_pred_mse=0.004),
            dict(name="ptq", accuracy=acc, psnr=20.0, ssim=0.8, latent_mse=0.05, noise_pred_mse=0.01),
        ]
    }  # fmt: skip


def _run(eval_result, ratio=0.258):
    report = dict(checks=[])
    regression.run_checks(report, THRESHOLDS, eval_result, {"unet_size_ratio": ratio})
    return {c["check"]: c["passed"] for c in report["checks"]}


def test_thresholds_file_is_complete():
    for key in ("schedule", "accuracy_attributes", "max_accuracy_drop", "fidelity_metrics", "max_unet_size_ratio"):
        assert key in THRESHOLDS
    assert THRESHOLDS["schedule"]["recipe"] in shipped_recipes()
    assert THRESHOLDS["measured"], "the thresholds file must record the values measured when it was set"


def test_checks_pass_on_a_good_run():
    checks = _run(_eval())
    assert checks and all(checks.values())


def test_each_check_can_fail():
    drop = THRESHOLDS["max_accuracy_drop"]
    assert not all(_run(_eval(qat_shape=0.9 - drop - 0.01)).values())  # accuracy below FP32 - margin
    assert not all(_run(_eval(qat_psnr=19.0)).values())  # PSNR below PTQ's
    assert not all(_run(_eval(qat_mse=0.06)).values())  # latent MSE above PTQ's
    assert not all(_run(_eval(), ratio=0.3).values())  # int8 UNet too large


def test_unreadable_thresholds_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    assert cli.main(["regression", "--thresholds", str(bad), "--output", str(tmp_path / "out")]) == 2
    assert "cannot read thresholds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuses_to_delete_a_foreign_folder(tmp_path, capsys):
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert cli.main(["regression", "--output", str(other)]) == 2
    assert (other / "keep.txt").exists()
    assert "not a regression folder" in capsys.readouterr().err
