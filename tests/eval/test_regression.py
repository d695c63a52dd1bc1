"""The regression run's checks (the run itself is `make regression`, called from .ci/run)."""

import json
import os

import pytest

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
        "few_step",
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


def _info(*psnr):
    return {"log_history": [{"step": 10 * i, "eval_few_step_psnr": v} for i, v in enumerate(psnr)] + [{"loss": 1}]}


def test_few_step_checks_pass_and_each_can_fail():
    """The few-step student's checks: the float run's gain, the int8 student against the float one and a floor."""
    fs = THRESHOLDS["few_step"]
    assert fs["recipe"] in shipped_recipes() and fs["measured"], "the few-step limits record what set them"
    start = fs["min_int8_psnr_db"]
    end = start + fs["min_float_gain_db"] + 0.5
    good = end - fs["max_int8_drop_db"] + 0.1
    assert good >= fs["min_int8_psnr_db"]

    def checks(float_info, int8_info):
        report = dict(checks=[])
        regression.run_few_step_checks(report, fs, float_info, int8_info)
        return [c["check"] for c in report["checks"] if not c["passed"]]

    assert checks(_info(start, 99.0, end), _info(1.0, good)) == []  # first and last evaluation are compared
    assert checks(_info(start, start + fs["min_float_gain_db"] - 0.01), _info(1.0, 99.0)) == [
        f"float consistency 4-step psnr gain >= {fs['min_float_gain_db']:g} dB"
    ]
    assert checks(_info(start, end), _info(1.0, end - fs["max_int8_drop_db"] - 0.01))[0].startswith("int8 consistency")
    low = fs["min_int8_psnr_db"] - 0.01
    assert checks(_info(low - 2, low), _info(1.0, low)) == [
        f"int8 consistency 4-step psnr >= {fs['min_int8_psnr_db']:g} dB"
    ]
    with pytest.raises(ValueError, match="evaluated 1 time"):
        regression.few_step_psnr(_info(12.0))


def test_stages_run_two_at_a_time_after_what_they_read(tmp_path):
    """`_run_stages`: at most `jobs` at once, a stage only after the ones it reads, nothing new after a failure."""
    import sys

    def stage(name, seconds=0.0, rc=0):
        code = f"import time; time.sleep({seconds}); open({name!r}, 'w'); raise SystemExit({rc})"
        return [sys.executable, "-c", code]

    (tmp_path / "logs").mkdir()
    report = dict(stages=[])
    stages = [("a", stage("a", 0.6), ()), ("b", stage("b"), ()), ("c", stage("c"), ()), ("d", stage("d"), ("a",))]
    assert regression._run_stages(stages, 2, tmp_path / "logs", dict(os.environ), report, tmp_path)
    order = [s["name"] for s in report["stages"]]  # in order of finishing
    assert order.index("d") > order.index("a") and set(order) == {"a", "b", "c", "d"}
    report = dict(stages=[])
    failing = [("a", stage("a2", rc=3), ()), ("b", stage("b2", 0.3), ()), ("c", stage("c2"), ("a",))]
    assert not regression._run_stages(failing, 2, tmp_path / "logs", dict(os.environ), report, tmp_path)
    assert (tmp_path / "b2").exists() and not (tmp_path / "c2").exists()  # b finishes; c never starts


def test_jobs_below_one_is_a_clean_error(tmp_path, capsys):
    assert cli.main(["regression", "--jobs", "0", "--output", str(tmp_path / "out")]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err
