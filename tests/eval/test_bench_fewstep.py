"""`ov-sd bench --few-step` (on by default with `--arch sd15`): the few-step int8 student's rows at 2/4/8 steps and the
tiny VAE decoder beside the VAE decode, in the same run as the 50-step rows, and the same student with ToDo. On the tiny pipeline, with the session's
FP32 export and LCM export put into the work folder (bench reuses what a --work-dir holds), so only the int8 student
and the tiny decoders are built here."""

import json
import shutil

import openvino as ov
import pytest

from ov_sd_trainer import cli
from ov_sd_trainer.compress.convert import count_fake_quantize
from ov_sd_trainer.eval.bench import fewstep

pytestmark = pytest.mark.slow  # a bench run with the int8 student and two tiny decoders (~55 s), run in CI

FAST = ["--threads", "1", "--repeats", "2", "--pipeline-repeats", "1", "--steps-pipeline", "2", "--warmup", "1",
        "--warmup-s", "0", "--image-steps", "5", "--no-measure-image"]  # fmt: skip


@pytest.fixture(scope="module")
def bench(tiny_pipeline, fp32_export, lcm_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-fewstep")
    work = root / "work"
    work.mkdir()
    shutil.copytree(fp32_export, work / "openvino-fp32")
    shutil.copytree(lcm_export.parent / "diffusers", work / "lcm-diffusers")
    shutil.copytree(lcm_export, work / "lcm-openvino-fp32")
    argv = ["bench", "--model", str(tiny_pipeline), "--variants", "openvino-fp32", "--few-step", "--output",
            str(root / "out"), "--work-dir", str(work), *FAST]  # fmt: skip
    assert cli.main(argv) == 0
    return json.loads((root / "out" / "bench.json").read_text()) | {"work": work, "out": root / "out"}


def test_few_step_rows_are_composed_from_measured_parts(bench):
    few = bench["few_step"]
    assert few["unet_inputs"]["sample"][0] == 1 and few["unet_inputs"]["timestep_cond"] == [1, 8]  # batch 1, no CFG
    decode = {k: v["s"] for k, v in few["decode"].items()}
    assert set(decode) == {"full", fewstep.TINY_F32, fewstep.TINY_INT8}
    steps = list(fewstep.FEW_STEPS)
    assert [r["name"] for r in few["rows"]] == [f"lcm-int8-{k}step" for k in steps] + [
        f"lcm-int8-todo-{k}step" for k in steps
    ]
    todo = few["todo"]
    assert todo["settings"]["mode"] == "todo" and todo["unet_step_s"] > 0
    assert todo["speedup_vs_lcm_int8"] == pytest.approx(few["unet_step_s"] / todo["unet_step_s"])
    for r in few["rows"]:  # each student's own UNet step; the text encoder and decodes are shared
        step = todo["unet_step_s"] if "-todo-" in r["name"] else few["unet_step_s"]
        parts = few["text_encoder_s"] + r["steps"] * step
        assert r["image_s"] == pytest.approx(parts + decode["full"])
        assert r["image_tiny_s"] == pytest.approx(parts + decode[fewstep.TINY_INT8])
    assert few["check"]["measured_s"] > 0 and few["check"]["steps"] == fewstep.CHECK_STEPS
    assert bench["preparation"]["lcm-int8"]["fake_quantize_ops"] > 0  # the int8 student's graph
    todo_unet = ov.Core().read_model(f"{todo['folder']}/unet/openvino_model.xml")  # int8, and ToDo's pooling
    assert count_fake_quantize(todo_unet) > 0 and "AvgPool" in {op.get_type_name() for op in todo_unet.get_ops()}


def test_tiny_decoder_beside_the_vae_decode(bench):
    tiny_int8 = ov.Core().read_model(bench["work"] / "tiny-decoder" / f"{fewstep.TINY_INT8}.xml")
    assert count_fake_quantize(tiny_int8) > 0
    (row,) = bench["variants"]
    assert row["tiny_decoder"] == fewstep.TINY_F32  # an FP32 UNet row gets the f32 tiny decoder
    assert row["image_tiny_s"] == pytest.approx(row["image_s"] - row["vae_decode_s"] + row["tiny_decode_s"])
    md = (bench["out"] / "bench.md").read_text()
    assert "## Few-step int8 student" in md and "## Tiny VAE decoder" in md and "random-weight LCM student" in md
