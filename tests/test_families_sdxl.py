"""SDXL (docs/families.md): a tiny offline SDXL-architecture pipeline (random weights); its UNet's added conditioning
(`text_embeds`, `time_ids`) is wired as optimum-intel's SDXL UNet IR has it, recorded along teacher trajectories,
calibrated on, exported, and the export loads and generates in `OVStableDiffusionXLPipeline` and in OpenVINO GenAI."""

import json

import numpy as np
import openvino_genai
import pytest
import torch
from PIL import Image

from ov_sd_trainer import families
from ov_sd_trainer.assets.builders import (
    SDXL_UNET_CONFIG,
    TinySDConfig,
    assemble_sdxl_pipeline,
    build_sdxl_components,
    build_tiny_pipeline,
)
from ov_sd_trainer.compress.convert import convert_unet_to_openvino, unet_example_inputs, unet_input_names
from ov_sd_trainer.errors import UserError

SIZE = 64
F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # both runtimes in f32: this CPU's default may be bf16
PROMPTS = ["a red circle on a blue background", "a green triangle on a white background"]


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


@pytest.fixture(scope="module")
def parts():
    return build_sdxl_components(TinySDConfig(family="sdxl"))


def test_tiny_sdxl_has_sdxls_traits(parts):
    unet = parts["unet"]
    assert unet.config.addition_embed_type == "text_time" and unet.config.use_linear_projection
    assert unet.config.down_block_types[0] == "DownBlock2D"  # no attention at the highest resolution
    assert type(parts["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    assert unet.config.cross_attention_dim == parts["text_encoder"].config.hidden_size + (
        parts["text_encoder_2"].config.hidden_size
    )
    assert type(parts["scheduler"]).__name__ == "EulerDiscreteScheduler"
    assert families.extra_input_dims(unet.config) == {"text_embeds": 32, "time_ids": 6}
    assert families.extra_input_dims(SDXL_UNET_CONFIG) == {"text_embeds": 1280, "time_ids": 6}  # SDXL base's
    families.check_unet_config(unet.config)  # supported
    assert families.pipeline_class_name({"_class_name": "StableDiffusionXLPipeline"}) == "StableDiffusionXLPipeline"


def test_sdxl_architecture_for_the_bench_is_sdxl_bases():
    """`SDXL_UNET_CONFIG` (`build_sdxl_unet`, the bench's random-weight SDXL) is SDXL base's UNet: 2,567,463,684
    parameters, built on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert unet.config.cross_attention_dim == 2048 and unet.config.projection_class_embeddings_input_dim == 2816


def test_sdxl_unet_ir_inputs_are_optimums(parts):
    from optimum.exporters.openvino.model_configs import UNetOpenVINOConfig

    config = parts["unet"].config
    want = list(UNetOpenVINOConfig(config, task="semantic-segmentation").inputs)
    assert list(unet_input_names(config)) == want == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]  # fmt: skip


def test_sdxl_unet_kwargs_and_time_ids():
    extra = {"text_embeds": torch.zeros(2, 4), "time_ids": torch.ones(2, 6)}
    kwargs = families.unet_kwargs(extra)
    assert list(kwargs) == ["added_cond_kwargs"] and kwargs["added_cond_kwargs"] is not extra
    assert families.unet_kwargs({}) == {}
    ids = families.sdxl_time_ids((1024, 768), torch.tensor([[0, 0], [16, 8]]), (1024, 1024))
    assert ids.tolist() == [[1024, 768, 0, 0, 1024, 1024], [1024, 768, 16, 8, 1024, 1024]]
    assert families.sdxl_time_ids((64, 64), (0, 0), (64, 64), batch=3).shape == (3, 6)


def test_sdxl_unet_converts_and_matches_torch(parts):
    import openvino as ov

    unet = parts["unet"].eval()
    inputs = unet_example_inputs(unet, batch=2)
    ov_model = convert_unet_to_openvino(unet)
    shapes = {p.get_any_name(): str(p.get_partial_shape()) for p in ov_model.inputs}
    assert shapes["text_embeds"] == "[?,32]" and shapes["time_ids"] == "[?,6]"
    compiled = ov.Core().compile_model(ov_model, "CPU", F32)
    base = {k: inputs[k] for k in ("sample", "timestep", "encoder_hidden_states")}
    extra = {k: inputs[k] for k in ("text_embeds", "time_ids")}
    other = dict(extra, time_ids=families.sdxl_time_ids((64, 64), (0, 0), (64, 64), batch=2))
    with torch.no_grad():
        want = unet(**base, **families.unet_kwargs(extra), return_dict=False)[0].numpy()
    got = compiled({k: v.numpy() for k, v in inputs.items()})[0]
    got_other = compiled({k: v.numpy() for k, v in (base | other).items()})[0]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-4
    assert np.linalg.norm(got_other - got) / np.linalg.norm(got) > 100 * rel  # time_ids is wired


def test_trajectories_record_the_sdxl_pipelines_added_conditioning(parts):
    from ov_sd_trainer.train.unet_inputs import collect_trajectory_inputs

    pipe = assemble_sdxl_pipeline(**parts)
    calls = collect_trajectory_inputs(pipe, PROMPTS, num_samples=3, resolution=SIZE, seed=0, steps=2)
    for call in calls:
        assert call["sample"].shape[0] == 2 and call["text_embeds"].shape == (2, 32)  # the CFG pair
        assert call["time_ids"].tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2
        assert call["encoder_hidden_states"].shape[-1] == 64
    assert not calls[0]["text_embeds"][0].any()  # force_zeros_for_empty_prompt: the unconditional half is zeros
    with torch.no_grad():  # each recorded teacher output is the UNet's on the recorded inputs
        c = calls[1]
        extra = families.unet_kwargs({k: c[k] for k in ("text_embeds", "time_ids")})
        pred = pipe.unet(c["sample"], c["timestep"], c["encoder_hidden_states"], **extra)
    torch.testing.assert_close(pred.sample, c["teacher_pred"])
    assert set(calls[0]) == {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "teacher_pred"}


def test_sdxl_encode_prompts_is_the_pipelines(parts):
    pipe = assemble_sdxl_pipeline(**parts)
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids_2 = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states, pooled = families.sdxl_encode_prompts(pipe.text_encoder, pipe.text_encoder_2, ids.input_ids,
                                                      ids_2.input_ids)  # fmt: skip
        want, _, want_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(states, want)
    torch.testing.assert_close(pooled, want_pooled)


def test_sdxl_other_added_conditioning_is_refused(parts):
    config = dict(parts["unet"].config) | {"addition_embed_type": "text_image"}
    with pytest.raises(UserError, match="addition_embed_type='text_image'") as e:
        families.check_unet_config(config)
    assert "\n" not in str(e.value)


def test_sdxl_trains_on_images_with_both_encoders_and_time_ids(tmp_path):
    """Training on noisy images: rows carry the second tokenizer's ids, the original size and the crop offsets;
    the batch's UNet inputs are both encoders' states, text_encoder_2's pooled embeddings and SDXL's time ids (as
    train_text_to_image_sdxl.py builds them); calibration on training images carries them too; the loss trains."""
    from ov_sd_trainer.train.config import parse_config
    from ov_sd_trainer.train.data import collate
    from ov_sd_trainer.train.run import build_trainer

    build_tiny_pipeline(tmp_path / "base", TinySDConfig(family="sdxl"))
    argv = [
        "--pretrained_model_name_or_path", str(tmp_path / "base"), "--dataset_name", "synthetic:6",
        "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--per_device_train_batch_size", "2",
        "--num_calibration_samples", "2", "--calibration_source", "training", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "true", "--export", "false", "--random_flip", "false",
        "--task_weight", "1",
    ]  # fmt: skip
    cfg, _ = parse_config(argv)
    training = build_trainer(cfg)
    model, ds = training.model, training.trainer.train_dataset
    batch = collate([ds[0], ds[1]])
    assert batch["input_ids_2"].shape == (2, 77)
    assert batch["original_size"].tolist() == [[64, 64]] * 2 and batch["crop_top_left"].tolist() == [[0, 0]] * 2
    latents, states, pooled = model.encode(batch["pixel_values"], batch["input_ids"], batch["input_ids_2"])
    want_states, want_pooled = families.sdxl_encode_prompts(
        model.text_encoder, model.text_encoder_2, batch["input_ids"], batch["input_ids_2"]
    )
    assert torch.equal(states, want_states) and torch.equal(pooled, want_pooled)
    extra = model.image_extra(latents, pooled, batch["original_size"], batch["crop_top_left"], (64, 64))
    assert extra["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2
    model.set_noise_seed(0, 0, 0)
    out = model(**batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["task_loss"] > 0 and out["distillation_loss"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())


def test_token_merging_on_sdxls_blocks():
    """SDXL has no attention at the highest resolution: ToMe's default level (max_downsample 1) is a one-line error;
    at max_downsample 2 (SDXL's first attention level) the patched UNet converts and matches PyTorch."""
    import openvino as ov

    from ov_sd_trainer.compress.tome import apply_tome, is_patched

    unet = build_sdxl_components(TinySDConfig(family="sdxl"))["unet"].eval()
    with pytest.raises(UserError, match=r"no transformer blocks at that resolution .*attention levels: \[2, 4\]"):
        apply_tome(unet, ratio=0.5, max_downsample=1)
    apply_tome(unet, ratio=0.5, max_downsample=2)
    assert is_patched(unet)
    inputs = unet_example_inputs(unet, batch=2)
    compiled = ov.Core().compile_model(convert_unet_to_openvino(unet), "CPU", F32)
    base = {k: inputs[k] for k in ("sample", "timestep", "encoder_hidden_states")}
    with torch.no_grad():
        want = unet(**base, **families.unet_kwargs({k: inputs[k] for k in ("text_embeds", "time_ids")})).sample
    got = compiled({k: v.numpy() for k, v in inputs.items()})[0]
    assert np.linalg.norm(got - want.numpy()) / np.linalg.norm(want.numpy()) < 1e-4


def test_make_tiny_sdxl(tmp_path):
    from ov_sd_trainer import cli
    from ov_sd_trainer.pipeline_folder import check_pipeline_source, load_pipeline

    assert cli.main(["make-tiny", "--family", "sdxl", "--output", str(tmp_path / "sdxl")]) == 0
    check_pipeline_source(str(tmp_path / "sdxl"))
    pipe = load_pipeline(str(tmp_path / "sdxl"))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and pipe.text_encoder_2 is not None


# --------------------------------------------------------------------------------------------------------------------
# the recipe: calibrate -> train -> export -> load -> generate
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """The shipped `sdxl-pokemon-int8` recipe on a tiny SDXL (only the model, data, size and length overridden), 3
    steps with export: calibration on the teacher's own trajectories (4 calls), NNCF, training, then
    `export_openvino_pipeline`. Checked by the recipe test below, and its export by the optimum and GenAI tests (one
    trained, exported SDXL for all three)."""
    from ov_sd_trainer.run_folder import OPENVINO_DIR
    from ov_sd_trainer.train.config import parse_config
    from ov_sd_trainer.train.run import run

    root = tmp_path_factory.mktemp("sdxl")
    build_tiny_pipeline(root / "base", TinySDConfig(family="sdxl"))
    argv = [
        "--recipe", "sdxl-pokemon-int8", "--pretrained_model_name_or_path", str(root / "base"),
        "--dataset_name", "synthetic:12", "--resolution", str(SIZE), "--output_dir", str(root / "run"),
        "--max_steps", "3", "--num_calibration_samples", "4", "--calibration_steps", "4", "--eval_steps", "3",
        "--teacher_gap_samples", "4", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true", "--dataloader_num_workers", "0",
        "--disable_tqdm", "true", "--learning_rate", "1e-4",
    ]  # fmt: skip
    cfg, recipe = parse_config(argv)
    out = run(cfg, recipe)
    return {"root": root, "base": root / "base", "cfg": cfg, "out": out, "ov": out / OPENVINO_DIR}


@pytest.mark.slow  # the recipe_run fixture: ~2 min on 2 cores (calibration, 3 steps, NNCF, optimum's export)
def test_sdxl_export_loads_in_optimum_and_generates(recipe_run):
    import openvino as ov

    from ov_sd_trainer.pipeline_folder import UNET_XML, has_openvino_tokenizer, load_ov_pipeline

    folder = recipe_run["ov"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    ir = ov.Core().read_model(folder / UNET_XML)
    assert [p.get_any_name() for p in ir.inputs] == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]  # fmt: skip
    results = json.loads((folder / "results.json").read_text())
    assert results["fake_quantize_ops"] > 50 and results["unet_size_ratio"] < 0.5
    assert has_openvino_tokenizer(folder) and (folder / "tokenizer_2" / "openvino_tokenizer.xml").is_file()
    assert "from optimum.intel import OVStableDiffusionXLPipeline" in (folder / "README.md").read_text()
    pipe = load_ov_pipeline(folder, SIZE, SIZE)
    assert type(pipe).__name__ == "OVStableDiffusionXLPipeline"
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    image = pipe(PROMPTS[0], num_inference_steps=3, height=SIZE, width=SIZE).images[0]
    assert np.asarray(image).std() > 1  # an image, not a blank


@pytest.mark.slow
def test_sdxl_export_runs_in_genai_as_in_optimum(recipe_run, tmp_path):
    from ov_sd_trainer.eval.generate import generate, load_genai_pipeline
    from ov_sd_trainer.pipeline_folder import load_ov_pipeline

    folder = recipe_run["ov"]
    out = tmp_path / "genai.png"  # `ov-sd generate --runtime genai`
    info = generate(str(folder), PROMPTS[0], str(out), steps=3, guidance_scale=5.0, runtime="genai")
    assert info["steps"] == 3 and np.asarray(Image.open(out)).std() > 1
    optimum = load_ov_pipeline(folder, SIZE, SIZE, ov_config=F32)
    genai = load_genai_pipeline(folder, SIZE, SIZE, 5.0, **F32)
    scores = []
    for seed in (3, 4):
        want = optimum(PROMPTS[1], num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE,
                       generator=torch.Generator().manual_seed(seed)).images[0]  # fmt: skip
        got = genai.generate(PROMPTS[1], num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE,
                             generator=openvino_genai.TorchGenerator(seed)).data[0].copy()  # fmt: skip
        scores.append(psnr(np.array(want), got))
    # as tests/test_families.py: GenAI's 8-bit truncation alone (measured 51.1-51.3 dB on SDXL); other noise ~12 dB
    assert np.median(scores) >= 48.0 and min(scores) >= 35.0, scores
    other = genai.generate(PROMPTS[1], num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE,
                           generator=openvino_genai.TorchGenerator(103)).data[0].copy()  # fmt: skip
    assert psnr(np.array(want), other) < 43.0


@pytest.mark.slow  # the recipe_run fixture, then ~20 s of eval on 2 cores
def test_sdxl_recipe_trains_on_images_exports_and_evaluates(recipe_run, tmp_path):
    """The shipped `sdxl-pokemon-int8` recipe's own path on a tiny SDXL (`recipe_run`): calibration on the teacher's
    trajectories, pure distillation on training images (both encoders, pooled embeddings, time ids), a bfloat16
    teacher, 8-bit Adam, gradient checkpointing, the held-out teacher gap on images from step 0; training moves the
    gap; then `ov-sd eval` against the FP32 teacher (its UNet noise MSE feeds text_embeds and time_ids to the IR)."""
    from ov_sd_trainer import cli

    cfg, out = recipe_run["cfg"], recipe_run["out"]
    assert (cfg.task_weight, cfg.calibration_source, cfg.teacher_dtype) == (0.0, "trajectories", "bfloat16")
    info = json.loads((out / "final" / "training_info.json").read_text())
    assert info["global_step"] == 3 and np.isfinite(info["log_history"][-1]["train_loss"])
    logs = [h for h in info["log_history"] if "loss" in h]
    assert len(logs) == 3 and all(h["loss"] == pytest.approx(h["distillation_loss"], abs=1e-4) for h in logs)
    assert all(h["distillation_loss"] > 0 and np.isfinite(h["task_loss"]) for h in logs)  # on images: task logged
    start, end = info["teacher_gap"]  # eval_on_start (the calibrated student) and step 3
    assert (start["step"], end["step"]) == (0, 3)
    assert all(
        np.isfinite(g["teacher_mse"]) and g["teacher_mse"] > 0 and np.isfinite(g["task_loss"]) for g in (start, end)
    )
    assert end["teacher_mse"] != start["teacher_mse"]  # training moved the student
    ov_dir = recipe_run["ov"]
    assert json.loads((ov_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    argv = ["eval", "--reference", str(recipe_run["base"]), "--model", f"qat={ov_dir}", "--output",
            str(tmp_path / "eval"), "--steps", "4", "--guidance-scale", "5", "--seeds", "1", "--subset", "4",
            "--unet-samples", "4", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["settings"]["scheduler"] == "EulerDiscreteScheduler"
    qat = next(v for v in result["variants"] if v["name"] == "qat")
    assert qat["psnr"] >= 25.0 and 0 < qat["noise_pred_mse"] < 1, qat  # measured 35.4 dB (a 3-step tiny run)
