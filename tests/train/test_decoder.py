"""The distilled tiny VAE decoder: training beats an untrained decoder, resume is exact, the export is the folder's
`vae_decoder` in optimum's and GenAI's pipelines (fed the right latent scale), switching works, recipes load, bad
input is a one-line error."""

import json
import shutil

import numpy as np
import openvino_genai
import pytest
import torch
from PIL import Image

from ov_sd_trainer import tiny_decoder
from ov_sd_trainer.errors import UserError
from ov_sd_trainer.export import tiny_decoder as export
from ov_sd_trainer.pipeline_folder import load_ov_pipeline
from ov_sd_trainer.train import decoder

SIZE, STEPS, GUIDANCE, SEED = 64, 3, 7.5, 3
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
PROMPT = "a red circle on a blue background"
# Trained 40 steps (width 16, lr 1e-3, global context: the default) on the tiny test pipeline's random VAE, the
# held-out PSNR against it rose from 4.9 dB to 16.0 dB (15.8 dB without global context; measured); with lr 0 (the
# control: nothing learnt) it stays at 4.9 dB and the test fails.
MIN_GAIN_DB = 4.0
# The same tiny IR fed by optimum and by GenAI (same UNet, scheduler, initial latents, f32): GenAI truncates to 8 bits
# where diffusers rounds (~51 dB, tests/export/test_genai.py); a decoder fed the wrong latent scale is far below.
MIN_RUNTIME_AGREEMENT_DB = 35.0


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def train_args(base, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(base), "--dataset_name", "synthetic:48", "--output_dir", str(out),
        "--held_out_samples", "8", "--per_device_train_batch_size", "8", "--decoder_width", "16", "--use_cpu", "true", "--disable_tqdm",
        "true", "--logging_steps", "10", "--held_out_endpoints", "0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-decoder") / "run"
    cfg, recipe = decoder.parse_decoder_config(train_args(tiny_pipeline, out, "--max_steps", "40", "--save_steps",
                                                          "20", "--learning_rate", "1e-3", "--held_out_endpoints", "4",
                                                          "--endpoint_steps", "3", "--eval_strategy", "steps",
                                                          "--eval_steps", "20"))  # fmt: skip
    decoder.run(cfg, recipe)
    return out


def test_trained_decoder_beats_an_untrained_one(trained):
    info = json.loads((trained / "final" / decoder.TRAINING_INFO_FILE).read_text())
    gain = info["held_out_trained"]["psnr"] - info["held_out_untrained"]["psnr"]
    assert gain > MIN_GAIN_DB, info["held_out_untrained"] | {"trained": info["held_out_trained"]}
    # The held-out sampling endpoints are evaluated beside the image latents: at the end and at each evaluation.
    assert info["held_out_endpoints"] == 4
    assert info["held_out_trained"]["endpoint_psnr"] != info["held_out_trained"]["psnr"]
    assert [h["step"] for h in info["log_history"] if "eval_endpoint_psnr" in h] == [20, 40]
    assert (trained / "loss.png").is_file()
    assert (trained / "checkpoint-20" / "checkpoint_complete.json").is_file()
    tiny = tiny_decoder.TinyDecoder.load(tiny_decoder.find_decoder_folder(trained))
    assert tiny.config["num_blocks"] == [3, 3, 1]  # the tiny VAE's factor 4: two upsampling stages
    assert tiny.config["global_context"]  # the default
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in tiny.modules())


def test_resume_is_exact(tiny_pipeline, tmp_path):
    """Stopped after checkpoint-2 and resumed: the same weights as one run of 4 steps (posterior draws, data order,
    discriminator and EMA included)."""
    extra = ["--max_steps", "4", "--save_steps", "2", "--adversarial_weight", "0.1", "--perceptual_weight", "0.1"]
    cfg, _ = decoder.parse_decoder_config(train_args(tiny_pipeline, tmp_path / "a", *extra))
    decoder.run(cfg)
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    cfg, _ = decoder.parse_decoder_config(
        train_args(tiny_pipeline, tmp_path / "b", *extra, "--resume_from_checkpoint", "latest")
    )
    decoder.run(cfg)
    a = tiny_decoder.TinyDecoder.load(tmp_path / "a" / "final" / "tiny_decoder").state_dict()
    b = tiny_decoder.TinyDecoder.load(tmp_path / "b" / "final" / "tiny_decoder").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = tiny_decoder.TinyDecoder.load(tmp_path / "a" / "checkpoint-2" / "tiny_decoder").state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the control: two more steps changed the weights


@pytest.fixture(scope="module")
def folder(qat_run, trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-decoder-export") / "ov"
    shutil.copytree(qat_run["ov"], out)
    export.add_tiny_decoder(out, trained)
    return out


def optimum_image(pipe, output_type="pil"):
    latents = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(SEED))
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, latents=latents,
               output_type=output_type)  # fmt: skip
    return out.images[0] if output_type == "pil" else out.images


def genai_image(folder):
    pipe = openvino_genai.Text2ImagePipeline(str(folder), "CPU", **F32)
    out = pipe.generate(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                        generator=openvino_genai.TorchGenerator(SEED))  # fmt: skip
    return out.data[0]


def test_export_both_decoders_in_optimum_and_genai(folder, trained):
    record = json.loads((folder / export.RECORD_FILE).read_text())
    assert record["active"] == "tiny" and (folder / "vae_decoder_full" / "openvino_model.xml").is_file()
    assert "## VAE decoder" in (folder / "README.md").read_text()
    assert record["tiny"]["global_context"] and "with global-context blocks" in (folder / "README.md").read_text()
    # The IR reads back the torch decoder's held-out figures: image latents and sampling endpoints alike.
    trained_info = json.loads((trained / "final" / decoder.TRAINING_INFO_FILE).read_text())["held_out_trained"]
    assert record["tiny"]["held_out_endpoint_latents"] == 4
    assert abs(record["tiny"]["held_out_endpoint_psnr_vs_full_db"] - trained_info["endpoint_psnr"]) < 0.1
    assert abs(record["tiny"]["held_out_psnr_vs_full_db"] - trained_info["psnr"]) < 0.1
    assert "4 held-out samplings" in (folder / "README.md").read_text()
    pipe = load_ov_pipeline(folder, SIZE, SIZE, ov_config=F32)
    tiny_image = np.array(optimum_image(pipe))
    # The IR gets what optimum feeds it (latents / scaling_factor) and must give the torch decoder's image of the
    # UNet's latents themselves.
    latents = torch.from_numpy(np.asarray(optimum_image(pipe, "latent"))).float()
    with torch.no_grad():
        torch_tiny = tiny_decoder.TinyDecoder.load(tiny_decoder.find_decoder_folder(trained))(latents)[0]
    torch_image = ((torch_tiny.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert psnr(tiny_image, torch_image) > 45
    assert psnr(genai_image(folder), tiny_image) > MIN_RUNTIME_AGREEMENT_DB

    export.activate_decoder(folder, "full")
    assert export.active_decoder(folder) == "full" and (folder / "vae_decoder_tiny").is_dir()
    assert "vae_decoder_tiny/" in (folder / "README.md").read_text()
    full_image = np.array(optimum_image(load_ov_pipeline(folder, SIZE, SIZE, ov_config=F32)))
    assert psnr(genai_image(folder), full_image) > MIN_RUNTIME_AGREEMENT_DB
    assert psnr(full_image, tiny_image) < 40  # the control: the two decoders differ
    export.activate_decoder(folder, "tiny")


def test_int8_weights_export_keeps_the_image(folder, trained):
    f32_psnr = json.loads((folder / export.RECORD_FILE).read_text())["tiny"]["held_out_psnr_vs_full_db"]
    record = export.add_tiny_decoder(folder, trained, int8="weights")
    assert record["active"] == "tiny" and record["tiny"]["int8"] == "weights"
    assert abs(record["tiny"]["held_out_psnr_vs_full_db"] - f32_psnr) < 1.0


@pytest.mark.parametrize("name", sorted(decoder.shipped_recipes()))
def test_shipped_recipes_load(name, tmp_path):
    cfg, recipe = decoder.parse_decoder_config(["--recipe", name, "--output_dir", str(tmp_path)])
    assert recipe and all(getattr(cfg, k) == v for k, v in recipe.items() if k != "report_to")


def test_bad_input(folder, trained, tmp_path, tiny_pipeline):
    cases = [
        (["--perceptual_weight", "-1"], "must be >= 0"),
        (["--pixel_weight", "0"], "both 0"),
        (["--held_out_samples", "0"], "held_out_samples"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            decoder.parse_decoder_config(["--output_dir", str(tmp_path), *argv])
    bad_recipe = tmp_path / "r.json"
    bad_recipe.write_text(json.dumps({"perceptual_wieght": 1.0}))
    with pytest.raises(UserError, match="unknown key"):
        decoder.parse_decoder_config(["--recipe", str(bad_recipe), "--output_dir", str(tmp_path)])
    with pytest.raises(UserError, match="exists and is not empty"):
        decoder.run(decoder.parse_decoder_config(train_args(tiny_pipeline, trained))[0])
    with pytest.raises(UserError, match="not an OpenVINO pipeline folder"):
        export.add_tiny_decoder(tiny_pipeline, trained)
    with pytest.raises(UserError, match="no trained tiny decoder"):
        export.add_tiny_decoder(folder, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(tiny_decoder.find_decoder_folder(trained), other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"scaling_factor": 2 * config["scaling_factor"]}))
    with pytest.raises(UserError, match="trained for another VAE"):
        export.add_tiny_decoder(folder, other)
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("vae_decoder_*", export.RECORD_FILE))
    with pytest.raises(UserError, match="no tiny decoder"):
        export.activate_decoder(bare, "tiny")


def test_generate_chooses_the_decoder_without_changing_the_folder(folder, tmp_path):
    from ov_sd_trainer.eval.generate import generate

    assert export.active_decoder(folder) == "tiny"
    before = sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    kw = dict(steps=STEPS, seed=SEED, height=SIZE, width=SIZE, guidance_scale=GUIDANCE)

    def image(name, **extra):
        info = generate(str(folder), PROMPT, str(tmp_path / f"{name}.png"), **kw, **extra)
        return info, np.array(Image.open(tmp_path / f"{name}.png"))

    info, full = image("full", decoder="full")
    assert info["decoder"] == "full"
    _, tiny = image("tiny", decoder="tiny")
    _, default = image("default")
    _, genai_full = image("genai-full", decoder="full", runtime="genai")
    assert sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*")) == before
    assert np.array_equal(tiny, default)  # the active decoder is the tiny one
    assert psnr(full, tiny) < 40  # the control: --decoder full decoded with the other IR
    assert psnr(genai_full, full) > MIN_RUNTIME_AGREEMENT_DB
    export.activate_decoder(folder, "full")
    try:
        _, activated = image("activated")
    finally:
        export.activate_decoder(folder, "tiny")
    assert np.array_equal(full, activated)  # --decoder full is what the folder gives with the full decoder active
    with pytest.raises(UserError, match="drop --backend pytorch"):
        generate(str(folder), PROMPT, str(tmp_path / "x.png"), backend="pytorch", decoder="tiny")


def test_eval_compares_tiny_and_full_decode_of_the_same_latents(folder, tiny_pipeline):
    from ov_sd_trainer.eval.fidelity import evaluate_fidelity

    result, grid = evaluate_fidelity(tiny_pipeline, [("tq", folder)], steps=STEPS, seeds=1, subset=3, batch_size=3,
                                     unet_samples=2, grid_samples=2, progress=False)  # fmt: skip
    variant = result["variants"][1]
    d = variant["decoders"]
    assert d["active"] == "tiny" and set(d["accuracy"]) == {"full", "tiny"}
    assert result["grid"]["rows"] == ["fp32", "tq", "tq: full decode", "tq: tiny decode"] and len(grid) == 4
    # the folder's own images come from its active (tiny) decoder: the tiny decode of the same final latents is them
    assert all(psnr(a, b) > 40 for a, b in zip(grid[1], grid[3]))
    assert d["psnr"] < 40 and max(psnr(a, b) for a, b in zip(grid[1], grid[2])) < 40  # the control: full differs


@pytest.mark.slow  # the shared consistency run (`lcm_run`) and its export: CI
def test_endpoints_from_a_few_step_student_folder(tiny_pipeline, lcm_run, tmp_path):
    """`endpoint_model`: the training and held-out endpoints are the exported student's own, sampled at the steps and
    guidance its folder records, not the teacher's."""
    from ov_sd_trainer.pipeline_folder import trained_sampling

    extra = ["--max_steps", "1", "--save_strategy", "no", "--sampling_endpoints", "3", "--held_out_endpoints", "2"]
    cfg, _ = decoder.parse_decoder_config(train_args(tiny_pipeline, tmp_path / "s", *extra, "--endpoint_model",
                                                     str(lcm_run["ov"])))  # fmt: skip
    _, steps, guidance, batch = decoder.endpoint_sampler(cfg, _teacher(tiny_pipeline), 32)
    recorded = trained_sampling(lcm_run["ov"])
    assert (steps, guidance, batch) == (recorded["steps"], recorded["guidance_scale"], 1)
    decoder.run(cfg)
    cfg, _ = decoder.parse_decoder_config(train_args(tiny_pipeline, tmp_path / "t", *extra))
    decoder.run(cfg)
    info = json.loads((tmp_path / "s" / "final" / decoder.TRAINING_INFO_FILE).read_text())
    assert info["endpoint_model"] == str(lcm_run["ov"]) and info["train_latents"] == 48 + 3
    from safetensors.torch import load_file

    student, teacher = (load_file(str(tmp_path / r / "final" / tiny_decoder.HELD_OUT_FILE)) for r in ("s", "t"))
    assert student["endpoints"].shape == teacher["endpoints"].shape and len(student["endpoints"]) == 2
    assert not torch.allclose(student["endpoints"], teacher["endpoints"], atol=1e-3)  # the control: another sampler
    torch.testing.assert_close(student["latents"], teacher["latents"])  # the image latents are the same


def test_endpoint_model_must_be_an_openvino_folder(tiny_pipeline, tmp_path):
    cfg, _ = decoder.parse_decoder_config(train_args(tiny_pipeline, tmp_path / "r", "--held_out_endpoints", "1",
                                                     "--endpoint_model", str(tiny_pipeline)))  # fmt: skip
    with pytest.raises(UserError, match="--endpoint_model"):
        decoder.endpoint_sampler(cfg, _teacher(tiny_pipeline), 32)


def _teacher(path):
    from ov_sd_trainer.pipeline_folder import load_pipeline

    return load_pipeline(path)


def test_global_context_starts_as_taesd_reaches_the_whole_image_and_exports(tmp_path):
    """`global_context`: an untrained decoder is TAESD's; a trained block lets a corner of the latents change the
    opposite corner of the image, which TAESD's receptive field cannot; the IR has ReduceMean and no normalization or
    attention, and matches torch."""
    import openvino as ov

    vae = {"block_out_channels": [8, 8, 8], "latent_channels": 4, "scaling_factor": 0.5}
    torch.manual_seed(0)
    gc = tiny_decoder.TinyDecoder(tiny_decoder.decoder_config(vae, 16, global_context=True)).eval()
    blocks = [m for m in gc.modules() if isinstance(m, tiny_decoder.GlobalContext)]
    assert len(blocks) == sum(gc.config["num_blocks"]) == 7  # one per residual block: (3, 3, 1)
    plain = tiny_decoder.TinyDecoder(tiny_decoder.decoder_config(vae, 16, global_context=False)).eval()
    plain.decoder.layers = torch.nn.Sequential(
        *[m for m in gc.decoder.layers if not isinstance(m, tiny_decoder.GlobalContext)]
    )  # the same weights, blocks left out
    z = torch.randn(2, 4, 48, 48)
    moved = z.clone()
    moved[:, :, -8:, -8:] += 3.0  # the far corner: 40 latent pixels away, beyond TAESD's receptive field of (0, 0)
    with torch.no_grad():
        assert torch.equal(gc(z), plain(z))  # zero-initialised: the identity
        assert torch.equal(plain(z)[:, :, :8, :8], plain(moved)[:, :, :8, :8])  # the control: out of reach
        for block in blocks:  # as training would move them
            torch.nn.init.normal_(block.expand.weight, std=0.1)
        assert (gc(z)[:, :, :8, :8] - gc(moved)[:, :, :8, :8]).abs().max() > 1e-3
        expected = gc(z[:1]).numpy()
    gc.save(tmp_path / "gc")
    loaded = tiny_decoder.TinyDecoder.load(tmp_path / "gc")
    assert loaded.config["global_context"] and torch.equal(loaded(z[:1]), gc(z[:1]))
    model = export.convert_tiny_decoder(loaded)
    ops = {op.get_type_name() for op in model.get_ops()}
    assert "ReduceMean" in ops and not ops & {"MVN", "GroupNormalization", "Softmax", "MatMul"}, ops
    ir = ov.Core().compile_model(model, "CPU", F32)
    got = ir(z[:1].numpy() / vae["scaling_factor"])[0]  # the pipelines' latent_sample: latents / scaling_factor
    assert psnr((got + 1) * 127.5, (expected + 1) * 127.5) > 45.0
    # full int8 quantizes the residual blocks and keeps the context path float (quantized, it cost 2.0 dB)
    quantized = export.compress_int8(model, "full", np.random.RandomState(0).randn(4, 4, 48, 48).astype(np.float32))
    fed = {t.get_node().get_friendly_name() for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize"
           for out in op.outputs() for t in out.get_target_inputs()}  # fmt: skip
    assert any(".conv.0/" in name for name in fed)
    assert not any(part in name for name in fed for part in (".reduce/", ".expand/", "aten::mean"))
    cfg, _ = decoder.parse_decoder_config(["--decoder_global_context", "false", "--output_dir", str(tmp_path / "o")])
    assert not cfg.decoder_global_context  # TAESD's architecture, on request
