"""`ov-sd eval` for few-step variants: their own steps, guidance and scheduler, scored against the teacher's ODE
endpoints (DDIM without clipping, same initial latents, same guidance) and by a Fréchet distance in the judge's
features with its teacher-vs-teacher floor."""

import json

import numpy as np
import pytest
import torch

from ov_sd_trainer import cli
from ov_sd_trainer.errors import UserError
from ov_sd_trainer.eval import fewstep, report
from ov_sd_trainer.eval.judge import load_judge
from ov_sd_trainer.lcm import ode_scheduler

# not the global 7.5: the ODE endpoints must follow each variant's own guidance; the LCM folder's default (8.5), so one
# set of teacher ODE runs serves both variants
NAIVE_GUIDANCE = 8.5


pytestmark = pytest.mark.slow  # the LCM export and few-step evals (~1.5 min): CI


@pytest.fixture(scope="module")
def ddim_teacher(tiny_pipeline, tmp_path_factory):
    """`tiny_pipeline` sampling with the teacher's ODE solver: a variant of its own export run with the teacher's
    scheduler at 25 steps is then the teacher's 25-step ODE endpoint, up to OpenVINO's f32 numerics."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path_factory.mktemp("ddim-teacher") / "pipe"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    pipe.scheduler = ode_scheduler(pipe.scheduler.config)
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def result(ddim_teacher, fp32_export, lcm_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("fewstep-eval") / "out"
    # naive: the teacher's export with the teacher's ODE solver named (`--scheduler naive=ddim`); euler: the same
    # export at 4 Euler steps (the naive few-step baseline)
    argv = ["eval", "--reference", str(ddim_teacher), "--model", f"naive={fp32_export}", "--model",
            f"lcm={lcm_export}", "--model", f"euler={fp32_export}", "--steps", "3", "--steps", "naive=25",
            "--guidance-scale", f"naive={NAIVE_GUIDANCE}", "--scheduler", "naive=ddim", "--steps", "euler=4",
            "--guidance-scale", f"euler={NAIVE_GUIDANCE}", "--scheduler", "euler=euler",
            "--seeds", "1", "--subset", "3", "--batch-size", "3", "--unet-samples", "2", "--grid-samples", "2",
            "--threads", "1", "--no-progress", "--compare", "lcm,naive", "--output", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    return json.loads((out / report.RESULT_FILE).read_text()) | {"out": out}


def test_each_variant_samples_with_its_own_settings(result):
    rows = {v["name"]: v for v in result["variants"]}
    naive, lcm = rows["naive"]["few_step"], rows["lcm"]["few_step"]
    assert (naive["steps"], naive["guidance_scale"], naive["scheduler"]) == (25, NAIVE_GUIDANCE, "DDIMScheduler")
    # an LCM folder without a training record: its family's 4 steps, diffusers' LCM guidance, its own LCMScheduler
    assert (lcm["steps"], lcm["guidance_scale"], lcm["scheduler"]) == (4, 8.5, "LCMScheduler")
    assert "few_step" not in rows["fp32"] and result["settings"]["steps"] == 3
    euler = rows["euler"]["few_step"]
    assert (euler["steps"], euler["scheduler"]) == (4, "EulerDiscreteScheduler")
    assert euler["guidance_scale"] == NAIVE_GUIDANCE


def test_ode_endpoints_are_the_teachers_from_the_same_latents(result):
    naive = {v["name"]: v for v in result["variants"]}["naive"]["few_step"]
    # the same sampler, latents and guidance as the 25-step endpoint: equal up to OpenVINO's f32 numerics; the
    # 50-step endpoint is another image (the control: a wrong guidance or other latents would fail the first)
    assert naive["ode"]["ddim25"]["psnr"] > 40  # so `--scheduler naive=ddim` is the teacher's ODE solver
    assert naive["ode"]["ddim50"]["psnr"] < naive["ode"]["ddim25"]["psnr"] - 5
    assert naive["frechet_floor"] > 0 and np.isfinite(naive["frechet_distance"])
    metrics = {r["metric"] for r in result["comparisons"]["lcm vs naive"]}
    assert {"psnr_vs_teacher_ddim25", "psnr_vs_teacher_ddim50", "accuracy_all"} <= metrics
    assert "noise_pred_mse" not in metrics  # an LCM UNet predicts no teacher noise
    md = (result["out"] / report.TABLE_FILE).read_text()
    assert "Few-step variants against the teacher's ODE endpoints" in md and "| lcm | 4 | 8.5 | LCMScheduler |" in md


def test_frechet_distance_in_judge_features():
    from PIL import Image

    judge = load_judge()
    assert fewstep.JudgeFeatures(judge)(torch.rand(2, 3, 64, 64)).shape == (
        2,
        fewstep.JudgeFeatures(judge).num_features,
    )
    rng = np.random.default_rng(0)
    a = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(8)]
    b = [Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)) for i in range(6)]
    assert fewstep.frechet_distance(judge, a, a) == pytest.approx(0, abs=1e-3)
    assert fewstep.frechet_distance(judge, a, b) > 1e-2


def test_per_variant_flags_are_checked():
    assert fewstep.parse_per_variant(["25", "a=4"], "--steps", int, ["a"]) == (25, {"a": 4})
    with pytest.raises(UserError, match="'b' is not a --model name"):
        fewstep.parse_per_variant(["b=4"], "--steps", int, ["a"])
    with pytest.raises(UserError, match="give a number or NAME=number"):
        fewstep.parse_per_variant(["a=four"], "--steps", int, ["a"])
    assert fewstep.parse_schedulers(["a=euler"], ["a"]) == {"a": "euler"}
    with pytest.raises(UserError, match="KIND one of ddim, euler, dpm"):
        fewstep.parse_schedulers(["a=pndm"], ["a"])
    with pytest.raises(UserError, match="'b' is not a --model name"):
        fewstep.parse_schedulers(["b=ddim"], ["a"])
    for kind in fewstep.SCHEDULERS:  # on the teacher's noise schedule, never clipping
        sampler = fewstep.few_step_scheduler(kind, ode_scheduler({"beta_schedule": "scaled_linear"}).config)
        assert sampler.config.beta_schedule == "scaled_linear" and not sampler.config.get("clip_sample")


def test_an_lcm_folder_keeps_its_scheduler(lcm_export):
    with pytest.raises(UserError, match="samples with its own LCMScheduler"):
        fewstep.variant_sampling("lcm", lcm_export, {}, {}, 25, 7.5, {"lcm": "euler"})
