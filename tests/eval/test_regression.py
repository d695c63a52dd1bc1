"""The regression run's checks (the run itself is `make regression`, called from .ci/run)."""

import json

from ov_sd_trainer import cli
from ov_sd_trainer.eval import regression
from ov_sd_trainer.train.config import shipped_recipes

THRESHOLDS = json.loads(regression.DEFAULT_THRESHOLDS.read_text())


def _eval(qat_shape=0.9, qat_psnr=35.0, qat_mse=0.001):
    """An eval.json where QAT beats every peer by more than any margin in the thresholds file (unless changed)."""
    acc = dict(shape=0.9, color=0.85, background=0.9)
    peer = dict(accuracy=acc, psnr=20.0, ssim=0.8, latent_mse=0.05, noise_pred_mse=0.01)
    return {
        "variants": [
            dict(name="fp32", accuracy=acc),
            dict(name="qat", accuracy=dict(acc, shape=qat_shape), psnr=qat_psnr, ssim=0.99, latent_mse=qat_mse,
                 noise_pred_mse=0.001),
        ] + [dict(peer, name=name) for name in THRESHOLDS["peers"]]
    }  # fmt: skip


def _run(eval_result, ratio=0.258):
    report = dict(checks=[])
    regression.run_checks(report, THRESHOLDS, eval_result, {"unet_size_ratio": ratio})
    return {c["check"]: c["passed"] for c in report["checks"]}


def test_thresholds_file_is_complete():
    for key in (
        "schedule",
        "accuracy_attributes",
        "max_accuracy_drop",
        "fidelity_metrics",
        "max_unet_size_ratio",
        "peers",
    ):
        assert key in THRESHOLDS
    assert THRESHOLDS["schedule"]["recipe"] in shipped_recipes()
    assert THRESHOLDS["measured"], "the thresholds file must record the values measured when it was set"


def test_checks_pass_on_a_good_run():
    checks = _run(_eval())
    assert checks and all(checks.values())


def test_each_check_can_fail():
    drop = THRESHOLDS["max_accuracy_drop"]
    assert not all(_run(_eval(qat_shape=0.9 - drop - 0.01)).values())  # accuracy below FP32 - margin
    assert set(THRESHOLDS["peers"]) == {"ptq", "ptq-hybrid", "qat-start"}
    for peer, margins in THRESHOLDS["peers"].items():  # every peer's check can fail on its own
        for metric, margin in margins.items():
            result = _eval()
            row = next(v for v in result["variants"] if v["name"] == peer)
            qat = next(v for v in result["variants"] if v["name"] == "qat")
            higher = THRESHOLDS["fidelity_metrics"][metric] == "higher"
            short = margin - 1e-4  # just short of the margin: QAT - peer (higher is better) or peer - QAT (MSE)
            row[metric] = qat[metric] - short if higher else qat[metric] + short
            checks = _run(result)
            failed = [c for c, ok in checks.items() if not ok]
            assert failed == [f"qat {metric} better than {peer} by >= {margin:g}"], (peer, metric, failed)
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
