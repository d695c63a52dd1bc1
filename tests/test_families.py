"""Model families (docs/families.md): tiny offline SD 2.x and LCM pipelines (random weights) train (QAT, 3 steps),
export, load in their optimum-intel pipeline class and in OpenVINO GenAI, and generate; the family hooks (the LCM's
extra UNet input and guidance embedding) agree with diffusers and optimum-intel; unsupported pipelines and UNets are
one-line errors."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import openvino_genai
import pytest
import torch
from PIL import Image

from ov_sd_trainer import families
from ov_sd_trainer.assets.builders import TinySDConfig, build_components, build_tiny_pipeline
from ov_sd_trainer.compress.convert import convert_unet_to_openvino, unet_example_inputs, unet_input_names
from ov_sd_trainer.errors import UserError
from ov_sd_trainer.eval.generate import generate, load_genai_pipeline
from ov_sd_trainer.pipeline_folder import SCHEDULER_CONFIG, UNET_XML, load_ov_pipeline, load_pipeline

SIZE = 64
F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # both runtimes in f32: this CPU's default may be bf16
PROMPTS = ["a red circle on a blue background", "a green triangle on a white background"]
SEEDS = (3, 4)
# family -> (optimum-intel class, sampling steps, guidance scale, scheduler class) of the GenAI comparison
FAMILY = {
    "sd2": ("OVStableDiffusionPipeline", 5, 7.5, "DDIMScheduler"),
    "lcm": ("OVLatentConsistencyModelPipeline", 4, 8.5, "LCMScheduler"),
}
# GenAI vs optimum on the same IRs, scheduler and initial noise, both in f32: as in tests/export/test_genai.py, the
# latents agree to ~1e-7 step after step (LCM's per-step noise included: GenAI's TorchGenerator draws torch's
# sequence) and the images differ by GenAI's truncation to 8 bits where diffusers rounds (alone 51.1 dB; measured
# 51.2-51.3 dB on both families, no pixel off by more than one level). Bounds as there: median 48 dB, every image
# 35 dB. The controls fail the median bound: other initial noise (measured ~13 dB), and what each family adds:
# SD 2.x's v-prediction read as epsilon, an LCM's guidance embedding for another guidance scale.
MEDIAN_MIN_PSNR_DB, EVERY_MIN_PSNR_DB = 48.0, 35.0


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


# --------------------------------------------------------------------------------------------------------------------
# The tiny families and the family hooks
# --------------------------------------------------------------------------------------------------------------------


def test_tiny_families_have_their_traits():
    _, text_encoder, _, unet, scheduler = build_components(TinySDConfig(family="sd2"))
    assert unet.config.use_linear_projection and unet.config.upcast_attention
    assert tuple(unet.config.attention_head_dim) == (2, 4, 4)  # a head count per block, as SD 2.1's [5, 10, 20, 20]
    assert type(scheduler).__name__ == "DDIMScheduler" and scheduler.config.prediction_type == "v_prediction"
    assert text_encoder.config.hidden_act == "gelu"
    _, _, _, unet, scheduler = build_components(TinySDConfig(family="lcm"))
    assert unet.config.time_cond_proj_dim == 32 and type(scheduler).__name__ == "LCMScheduler"
    sd1 = build_components(TinySDConfig())[3]
    assert not sd1.config.use_linear_projection and sd1.config.time_cond_proj_dim is None
    with pytest.raises(UserError, match="unknown tiny model family 'sdxl'"):
        build_components(TinySDConfig(family="sdxl"))


@pytest.mark.parametrize("dim", [32, 33, 256])
def test_guidance_embedding_is_diffusers_own(dim):
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 1.0, 6.5, 14.9])
    want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    torch.testing.assert_close(families.guidance_embedding(w, dim), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["sd1", "sd2", "lcm"])
def test_unet_ir_inputs_are_optimums(family):
    """The exported UNet's inputs are the ones (and in the order) optimum-intel's exporter gives this UNet config."""
    from optimum.exporters.openvino.model_configs import UNetOpenVINOConfig

    unet = build_components(TinySDConfig(family=family))[3]
    want = list(UNetOpenVINOConfig(unet.config, task="semantic-segmentation").inputs)
    assert list(unet_input_names(unet.config)) == want
    assert ("timestep_cond" in want) == (family == "lcm")


def test_lcm_unet_converts_with_timestep_cond_and_matches_torch():
    import openvino as ov

    unet = build_components(TinySDConfig(family="lcm"))[3].eval()
    inputs = unet_example_inputs(unet, batch=2)
    ov_model = convert_unet_to_openvino(unet)
    port = next(p for p in ov_model.inputs if p.get_any_name() == "timestep_cond")
    assert str(port.get_partial_shape()) == "[?,32]" and port.get_element_type() == ov.Type.f32
    compiled = ov.Core().compile_model(ov_model, "CPU", F32)
    with torch.no_grad():
        want = unet(**{k: v for k, v in inputs.items()}, return_dict=False)[0].numpy()
        other = dict(inputs, timestep_cond=families.guidance_embedding(torch.tensor([1.0, 12.0]), 32))
        want_other = unet(**other, return_dict=False)[0].numpy()
    got = compiled({k: v.numpy() for k, v in inputs.items()})[0]
    got_other = compiled({k: v.numpy() for k, v in other.items()})[0]
    # FP32 conversion: float reassociation only (measured ~1e-7 relative); the input is wired: another embedding
    # moves the output by far more than that
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-4
    assert np.linalg.norm(got_other - got) / np.linalg.norm(got) > 100 * rel
    assert np.linalg.norm(got_other - want_other) / np.linalg.norm(want_other) < 1e-4


def _model_stub(task_weight=0.0, seed=0):
    return SimpleNamespace(task_weight=task_weight, generator=torch.Generator().manual_seed(seed), unet_extra="unset")


def test_lcm_training_batches_draw_the_guidance_embedding():
    pipe = SimpleNamespace(unet=build_components(TinySDConfig(family="lcm"))[3])
    model = _model_stub()
    families.configure_model(model, pipe)
    extra = model.unet_extra(6, torch.device("cpu"))
    assert list(extra) == ["timestep_cond"] and extra["timestep_cond"].shape == (6, 32)
    again = _model_stub()  # the same seeded generator draws the same guidance scales
    families.configure_model(again, pipe)
    torch.testing.assert_close(again.unet_extra(6, torch.device("cpu")), extra)
    u = torch.rand(6, generator=torch.Generator().manual_seed(0))  # what the generator drew: w in [5, 15]
    w = families.LCM_W_MIN + (families.LCM_W_MAX - families.LCM_W_MIN) * u
    torch.testing.assert_close(extra["timestep_cond"], families.guidance_embedding(w, 32))
    assert len({round(float(x), 4) for x in w}) == 6  # drawn per sample, not one fixed scale
    sd = _model_stub(task_weight=1.0)
    families.configure_model(sd, SimpleNamespace(unet=build_components(TinySDConfig(family="sd2"))[3]))
    assert sd.unet_extra is None
    with pytest.raises(UserError, match="no noise-prediction target for task_weight=1.0; set task_weight 0"):
        families.configure_model(_model_stub(task_weight=1.0), pipe)


def test_trajectories_record_the_lcm_pipelines_guidance_embedding():
    from ov_sd_trainer.assets.builders import assemble_pipeline
    from ov_sd_trainer.train.unet_inputs import GUIDANCE, collect_trajectory_inputs

    pipe = assemble_pipeline(*build_components(TinySDConfig(family="lcm")))
    calls = collect_trajectory_inputs(pipe, PROMPTS, num_samples=3, resolution=SIZE, seed=0, steps=2)
    want = families.guidance_embedding(torch.tensor([GUIDANCE - 1]), 32)  # the pipeline embeds w = scale - 1
    for call in calls:
        assert call["sample"].shape[0] == 1  # no CFG batch: an LCM's guidance is an input
        torch.testing.assert_close(call["timestep_cond"], want, rtol=0, atol=1e-6)
    with torch.no_grad():  # each recorded teacher output is the UNet's on the recorded inputs, embedding included
        c = calls[1]
        pred = pipe.unet(c["sample"], c["timestep"], c["encoder_hidden_states"], timestep_cond=c["timestep_cond"])
    torch.testing.assert_close(pred.sample, c["teacher_pred"])
    assert set(calls[0]) == {"sample", "timestep", "encoder_hidden_states",
                                                       "timestep_cond", "teacher_pred"}  # fmt: skip


@pytest.mark.slow  # a family's shared run (`family_run`, ~1 min each): CI
def test_sd2_training_target_is_the_velocity(family_run):
    training = family_run("sd2")["training"]
    model = training.model
    assert type(model.pipeline).__name__ == "StableDiffusionPipeline" and model.prediction_type == "v_prediction"
    latents, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 900])
    v = model.target(latents, noise, t)
    torch.testing.assert_close(v, model.noise_scheduler.get_velocity(latents, noise, t))
    assert not torch.allclose(v, noise, atol=0.1)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type='text_time'"),
        ({"in_channels": 9}, "takes 9 input channels"),
    ],
)
def test_unsupported_unet_configs_are_one_line_errors(change, message):
    config = dict(build_components(TinySDConfig())[3].config) | change
    with pytest.raises(UserError, match=message) as e:
        families.check_unet_config(config)
    assert "\n" not in str(e.value) and "docs/families.md" in str(e.value)


def test_unsupported_pipeline_class_is_a_one_line_error(tmp_path):
    folder = tmp_path / "upscaler"
    build_tiny_pipeline(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionUpscalePipeline"}))
    for load in (load_pipeline, lambda p: load_ov_pipeline(p, SIZE, SIZE)):
        with pytest.raises(UserError, match="'StableDiffusionUpscalePipeline' is not supported; supported: "
                           "StableDiffusionPipeline, LatentConsistencyModelPipeline") as e:  # fmt: skip
            load(str(folder))
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------------------------
# train -> export -> load -> generate, per family
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # a family's shared run (`family_run`, ~1 min each): CI
@pytest.mark.parametrize("family", ["sd2", "lcm"])
def test_family_trains_exports_loads_and_generates(family_run, family, tmp_path):
    import openvino as ov

    r = family_run(family)
    ov_class, steps, guidance, scheduler = FAMILY[family]
    info = json.loads((r["out"] / "final" / "training_info.json").read_text())
    assert info["global_step"] == 3
    assert np.isfinite(info["log_history"][-1]["train_loss"])
    (gap,) = info["teacher_gap"]
    assert np.isfinite(gap["teacher_mse"]) and gap["teacher_mse"] > 0  # a quantized student is not its teacher
    if family == "lcm":
        assert gap["task_loss"] is None  # an LCM has no noise-prediction target
    else:
        assert np.isfinite(gap["task_loss"]) and gap["task_loss"] > 0
    index = json.loads((r["ov"] / "model_index.json").read_text())
    base_index = json.loads((r["base"] / "model_index.json").read_text())
    assert index["_class_name"] == base_index["_class_name"]  # GenAI and optimum dispatch on it
    ir = ov.Core().read_model(r["ov"] / UNET_XML)
    unet_config = json.loads((r["base"] / "unet" / "config.json").read_text())
    assert [p.get_any_name() for p in ir.inputs] == list(unet_input_names(unet_config))
    results = json.loads((r["ov"] / "results.json").read_text())
    assert results["fake_quantize_ops"] > 50 and results["unet_size_ratio"] < 0.5
    assert "from optimum.intel import " + ov_class in (r["ov"] / "README.md").read_text()
    pipe = load_ov_pipeline(r["ov"], SIZE, SIZE)
    assert type(pipe).__name__ == ov_class and type(pipe.scheduler).__name__ == scheduler
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    image = pipe(PROMPTS[0], num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE).images[0]
    assert np.asarray(image).std() > 1  # an image, not a blank
    out = tmp_path / "genai.png"  # `ov-sd generate --runtime genai`
    info = generate(str(r["ov"]), PROMPTS[0], str(out), steps=steps, guidance_scale=guidance, runtime="genai")
    assert info["steps"] == steps and np.asarray(Image.open(out)).std() > 1


@pytest.mark.slow  # a family's shared run (`family_run`, ~1 min each): CI
@pytest.mark.parametrize("family", ["sd2", "lcm"])
def test_genai_matches_optimum(family_run, family, tmp_path):
    r = family_run(family)
    _, steps, guidance, _ = FAMILY[family]
    optimum = load_ov_pipeline(r["ov"], SIZE, SIZE, ov_config=F32)

    def optimum_image(prompt, seed):
        out = optimum(prompt, num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip
        return np.array(out.images[0])

    def genai_image(pipe, prompt, seed, scale=guidance):
        out = pipe.generate(prompt, num_inference_steps=steps, guidance_scale=scale, height=SIZE, width=SIZE,
                            generator=openvino_genai.TorchGenerator(seed))  # fmt: skip
        return out.data[0].copy()  # the tensor's memory is reused by the next generate

    genai = load_genai_pipeline(r["ov"], SIZE, SIZE, guidance, **F32)
    scores = [psnr(optimum_image(p, s), genai_image(genai, p, s)) for p in PROMPTS for s in SEEDS]
    assert np.median(scores) >= MEDIAN_MIN_PSNR_DB and min(scores) >= EVERY_MIN_PSNR_DB, scores
    want = optimum_image(PROMPTS[0], SEEDS[0])
    controls = {"other noise": genai_image(genai, PROMPTS[0], SEEDS[0] + 100)}
    if family == "lcm":  # the embedding reaches the UNet IR: another guidance scale, another image
        other = load_genai_pipeline(r["ov"], SIZE, SIZE, 2.0, **F32)
        controls["guidance 2.0"] = genai_image(other, PROMPTS[0], SEEDS[0], 2.0)
    else:  # GenAI reads v-prediction: the same folder with the scheduler told epsilon gives another image
        folder = tmp_path / "epsilon"
        shutil.copytree(r["ov"], folder)
        config = json.loads((folder / SCHEDULER_CONFIG).read_text())
        (folder / SCHEDULER_CONFIG).write_text(json.dumps(config | {"prediction_type": "epsilon"}))
        controls["read as epsilon"] = genai_image(load_genai_pipeline(folder, SIZE, SIZE, guidance, **F32),
                                                  PROMPTS[0], SEEDS[0])  # fmt: skip
    for name, image in controls.items():
        assert psnr(want, image) < MEDIAN_MIN_PSNR_DB - 5, name


@pytest.mark.slow  # a family's shared run (`family_run`, ~1 min each): CI
def test_sd2_export_runs_without_cfg_as_sd_turbo_does(family_run, tmp_path):
    """SD-Turbo samples at guidance 0: the statically reshaped UNet then takes the prompt batch itself."""
    r = family_run("sd2")
    pipe = load_ov_pipeline(r["ov"], SIZE, SIZE, guidance_scale=0.0)
    assert pipe.unet.model.inputs[0].get_partial_shape()[0].get_length() == 1
    image = pipe(PROMPTS[0], num_inference_steps=1, guidance_scale=0.0, height=SIZE, width=SIZE).images[0]
    assert np.asarray(image).std() > 1
    info = generate(str(r["ov"]), PROMPTS[0], str(tmp_path / "turbo.png"), steps=1, guidance_scale=0.0)
    assert info["steps"] == 1


@pytest.mark.slow  # a family's shared run (`family_run`, ~1 min each): CI
def test_lcm_negative_prompt_is_a_one_line_error(family_run, tmp_path):
    with pytest.raises(UserError, match="takes no negative prompt") as e:
        generate(str(family_run("lcm")["ov"]), PROMPTS[0], str(tmp_path / "x.png"), negative_prompt="blurry")
    assert "\n" not in str(e.value)


# `ov-sd eval` of each family's export against its FP32 teacher (4 prompts, 1 seed, 4-5 steps). Measured on these
# runs (deterministic): SD 2.x 23.9 dB (a random-weight UNet quantized after 3 steps of training), LCM 31.4 dB. The
# bounds sit 4 dB under, above what the eval guards against: teacher and variant started from other noise (~13 dB,
# as the GenAI controls above) and, for an LCM, its per-step sampling noise drawn apart for teacher and variant
# (before `generate_set` seeded it: 23.2 dB on this run).
EVAL_MIN_PSNR_DB = {"sd2": 20.0, "lcm": 27.0}


@pytest.mark.slow  # a family's shared run (`family_run`, ~1 min each): CI
@pytest.mark.parametrize("family", ["sd2", "lcm"])
def test_eval_against_the_fp32_teacher(family_run, family, tmp_path):
    from ov_sd_trainer import cli

    r = family_run(family)
    _, steps, guidance, scheduler = FAMILY[family]
    argv = ["eval", "--reference", str(r["base"]), "--model", f"qat={r['ov']}", "--output", str(tmp_path / "eval"),
            "--steps", str(steps), "--guidance-scale", str(guidance), "--seeds", "1", "--subset", "4",
            "--unet-samples", "4", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["settings"]["scheduler"] == scheduler
    qat = next(v for v in result["variants"] if v["name"] == "qat")
    assert qat["psnr"] >= EVAL_MIN_PSNR_DB[family], qat["psnr"]
    assert 0 < qat["noise_pred_mse"] < 1  # the UNet IR ran on its inputs (the LCM's timestep_cond included)
