"""`ov-sd bench` and optimum-intel's int8 PTQ (`ptq.py`) on tiny pipelines: every variant runs, the reports agree
with the measurements, bad input gives one-line errors.

The `--arch sd15` path is exercised with `models.build_sd15_pipeline` swapped for the tiny pipeline (the real one is
1.1 B parameters): same code (build, optimum export, PTQ, QAT graph with and without ToMe), tiny sizes."""

import json
import statistics

import pytest
from PIL import Image

from ov_sd_trainer import bench, cli, models
from ov_sd_trainer.errors import UserError

REQUIRED = ("name", "unet_step_s", "unet_bytes", "speedup_vs_pytorch_fp32")
FAST = ["--threads", "1", "--repeats", "2", "--pipeline-repeats", "1", "--steps-pipeline", "2", "--warmup", "1"]


def _tiny_sd15(output_dir=None, seed=0):
    return models.build_tiny_pipeline(output_dir, models.TinySDConfig(seed=seed))


def _rows(result):
    return {r["id"]: r for r in result["variants"]}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """`ov-sd bench --model TINY --profile` with every variant: (a)-(e) apply, (f)/(g) need --qat/--qat-tome."""
    root = tmp_path_factory.mktemp("bench")
    _tiny_sd15(root / "pipe", seed=1)
    argv = ["bench", "--model", str(root / "pipe"), "--output", str(root / "out"), "--work-dir", str(root / "work")]
    argv += FAST + ["--profile", "--ptq-samples", "2", "--ptq-steps", "1", "--variants", "a,b,c,d,e,f,g"]
    assert cli.main(argv) == 0
    result = json.loads((root / "out" / "bench.json").read_text())
    return {"root": root, "out": root / "out", "work": root / "work", "result": result}


def check_rows(result, ids):
    rows = _rows(result)
    assert sorted(rows) == list(ids), result["skipped"]
    for r in rows.values():
        for key in REQUIRED:
            assert r[key] is not None, (r["id"], key)
        assert r["name"] == bench.VARIANTS[r["id"]][0]
        assert len(r["unet_step_times_s"]) == 2
        assert r["unet_step_s"] == pytest.approx(statistics.median(r["unet_step_times_s"]), abs=1e-4)
        assert all(t > 0 for t in r["unet_step_times_s"])
        assert r["pipeline_s"] > 0 and r["pipeline_steps"] == 2
        assert r["load_compile_s"] > 0
        assert r["peak_rss_bytes"] >= r["rss_start_bytes"] > 100 * 2**20
        assert r["total_bytes"] > r["unet_bytes"] > 0
    a = rows.get("a")
    e = rows.get("e")
    for r in rows.values():
        if a:
            assert r["speedup_vs_pytorch_fp32"] == pytest.approx(a["unet_step_s"] / r["unet_step_s"])
            assert r["pipeline_speedup_vs_pytorch_fp32"] == pytest.approx(a["pipeline_s"] / r["pipeline_s"])
        if e:
            assert r["speedup_vs_optimum_int8"] == pytest.approx(e["unet_step_s"] / r["unet_step_s"])
    return rows


def test_all_applicable_variants_run(local_run):
    result = local_run["result"]
    rows = check_rows(result, "abcde")
    assert rows["a"]["speedup_vs_pytorch_fp32"] == 1.0 and rows["e"]["speedup_vs_optimum_int8"] == 1.0
    assert set(result["skipped"]) == {"f", "g"}
    assert "--qat OV_DIR" in result["skipped"]["f"] and "--qat-tome OV_DIR" in result["skipped"]["g"]
    assert result["settings"]["height"] == result["settings"]["width"] == 64  # the model's own size
    assert rows["c"]["ov_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert rows["c"]["unet_execution"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert rows["c"]["unet_execution"]["INFERENCE_NUM_THREADS"] == "1"


def test_int8_is_smaller_and_sizes_are_consistent(local_run):
    rows = _rows(local_run["result"])
    assert rows["a"]["unet_bytes"] == rows["b"]["unet_bytes"] and rows["c"]["unet_bytes"] == rows["d"]["unet_bytes"]
    # tiny UNets keep relatively more float biases/norms (and XML) than SD 1.5, so the ratio is ~0.4 here, not 0.25
    assert rows["e"]["unet_bytes"] < 0.5 * rows["c"]["unet_bytes"]
    assert rows["e"]["unet_size_vs_fp32"] == pytest.approx(rows["e"]["unet_bytes"] / rows["a"]["unet_bytes"])
    ptq_info = json.loads((next(local_run["work"].glob("optimum-int8-ptq-*")) / "ptq_info.json").read_text())
    assert ptq_info["calibration"]["num_samples"] == 2 and ptq_info["calibration"]["steps"] == 1


def test_profile_shows_execution_precision(local_run):
    rows = _rows(local_run["result"])
    assert all("profile" not in rows[v] for v in "ab")
    for vid in "cde":
        assert rows[vid]["profile"]["total_ms"] > 0, vid
    assert "i8" not in rows["c"]["profile"]["by_precision_ms"]
    assert rows["e"]["profile"]["by_precision_ms"].get("i8", 0) > 0


def test_reports_written(local_run):
    out = local_run["out"]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png"]
    with Image.open(out / "bench.png") as im:
        assert im.format == "PNG" and im.size[0] > 600
    md = (out / "bench.md").read_text()
    for vid, (_, label) in bench.VARIANTS.items():
        assert f"({vid}) {label}" in md
    assert "omitted: pass --qat" in md and "Where the time goes" in md
    assert not list(out.parent.glob(".out.tmp-*"))  # atomic: no temporary folder left


def test_given_folders_are_measured(local_run, capsys):
    """(e)/(f) from given OpenVINO folders, (g) omitted without one. The PTQ folder stands in for a QAT export here:
    this checks that a given folder is what gets loaded and sized (QAT graphs are built in the slow --arch test)."""
    work, out = local_run["work"], local_run["root"] / "given"
    ptq = next(work.glob("optimum-int8-ptq-*"))
    argv = ["bench", "--model", str(local_run["root"] / "pipe"), "--output", str(out), "--work-dir", str(work)]
    argv += ["--variants", "pytorch-fp32,f,g,e", "--qat", str(ptq), "--ptq", str(ptq)]
    assert cli.main(argv + FAST) == 0
    result = json.loads((out / "bench.json").read_text())
    rows = check_rows(result, "aef")
    assert list(result["skipped"]) == ["g"]
    assert {rows[v]["folder"] for v in "ef"} == {str(ptq)}
    assert rows["f"]["unet_bytes"] == rows["e"]["unet_bytes"]
    assert result["preparation"]["optimum-int8-ptq"] == {"given": str(ptq)}
    assert "| (f) QAT INT8 (this project) |" in capsys.readouterr().out


@pytest.mark.slow
def test_arch_sd15_path_builds_qat_and_tome_graphs(tmp_path):
    """`--arch sd15` with `models.build_sd15_pipeline` swapped for the tiny pipeline (the real one is 1.1 B
    parameters): the same code builds the optimum export, the PTQ peer and the QAT graphs with and without ToMe."""
    argv = ["bench", "--arch", "sd15", "--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    argv += FAST + ["--profile", "--ptq-samples", "2", "--ptq-steps", "1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "build_sd15_pipeline", _tiny_sd15)
        assert cli.main(argv) == 0
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = check_rows(result, "abcdefg")
    assert result["skipped"] == {}
    for vid in "efg":
        assert rows[vid]["unet_bytes"] < 0.5 * rows["c"]["unet_bytes"], vid
        assert rows[vid]["profile"]["by_precision_ms"].get("i8", 0) > 0, vid
    merge_types = set(bench.MERGE_OP_TYPES)
    f_types = {t["node_type"] for t in rows["f"]["profile"]["by_type"]}
    g_types = {t["node_type"] for t in rows["g"]["profile"]["by_type"]}
    assert not f_types & merge_types and g_types & merge_types  # only the ToMe graph merges tokens
    assert result["preparation"]["qat-int8-tome"]["tome"]["ratio"] == 0.4
    targets = {t["target"]: t for t in result["targets"]}
    assert set(targets) == set(bench.TARGETS)
    assert targets["qat_int8_vs_pytorch_fp32"]["met"] == (rows["f"]["speedup_vs_pytorch_fp32"] >= 3.9)
    assert "untrained random weights" in (tmp_path / "out" / "bench.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "/nonexistent/pipeline"], "does not exist"),
        (["--arch", "sd15", "--variants", "a,zz"], "unknown variant 'zz'"),
        (["--arch", "sd15", "--batch-size", "3"], "must be even"),
        (["--arch", "sd15", "--repeats", "0"], "--repeats must be a positive integer"),
        (["--arch", "sd15", "--pipeline-repeats", "0"], "--pipeline-repeats must be a positive integer"),
        (["--arch", "sd15", "--height", "100"], "multiple of 8"),
        (["--arch", "sd15", "--ov-config", "NOVALUE"], "expected KEY=VALUE"),
    ],
)
def test_bad_input_one_line_errors(tmp_path, capsys, monkeypatch, extra, message):
    def must_not_build(*args, **kwargs):
        raise AssertionError("bad input must be refused before any model is built")

    monkeypatch.setattr(models, "build_sd15_pipeline", must_not_build)
    out = tmp_path / "out"
    assert cli.main(["bench", "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ov-sd: error: ") and message in err and "\n" not in err, err
    assert not out.exists()


def test_bad_folders_fail_before_any_work(tmp_path, capsys):
    pipe = tmp_path / "pipe"
    _tiny_sd15(pipe)
    not_ov = tmp_path / "not_ov"
    not_ov.mkdir()
    for flag in ("--qat", "--qat-tome", "--ptq"):
        argv = ["bench", "--model", str(pipe), "--output", str(tmp_path / "o"), flag, str(not_ov)]
        assert cli.main(argv) == 2
        assert "is not an OpenVINO pipeline folder" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert cli.main(["bench", "--model", str(pipe), "--output", str(tmp_path / "full")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["bench", "--model", str(tmp_path / "not_ov"), "--output", str(tmp_path / "o")]) == 2
    assert "model_index.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --model and --arch are exclusive
        cli.main(["bench", "--model", str(pipe), "--arch", "sd15", "--output", str(tmp_path / "o")])


def test_bf16_is_skipped_by_default_only_without_bf16_instructions():
    avx2 = {"isa": ["avx2"], "openvino_cpu_capabilities": ["FP32", "INT8"]}
    amx = {"isa": ["avx2", "avx512f", "amx_bf16"], "openvino_cpu_capabilities": ["FP32", "BF16", "INT8"]}
    assert "no bf16 instructions" in bench.default_skips(list("abcdefg"), explicit=False, machine=avx2)["b"]
    assert bench.default_skips(list("abcdefg"), explicit=True, machine=avx2) == {}  # named: measured anyway
    assert bench.default_skips(list("abcdefg"), explicit=False, machine=amx) == {}
    assert bench.default_skips(list("acd"), explicit=False, machine=avx2) == {}


def test_parse_variants():
    assert bench.parse_variants(None) == list("abcdefg")
    assert bench.parse_variants("g,a, optimum-int8-ptq,a") == ["a", "e", "g"]
    with pytest.raises(UserError, match="unknown variant"):
        bench.parse_variants("h")


def test_exec_precision():
    assert bench.exec_precision("jit_avx2_I8") == "i8"
    assert bench.exec_precision("brgemm_avx512_amx_bf16") == "bf16"
    assert bench.exec_precision("ref_any_f32") == "f32"
    assert bench.exec_precision("undef") == "other"


# --------------------------------------------------------------------------------------------------------------------
# ptq.py: optimum-intel's full-int8 PTQ of the UNet
# --------------------------------------------------------------------------------------------------------------------


def test_ptq_writes_a_loadable_int8_pipeline(local_run, tmp_path):
    """The PTQ folder the bench built with `quantize_pipeline_int8` (2 calibration calls, 1 step): optimum's full int8
    on the UNet only, settings recorded, loadable by `OVStableDiffusionPipeline`, not quantized twice."""
    import numpy as np
    import openvino as ov
    from optimum.intel import OVStableDiffusionPipeline

    from ov_sd_trainer import quantization
    from ov_sd_trainer.ptq import INFO_FILE, quantize_pipeline_int8

    out = next(local_run["work"].glob("optimum-int8-ptq-*"))
    info = json.loads((out / INFO_FILE).read_text())
    assert info["calibration"]["num_samples"] == 2 and info["quantization"]["subset_size"] == 2
    assert info["calibration"]["height"] == info["calibration"]["width"] == 64
    assert info["quantization"]["preset"] == "mixed" and info["quantization"]["model_type"] == "transformer"
    unet = ov.Core().read_model(out / "unet" / "openvino_model.xml")
    assert quantization.count_fake_quantize(unet) == info["fake_quantize_ops"] > 50
    assert quantization.count_int8_constants(unet) > 50
    assert "quantization" in unet.get_rt_info()["nncf"]
    text = ov.Core().read_model(out / "text_encoder" / "openvino_model.xml")
    assert quantization.count_int8_constants(text) == 0  # other_components="fp32": left as optimum exports it
    assert info["unet_bytes"] == (out / "unet" / "openvino_model.bin").stat().st_size
    pipe = OVStableDiffusionPipeline.from_pretrained(out, compile=False, ov_config={"INFERENCE_NUM_THREADS": 1})
    pipe.reshape(batch_size=1, height=64, width=64, num_images_per_prompt=1)
    pipe.compile()
    image = pipe("a red circle", num_inference_steps=2, generator=np.random.RandomState(0)).images[0]
    assert image.size == (64, 64)
    with pytest.raises(UserError, match="already quantized"):  # PTQ of a PTQ pipeline: refused before any work
        quantize_pipeline_int8(out, tmp_path / "again", ["a"])
    assert not (tmp_path / "again").exists()


def test_ptq_bad_input(tmp_path):
    from ov_sd_trainer.ptq import quantize_pipeline_int8

    with pytest.raises(UserError, match="calibration_prompts is empty"):
        quantize_pipeline_int8(tmp_path, tmp_path / "o", [])
    with pytest.raises(UserError, match="list of prompt strings"):
        quantize_pipeline_int8(tmp_path, tmp_path / "o", "a prompt")
    with pytest.raises(UserError, match="num_samples"):
        quantize_pipeline_int8(tmp_path, tmp_path / "o", ["a"], num_samples=0)
    with pytest.raises(UserError, match="other_components"):
        quantize_pipeline_int8(tmp_path, tmp_path / "o", ["a"], other_components="int4")
    with pytest.raises(UserError, match="does not exist"):
        quantize_pipeline_int8(str(tmp_path / "missing"), tmp_path / "o", ["a"])
    assert not (tmp_path / "o").exists()
