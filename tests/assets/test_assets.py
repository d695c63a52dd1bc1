"""The offline stack: synthetic dataset, loader, tiny pipeline factory, OpenVINO export, CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ov_sd_trainer.assets import synthetic
from ov_sd_trainer.assets.builders import TinySDConfig
from ov_sd_trainer.errors import UserError
from ov_sd_trainer.pipeline_folder import check_pipeline_source
from ov_sd_trainer.train.data import load_captioned_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- synthetic dataset ------------------------------------------------------------------------


def test_synthetic_schema_and_determinism():
    a = synthetic.make_synthetic_dataset(12, seed=3, resolution=32)
    b = synthetic.make_synthetic_dataset(12, seed=3, resolution=32)
    c = synthetic.make_synthetic_dataset(12, seed=4, resolution=32)
    assert a.column_names == ["image", "text", "shape", "color", "background"]
    assert len(a) == 12
    assert a[0]["image"].size == (32, 32) and a[0]["image"].mode == "RGB"
    assert a["text"] == b["text"]
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
    assert a["text"] != c["text"]


def test_synthetic_captions_agree_with_pixels():
    ds = synthetic.make_synthetic_dataset(40, seed=1, resolution=64)
    rows = synthetic.sample_attributes(40, seed=1)
    for row, attrs in zip(ds, rows):
        assert row["text"] == f"a {row['color']} {row['shape']} on a {row['background']} background"
        img = np.asarray(row["image"]).astype(int)
        # corners are background (shapes keep a margin), the shape's centre has the shape colour
        assert np.abs(img[0, 0] - synthetic.BACKGROUNDS[row["background"]]).max() <= 2
        cx, cy = (int(v * 64) for v in attrs["center"])
        assert np.abs(img[cy, cx] - synthetic.COLORS[row["color"]]).max() <= 2, row["text"]
        assert synthetic.COLORS[row["color"]] != synthetic.BACKGROUNDS[row["background"]]


def test_all_combinations_cover_every_attribute():
    combos = synthetic.all_combinations()
    assert {c[0] for c in combos} == set(synthetic.SHAPES)
    assert {c[1] for c in combos} == set(synthetic.COLORS)
    assert {c[2] for c in combos} == set(synthetic.BACKGROUNDS)


# --- loader ------------------------------------------------------------------------------------


def test_loader_synthetic_and_max_samples():
    ds = load_captioned_dataset("synthetic:20", max_samples=5)
    assert len(ds) == 5 and {"image", "text"} <= set(ds.column_names)


def test_loader_imagefolder_roundtrip(tmp_path):
    from ov_sd_trainer.cli import main

    assert main(["make-dataset", "--output", str(tmp_path / "data"), "--num-samples", "6"]) == 0
    ds = load_captioned_dataset(str(tmp_path / "data"))
    assert len(ds) == 6
    assert ds[0]["text"].startswith("a ")
    # captions match the synthetic set, in order
    assert sorted(ds["text"]) == sorted(synthetic.make_synthetic_dataset(6)["text"])


def test_loader_missing_column_names_columns_found(tmp_path):
    with pytest.raises(UserError, match=r"no column 'caption'.*columns found: \['image', 'text'"):
        load_captioned_dataset("synthetic:4", caption_column="caption")


def test_loader_bad_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_captioned_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metadata.jsonl"):
        load_captioned_dataset(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="synthetic:N"):
        load_captioned_dataset("synthetic:many")


# --- pipeline factory --------------------------------------------------------------------------


@pytest.fixture
def tiny_dir(tiny_pipeline):
    return tiny_pipeline


def test_tiny_pipeline_structure_and_tokenizer(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    assert pipe.vae_scale_factor == TinySDConfig().vae_factor == 4
    ids = pipe.tokenizer("a red circle on a blue background").input_ids
    # every caption word is one token: <start> a red circle on a blue background <end>
    assert len(ids) == 9
    pad = pipe.tokenizer("a red", padding="max_length", max_length=77).input_ids
    assert len(pad) == 77
    # self- and cross-attention at the highest latent resolution (16x16 = 256 tokens)
    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert block.attn1.is_cross_attention is False and block.attn2.is_cross_attention is True
    out = pipe("a red circle on a blue background", num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_tiny_pipeline_exports_to_openvino(fp32_export, tmp_path):
    """optimum-intel's export of the tiny pipeline (the session's `fp32_export`) loads, reshapes and generates."""
    from optimum.intel import OVStableDiffusionPipeline

    for sub in ("unet", "text_encoder", "vae_decoder", "vae_encoder"):
        assert (fp32_export / sub / "openvino_model.xml").is_file()
    pipe = OVStableDiffusionPipeline.from_pretrained(fp32_export, compile=False)
    pipe.reshape(batch_size=1, height=64, width=64, num_images_per_prompt=1)
    pipe.compile()
    image = pipe("a green square on a white background", num_inference_steps=3).images[0]
    assert image.size == (64, 64)
    # `ov-sd generate` reads any optimum-intel export, at the size the model was made for
    from ov_sd_trainer.eval.generate import generate

    info = generate(str(fp32_export), "a red circle on a blue background", str(tmp_path / "g.png"), steps=2)
    assert (tmp_path / "g.png").is_file() and (info["height"], info["width"]) == (64, 64) and info["step_s"] > 0


def test_check_pipeline_source(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_pipeline_source(str(tmp_path / "missing"))
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="not a Stable Diffusion pipeline folder"):
        check_pipeline_source(str(tmp_path / "x"))
    (tmp_path / "x" / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(UserError, match="lacks"):
        check_pipeline_source(str(tmp_path / "x"))
    check_pipeline_source("runwayml/stable-diffusion-v1-5")  # Hub ids are left to diffusers


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_generate_and_one_line_errors(tiny_dir, tmp_path):
    out = tmp_path / "img.png"
    cmd = [sys.executable, "-m", "ov_sd_trainer.cli"]
    r = subprocess.run(
        cmd + ["generate", "--model", str(tiny_dir), "--prompt", "a red circle on a blue background",
               "--output", str(out), "--steps", "2", "--backend", "pytorch"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "ms/step" in r.stdout
    r = subprocess.run(cmd + ["make-tiny", "--output", str(tiny_dir)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("ov-sd: error: output folder")
    assert "--overwrite" in r.stderr
