"""Export of a tiny QAT run to an OpenVINO pipeline folder; model card; Hub push plan; atomicity."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ov_sd_trainer import cli
from ov_sd_trainer.compress import convert
from ov_sd_trainer.errors import UserError
from ov_sd_trainer.export.hub import push_to_hub, upload_plan
from ov_sd_trainer.export.openvino import export_openvino_pipeline, load_student_from_checkpoint
from ov_sd_trainer.pipeline_folder import RESULTS_FILE
from ov_sd_trainer.run_folder import FINAL_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def trained(qat_run):
    return qat_run


def test_recipe_push_uploads_the_openvino_folder(trained):
    assert trained["pushed"] == [(trained["ov"], "me/tiny-int8", {"token": "t0k", "private": False})]


def test_export_folder_layout_int8_and_size(trained):
    import openvino as ov

    ov_dir = trained["ov"]
    for sub in ("unet", "text_encoder", "vae_decoder", "vae_encoder"):
        assert (ov_dir / sub / "openvino_model.xml").is_file(), sub
    for f in ("model_index.json", "README.md", RESULTS_FILE, "training_recipe.json", "samples/sample_0.png"):
        assert (ov_dir / f).is_file(), f
    unet = ov.Core().read_model(ov_dir / "unet" / "openvino_model.xml")
    assert convert.count_fake_quantize(unet) > 0
    assert convert.count_int8_constants(unet) > 0
    assert [i.get_any_name() for i in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert "out_sample" in unet.outputs[0].get_names()
    results = json.loads((ov_dir / RESULTS_FILE).read_text())
    # tiny models keep proportionally more float biases/norms than SD 1.5 (0.251x there)
    assert results["unet_size_ratio"] <= 0.27, results
    assert results["unet_int8_bytes"] == (ov_dir / "unet" / "openvino_model.bin").stat().st_size


def test_optimum_pipeline_loads_reshapes_and_generates(trained):
    from optimum.intel import OVStableDiffusionPipeline

    pipe = OVStableDiffusionPipeline.from_pretrained(trained["ov"], compile=False)
    pipe.reshape(batch_size=1, height=64, width=64, num_images_per_prompt=1)
    pipe.compile()
    image = pipe("a red circle on a blue background", num_inference_steps=3).images[0]
    assert image.size == (64, 64)


def test_parity_ov_unet_vs_pytorch_student_and_teacher(trained, fp32_export):
    """The exported int8 UNet reproduces the fake-quant PyTorch student; optimum's FP32 export (the session's, of the
    same base model) the teacher."""
    import openvino as ov

    student, _, base, _ = load_student_from_checkpoint(trained["out"] / FINAL_DIR)
    assert base == str(trained["base"])  # the model fp32_export was made from
    student.eval()
    inputs = convert.unet_example_inputs(student, batch=2, height=16, width=16)
    inputs["timestep"] = inputs["timestep"][:1]  # one timestep for the batch, as optimum's IR ([1]) takes it
    with torch.no_grad():
        ref = student(**inputs, return_dict=False)[0].numpy()
    core = ov.Core()
    compiled = core.compile_model(
        trained["ov"] / "unet" / "openvino_model.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    got = compiled({k: v.numpy() for k, v in inputs.items()})[0]
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)

    teacher = load_pipe_unet(base)
    with torch.no_grad():
        ref_t = teacher(**inputs, return_dict=False)[0].numpy()
    got_t = core.compile_model(fp32_export / "unet" / "openvino_model.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(
        {k: v.numpy() for k, v in inputs.items()}
    )[0]
    assert np.abs(got_t - ref_t).max() < 1e-4 * max(1.0, np.abs(ref_t).max())
    # The int8 IR vs the fake-quant student. NNCF's training kernel and OpenVINO's FakeQuantize/int8 kernels
    # disagree on rounding ties (~0.1% of elements move one level), and in a quantized network each flipped
    # level can flip later ones, so the two carry partly independent rounding noise. Measured here: 3.5%
    # relative L2, below the quantization error itself (student vs FP32 teacher, ~5%). The bound: the export
    # adds no more error than quantization does, and stays under 6% in absolute terms.
    quant_err = np.linalg.norm(ref - ref_t) / np.linalg.norm(ref_t)
    assert quant_err > 1e-3  # the student really is quantized
    assert rel <= max(quant_err, 0.01) and rel < 0.06, (rel, quant_err)


def load_pipe_unet(base):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()


def test_model_card_fields(trained):
    text = (trained["ov"] / "README.md").read_text()
    assert text.startswith("---\n")
    import yaml

    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "optimum-intel" and meta["pipeline_tag"] == "text-to-image"
    assert {"openvino", "int8", "nncf"} <= set(meta["tags"])
    assert "OVStableDiffusionPipeline.from_pretrained" in text and "pipe.reshape" in text
    assert "samples/sample_0.png" in text and "UNet int8 (MB)" in text


class RecordingApi:
    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))
        if self.fail:
            raise self.fail
        return f"https://huggingface.co/{kw['repo_id']}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))


def test_push_plan_and_calls(trained, tmp_path):
    plan = upload_plan(trained["ov"])
    assert "unet/openvino_model.bin" in plan and "README.md" in plan and "model_index.json" in plan
    assert not any(p.endswith((".safetensors", ".pt")) for p in plan)
    api = RecordingApi()
    url = push_to_hub(trained["ov"], "me/tiny-int8", token="t0k", private=True, api=api)
    assert url == "https://huggingface.co/me/tiny-int8"
    (name1, kw1), (name2, kw2) = api.calls
    assert name1 == "create_repo" and kw1 == {
        "repo_id": "me/tiny-int8",
        "private": True,
        "exist_ok": True,
        "repo_type": "model",
    }
    assert name2 == "upload_folder" and kw2["folder_path"] == str(trained["ov"]) and kw2["repo_id"] == "me/tiny-int8"


def test_push_failures_are_clear_and_lose_nothing(trained, monkeypatch):
    before = sorted(p.stat().st_mtime_ns for p in trained["ov"].rglob("*") if p.is_file())
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(UserError, match="no Hugging Face token"):
        push_to_hub(trained["ov"], "me/x")
    with pytest.raises(UserError, match="upload to 'me/x' failed .*unchanged"):
        push_to_hub(trained["ov"], "me/x", token="t", api=RecordingApi(fail=ConnectionError("offline")))
    with pytest.raises(UserError, match="not an exported OpenVINO pipeline"):
        push_to_hub(trained["base"], "me/x", token="t", api=RecordingApi())
    assert before == sorted(p.stat().st_mtime_ns for p in trained["ov"].rglob("*") if p.is_file())


def test_export_is_atomic(trained, tmp_path, monkeypatch):
    student, _, base, _ = load_student_from_checkpoint(trained["out"] / FINAL_DIR)
    target = tmp_path / "ov"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="--overwrite"):
        export_openvino_pipeline(base, student, target)

    class DiskFull:
        """optimum's pipeline whose save runs out of disk after its first file: a failure inside the export's
        temporary folder, with something already written there (without paying for optimum's real export)."""

        def save_pretrained(self, folder):
            (Path(folder) / "model_index.json").write_text("{}")
            raise OSError(28, "No space left on device")

    from optimum.intel import OVDiffusionPipeline

    monkeypatch.setattr(OVDiffusionPipeline, "from_pretrained", lambda *a, **k: DiskFull())
    with pytest.raises(OSError, match="No space left"):
        export_openvino_pipeline(base, student, target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ov"]  # no temporary folder left behind
    assert (target / "precious.txt").read_text() == "keep me"


def test_cli_export_generate_and_errors(trained, tmp_path, capsys):
    """`ov-sd export` and `ov-sd generate` in-process (tests/test_install.py runs the installed console script)."""
    out = tmp_path / "cli-ov"
    assert cli.main(["export", "--checkpoint", str(trained["out"] / FINAL_DIR), "--output", str(out)]) == 0
    assert (out / "unet" / "openvino_model.xml").is_file()
    png = tmp_path / "x.png"
    argv = ["generate", "--model", str(out), "--prompt", "a blue square on a white background", "--steps", "3"]
    assert cli.main([*argv, "--output", str(png)]) == 0
    assert png.is_file() and "ms/step" in capsys.readouterr().out
    assert cli.main(["export", "--checkpoint", str(trained["base"]), "--output", str(tmp_path / "y")]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
