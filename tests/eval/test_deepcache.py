"""Step caching with OpenVINO: `ov-sd deepcache` on the tiny QAT run, the IRs' exactness, and
`OVDeepCacheStableDiffusionPipeline` (optimum-intel's pipeline) at cache intervals 1, 2, 3."""

import hashlib
import shutil

import numpy as np
import pytest
import torch

from ov_sd_trainer import cli
from ov_sd_trainer.compress.convert import UNET_OUTPUT_NAME
from ov_sd_trainer.compress.deepcache import DEEP_FEATURE_NAME
from ov_sd_trainer.errors import UserError
from ov_sd_trainer.export import deepcache as dc_export
from ov_sd_trainer.pipeline_folder import RECIPE_FILE, UNET_XML

F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # the CPU's default would be bf16 where it has AMX/AVX512-BF16
PROMPT = "a red circle on a blue background"


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / "unet").iterdir() if p.is_file()}


pytestmark = pytest.mark.slow  # step-caching IRs of the shared run, then pipelines and evals (~2 min): CI


@pytest.fixture(scope="module")
def folder(qat_run, tmp_path_factory):
    """A copy of the QAT run's export with unet_deepcache/ added through the command line."""
    out = tmp_path_factory.mktemp("deepcache") / "ov"
    shutil.copytree(qat_run["ov"], out)
    before = _digest(out)
    assert cli.main(["deepcache", "--run", str(qat_run["out"]), "--model", str(out)]) == 0
    assert _digest(out) == before  # the plain UNet is untouched
    return out


@pytest.fixture(scope="module")
def pipes(folder):
    from ov_sd_trainer.eval.deepcache_pipeline import load_deepcache_pipeline
    from ov_sd_trainer.pipeline_folder import load_ov_pipeline

    plain = load_ov_pipeline(folder, 64, 64, ov_config=F32)
    cached = load_deepcache_pipeline(folder, 64, 64, ov_config=F32)
    for p in (plain, cached):
        p.set_progress_bar_config(disable=True)
    return plain, cached


def test_export_writes_both_int8_irs(folder, qat_run):
    import openvino as ov

    from ov_sd_trainer.compress.convert import count_fake_quantize

    assert dc_export.has_deepcache(folder)
    info = dc_export.read_info(folder)
    assert info["quantized"] and info["source"]["kind"] == "qat"
    assert info["full_vs_unet_relative_l2"] <= dc_export.PARITY_TOLERANCE
    plain_fq = count_fake_quantize(ov.Core().read_model(folder / UNET_XML))
    full, shallow = info["irs"]["full.xml"], info["irs"]["shallow.xml"]
    assert full["fake_quantize_ops"] == plain_fq  # the student's quantizers, all of them, in the full IR
    assert 0 < shallow["fake_quantize_ops"] < plain_fq  # a subset in the shallow one
    assert full["int8_constants"] > 0 and shallow["int8_constants"] > 0  # int8 weights, not FP32 copies
    assert shallow["bin_bytes"] < full["bin_bytes"] / 2
    assert not list(folder.glob(".unet_deepcache*"))  # no temporary folder left behind


def test_full_ir_is_the_plain_unet_and_shallow_reproduces_it(folder):
    import openvino as ov

    core = ov.Core()
    plain = core.compile_model(core.read_model(folder / UNET_XML), "CPU", F32)
    full = core.compile_model(core.read_model(folder / dc_export.FULL_XML), "CPU", F32)
    shallow = core.compile_model(core.read_model(folder / dc_export.SHALLOW_XML), "CPU", F32)
    rng = np.random.default_rng(1)
    x = {
        "sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
        "timestep": np.array([500], dtype=np.int64),
        "encoder_hidden_states": rng.standard_normal((2, 77, 64), dtype=np.float32),
    }
    ref = plain(x)[0]
    out = full(x)
    feature = out[DEEP_FEATURE_NAME]
    np.testing.assert_allclose(out[UNET_OUTPUT_NAME], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(shallow({**x, DEEP_FEATURE_NAME: feature})[0], out[UNET_OUTPUT_NAME], rtol=1e-4,
                               atol=1e-5)  # fmt: skip


def _images(pipe, latents, **kw):
    return pipe(PROMPT, num_inference_steps=10, latents=latents.clone(), output_type="np", **kw).images


def _psnr(a, b):
    return 10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-12))


def test_pipeline_intervals(pipes):
    """Interval 1 is the plain pipeline bit for bit (also after a cached run on the same object); interval 2/3 run
    full.xml on every N-th UNet call and stay closer to the interval-1 image than the naive cache with the same
    schedule (reusing the whole noise prediction on the skipped steps: what DeepCache improves on)."""
    plain, cached = pipes
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = _images(plain, latents)
    for interval in (2, 3):
        calls = dict(cached.deepcache_stats)
        image = _images(cached, latents, cache_interval=interval)
        stats = cached.deepcache_stats
        n = 11  # PNDM with 10 steps: 11 UNet calls (one PLMS warm-up)
        assert stats["full"] - calls["full"] == -(-n // interval)
        assert stats["shallow"] - calls["shallow"] == n - -(-n // interval)
        naive = _naive_cache(plain, latents, interval)
        assert _psnr(image, ref) > _psnr(naive, ref), (interval, _psnr(image, ref), _psnr(naive, ref))
        assert not np.array_equal(image, ref)
    np.testing.assert_array_equal(_images(cached, latents, cache_interval=1), ref)
    np.testing.assert_array_equal(_images(cached, latents), ref)  # the default: off


def _naive_cache(pipe, latents, interval):
    unet = pipe.unet
    state = {"k": 0, "out": None}
    orig = unet.forward

    def forward(*args, **kwargs):
        if state["k"] % interval == 0:
            state["out"] = orig(*args, **kwargs)
        state["k"] += 1
        return state["out"]

    unet.forward = forward
    try:
        return _images(pipe, latents)
    finally:
        del unet.forward


def test_bad_input(folder, qat_run, tmp_path, capsys):
    def ov_sd(*argv):
        code = cli.main(["deepcache", *map(str, argv)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("ov-sd: error: "), err
        return err

    run = qat_run["out"]
    assert "does not exist" in ov_sd("--run", tmp_path / "missing")
    assert "not a finished QAT run" in ov_sd("--run", qat_run["base"], "--model", folder)
    assert "is not an OpenVINO pipeline folder" in ov_sd("--run", run, "--model", qat_run["base"])
    assert "does not exist" in ov_sd("--run", run, "--model", tmp_path / "nope")
    assert "already holds unet_deepcache/" in ov_sd("--run", run, "--model", folder)
    assert "needs --model" in ov_sd("--fp32", qat_run["base"])
    assert "is a QAT export" in ov_sd("--fp32", qat_run["base"], "--model", folder, "--overwrite")
    assert "not a diffusers pipeline folder" in ov_sd("--fp32", folder, "--model", folder)
    assert "one of the arguments --run --fp32 is required" in ov_sd()

    from ov_sd_trainer.eval.deepcache_pipeline import OVDeepCacheStableDiffusionPipeline

    bare = tmp_path / "bare"
    shutil.copytree(qat_run["ov"], bare)
    pipe = OVDeepCacheStableDiffusionPipeline.from_pretrained(str(bare), compile=False)
    assert pipe("x", num_inference_steps=1, output_type="np").images.shape == (1, 64, 64, 3)  # interval 1: plain
    with pytest.raises(UserError, match="has no step-caching IRs"):
        pipe("x", num_inference_steps=2, cache_interval=2)
    with pytest.raises(UserError, match="cache_interval must be a positive integer"):
        pipe("x", num_inference_steps=2, cache_interval=0)


def test_a_unet_from_elsewhere_fails_the_parity_check(folder, qat_run, tmp_path):
    """FP32 IRs from the base model refused for the QAT student's folder (the parity check), atomically."""
    other = tmp_path / "other"
    shutil.copytree(qat_run["ov"], other)
    (other / RECIPE_FILE).unlink()  # no longer marked as a QAT export: --fp32 is allowed to try
    with pytest.raises(UserError, match="differs from"):
        dc_export.add_from_diffusers(qat_run["base"], other)
    assert not (other / dc_export.DEEPCACHE_DIR).exists() and not list(other.glob(".unet_deepcache*"))


def test_eval_cache_interval_1_is_the_plain_variant_and_2_is_not(folder, qat_run, tmp_path, capsys):
    """`ov-sd eval --cache-interval NAME=N` generates NAME through the step-caching pipeline: interval 1 gives the
    plain pipeline's images exactly (two load paths: the caching pipeline's loader and its interval-1 delegation vs
    the plain pipeline), interval 2 differs; bad specs are one-line errors. 6 prompts at batch 4: the
    last chunk is padded to the static batch, as for the plain pipeline."""
    import json

    out = tmp_path / "eval"
    argv = ["eval", "--reference", str(qat_run["base"]), "--model", f"plain={folder}", "--model", f"dc1={folder}",
            "--model", f"dc2={folder}", "--cache-interval", "dc1=1", "--cache-interval", "dc2=2", "--output", str(out),
            "--steps", "4", "--seeds", "1", "--subset", "6", "--batch-size", "4", "--unet-samples", "2",
            "--grid-samples", "2", "--grid-scale", "1", "--threads", "1", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    rows = {v["name"]: v for v in json.loads((out / "eval.json").read_text())["variants"]}
    assert rows["dc1"]["cache_interval"] == 1 and rows["dc2"]["cache_interval"] == 2
    assert rows["dc1"]["latent_mse"] == rows["plain"]["latent_mse"]
    assert rows["dc1"]["psnr"] == rows["plain"]["psnr"]
    assert rows["dc2"]["latent_mse"] != rows["plain"]["latent_mse"]
    assert "step caching (interval 2)" in rows["dc2"]["description"]
    assert "step caching (interval 1)" in rows["dc1"]["description"]  # through the caching pipeline, not the plain one

    capsys.readouterr()
    bad = [("dc9=2", "--model name"), ("plain=0", "interval N >= 1"), ("plain", "NAME=N")]
    for spec, needle in bad:
        rc = cli.main([*argv[:9], "--cache-interval", spec, "--output", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and needle in err and len(err.splitlines()) == 1, (spec, err)
    rc = cli.main(["eval", "--reference", str(qat_run["base"]), "--model", f"p={qat_run['ov']}",
                   "--cache-interval", "p=3", "--output", str(tmp_path / "bad2")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "ov-sd deepcache" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()
