"""`ov-sd bench` and optimum-intel's int8 PTQ peers (`eval/ptq.py`) on tiny pipelines: every variant runs, the
reports agree with the measurements, bad input gives one-line errors.

The `--arch sd15` path is exercised with `builders.build_sd15_pipeline` swapped for the tiny pipeline (the real one is
1.1 B parameters): same code (build, optimum export, PTQ, QAT graph with and without ToMe), tiny sizes."""

import json
import statistics

import pytest
from PIL import Image

from ov_sd_trainer import cli
from ov_sd_trainer.assets import builders
from ov_sd_trainer.errors import UserError
from ov_sd_trainer.eval.bench import measure, report, run, variants

REQUIRED = ("name", "unet_step_s", "unet_bytes", "speedup_vs_pytorch_fp32")
# the variants, in registry order
A, B, C, D, H, E, F, FH, G = (v.name for v in variants.VARIANTS)
ALL = [A, B, C, D, H, E, F, FH, G]
FAST = ["--threads", "1", "--repeats", "2", "--pipeline-repeats", "1", "--steps-pipeline", "2", "--warmup", "1"]


def _tiny_sd15(output_dir=None, seed=0):
    return builders.build_tiny_pipeline(output_dir, builders.TinySDConfig(seed=seed))


def _rows(result):
    return {r["name"]: r for r in result["variants"]}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """`ov-sd bench --model TINY --profile` with every variant: all but the QAT ones apply (they need --qat/--qat-tome)."""
    root = tmp_path_factory.mktemp("bench")
    _tiny_sd15(root / "pipe", seed=1)
    argv = ["bench", "--model", str(root / "pipe"), "--output", str(root / "out"), "--work-dir", str(root / "work")]
    argv += FAST + ["--profile", "--ptq-samples", "2", "--ptq-steps", "1", "--variants", ",".join(ALL)]
    assert cli.main(argv) == 0
    result = json.loads((root / "out" / "bench.json").read_text())
    return {"root": root, "out": root / "out", "work": root / "work", "result": result}


def check_rows(result, ids):
    rows = _rows(result)
    assert list(rows) == [n for n in ALL if n in ids], result["skipped"]
    for r in rows.values():
        for key in REQUIRED:
            assert r[key] is not None, (r["name"], key)
        assert r["label"] == variants.BY_NAME[r["name"]].label
        assert len(r["unet_step_times_s"]) == 2
        assert r["unet_step_s"] == pytest.approx(statistics.median(r["unet_step_times_s"]), abs=1e-4)
        assert all(t > 0 for t in r["unet_step_times_s"])
        assert r["pipeline_s"] > 0 and r["pipeline_steps"] == 2
        assert r["load_compile_s"] > 0
        assert r["peak_rss_bytes"] >= r["rss_start_bytes"] > 100 * 2**20
        assert r["total_bytes"] > r["unet_bytes"] > 0
    a, e, h = rows.get(A), rows.get(E), rows.get(H)
    for r in rows.values():
        if a:
            assert r["speedup_vs_pytorch_fp32"] == pytest.approx(a["unet_step_s"] / r["unet_step_s"])
            assert r["pipeline_speedup_vs_pytorch_fp32"] == pytest.approx(a["pipeline_s"] / r["pipeline_s"])
        if e:
            assert r["speedup_vs_optimum_int8"] == pytest.approx(e["unet_step_s"] / r["unet_step_s"])
        if h:
            assert r["speedup_vs_optimum_hybrid"] == pytest.approx(h["unet_step_s"] / r["unet_step_s"])
    return rows


def test_all_applicable_variants_run(local_run):
    result = local_run["result"]
    rows = check_rows(result, [A, B, C, D, H, E])
    assert rows[A]["speedup_vs_pytorch_fp32"] == 1.0 and rows[E]["speedup_vs_optimum_int8"] == 1.0
    assert rows[H]["speedup_vs_optimum_hybrid"] == 1.0
    assert set(result["skipped"]) == {F, FH, G}
    assert "--qat OV_DIR" in result["skipped"][F] and "--qat-tome OV_DIR" in result["skipped"][G]
    assert "--qat-hybrid OV_DIR" in result["skipped"][FH]
    assert result["settings"]["height"] == result["settings"]["width"] == 64  # the model's own size
    assert rows[C]["ov_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert rows[C]["unet_execution"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert rows[C]["unet_execution"]["INFERENCE_NUM_THREADS"] == "1"


def test_int8_is_smaller_and_sizes_are_consistent(local_run):
    rows = _rows(local_run["result"])
    assert rows[A]["unet_bytes"] == rows[B]["unet_bytes"] and rows[C]["unet_bytes"] == rows[D]["unet_bytes"]
    # tiny UNets keep relatively more float biases/norms (and XML) than SD 1.5, so the ratio is ~0.4 here, not 0.25
    for peer in (E, H):  # both PTQ peers store int8 weights
        assert rows[peer]["unet_bytes"] < 0.5 * rows[C]["unet_bytes"], peer
        assert rows[peer]["unet_size_vs_fp32"] == pytest.approx(rows[peer]["unet_bytes"] / rows[A]["unet_bytes"])
    for mode in ("full", "hybrid"):
        ptq_info = json.loads((next(local_run["work"].glob(f"optimum-{mode}-ptq-*")) / "ptq_info.json").read_text())
        assert ptq_info["calibration"]["num_samples"] == 2 and ptq_info["calibration"]["steps"] == 1
        assert ptq_info["mode"] == mode


def test_profile_shows_execution_precision(local_run):
    rows = _rows(local_run["result"])
    assert all("profile" not in rows[v] for v in (A, B))
    for name in (C, D, H, E):
        assert rows[name]["profile"]["total_ms"] > 0, name
    assert "i8" not in rows[C]["profile"]["by_precision_ms"]
    assert rows[E]["profile"]["by_precision_ms"].get("i8", 0) > 0
    assert rows[H]["profile"]["by_precision_ms"].get("i8", 0) > 0  # hybrid: the convolutions run int8


def test_reports_written(local_run):
    out = local_run["out"]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png"]
    with Image.open(out / "bench.png") as im:
        assert im.format == "PNG" and im.size[0] > 600
    md = (out / "bench.md").read_text()
    for v in variants.VARIANTS:
        assert f"{v.name}: {v.label}" in md
    assert "omitted: pass --qat" in md and "Where the time goes" in md
    assert not list(out.parent.glob(".out.tmp-*"))  # atomic: no temporary folder left


def test_given_folders_are_measured(local_run, capsys):
    """The full-int8 peer and qat-int8 from given OpenVINO folders, qat-int8-tome omitted without one. The PTQ folder
    stands in for a QAT export here: this checks that a given folder is what gets loaded and sized (QAT graphs are
    built in the slow --arch test)."""
    work, out = local_run["work"], local_run["root"] / "given"
    ptq = next(work.glob("optimum-full-ptq-*"))
    argv = ["bench", "--model", str(local_run["root"] / "pipe"), "--output", str(out), "--work-dir", str(work)]
    argv += ["--variants", f"{A},{F},{G},{E}", "--qat", str(ptq), "--ptq", str(ptq)]
    assert cli.main(argv + FAST) == 0
    result = json.loads((out / "bench.json").read_text())
    rows = check_rows(result, [A, E, F])
    assert list(result["skipped"]) == [G]
    assert {rows[v]["folder"] for v in (E, F)} == {str(ptq)}
    assert rows[F]["unet_bytes"] == rows[E]["unet_bytes"]
    assert result["preparation"]["ptq-full"] == {"given": str(ptq)}
    assert f"| {F}: QAT INT8 (this project) |" in capsys.readouterr().out


@pytest.mark.slow
def test_arch_sd15_path_builds_qat_and_tome_graphs(tmp_path):
    """`--arch sd15` with `builders.build_sd15_pipeline` swapped for the tiny pipeline (the real one is 1.1 B
    parameters): the same code builds the optimum export, the PTQ peer and the QAT graphs with and without ToMe."""
    argv = ["bench", "--arch", "sd15", "--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    argv += FAST + ["--profile", "--ptq-samples", "2", "--ptq-steps", "1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builders, "build_sd15_pipeline", _tiny_sd15)
        assert cli.main(argv) == 0
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = check_rows(result, ALL)
    assert result["skipped"] == {}
    for name in (H, E, F, FH, G):
        assert rows[name]["unet_bytes"] < 0.5 * rows[C]["unet_bytes"], name
        assert rows[name]["profile"]["by_precision_ms"].get("i8", 0) > 0, name
    merge_types = set(measure.MERGE_OP_TYPES)
    f_types = {t["node_type"] for t in rows[F]["profile"]["by_type"]}
    g_types = {t["node_type"] for t in rows[G]["profile"]["by_type"]}
    assert not f_types & merge_types and g_types & merge_types  # only the ToMe graph merges tokens
    assert result["preparation"]["qat-int8-tome"]["tome"]["ratio"] == 0.4
    targets = {t["target"]: t for t in result["targets"]}
    assert set(targets) == {t[0] for t in report.TARGETS}
    assert targets["qat_int8_vs_pytorch_fp32"]["met"] == (rows[F]["speedup_vs_pytorch_fp32"] >= 3.9)
    assert "untrained random weights" in (tmp_path / "out" / "bench.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "/nonexistent/pipeline"], "does not exist"),
        (["--arch", "sd15", "--variants", "pytorch-fp32,zz"], "unknown variant 'zz'"),
        (["--arch", "sd15", "--variants", "a"], "unknown variant 'a'"),  # the old letter ids are gone
        (["--arch", "sd15", "--tome-ratio", "0.9"], "--tome-ratio=0.9: must be between 0 and 0.75"),
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

    monkeypatch.setattr(builders, "build_sd15_pipeline", must_not_build)
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
    for flag in ("--qat", "--qat-hybrid", "--qat-tome", "--ptq", "--ptq-hybrid"):
        argv = ["bench", "--model", str(pipe), "--output", str(tmp_path / "o"), flag, str(not_ov)]
        assert cli.main(argv) == 2
        assert "is not an OpenVINO pipeline folder" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert cli.main(["bench", "--model", str(pipe), "--output", str(tmp_path / "full")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["bench", "--model", str(tmp_path / "not_ov"), "--output", str(tmp_path / "o")]) == 2
    assert "model_index.json" in capsys.readouterr().err
    # argparse's own errors take the same one-line path: --model and --arch are exclusive
    assert cli.main(["bench", "--model", str(pipe), "--arch", "sd15", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ov-sd: error: argument --arch: not allowed with argument --model") and "\n" not in err


def test_bf16_is_skipped_by_default_only_without_bf16_instructions():
    avx2 = {"isa": ["avx2"], "openvino_cpu_capabilities": ["FP32", "INT8"]}
    amx = {"isa": ["avx2", "avx512f", "amx_bf16"], "openvino_cpu_capabilities": ["FP32", "BF16", "INT8"]}
    assert "no bf16 instructions" in run.default_skips(ALL, explicit=False, machine=avx2)[B]
    assert run.default_skips(ALL, explicit=True, machine=avx2) == {}  # named: measured anyway
    assert run.default_skips(ALL, explicit=False, machine=amx) == {}
    assert run.default_skips([A, C, D], explicit=False, machine=avx2) == {}


def test_parse_variants():
    assert variants.parse_variants(None) == ALL
    assert variants.parse_variants(f"{G},{A}, optimum-int8-ptq,{A}") == [A, E, G]  # registry order, once each
    with pytest.raises(UserError, match="unknown variant"):
        variants.parse_variants("h")
    with pytest.raises(UserError, match="is empty"):
        variants.parse_variants(" , ")


def test_exec_precision():
    assert measure.exec_precision("jit_avx2_I8") == "i8"
    assert measure.exec_precision("brgemm_avx512_amx_bf16") == "bf16"
    assert measure.exec_precision("ref_any_f32") == "f32"
    assert measure.exec_precision("undef") == "other"


# --------------------------------------------------------------------------------------------------------------------
# eval/ptq.py: optimum-intel's PTQ of the UNet (full int8 and hybrid)
# --------------------------------------------------------------------------------------------------------------------


def test_ptq_writes_a_loadable_int8_pipeline(local_run, tmp_path):
    """The PTQ folder the bench built with `quantize_pipeline_int8` (2 calibration calls, 1 step): optimum's full int8
    on the UNet only, settings recorded, loadable by `OVStableDiffusionPipeline`, not quantized twice."""
    import numpy as np
    import openvino as ov
    from optimum.intel import OVStableDiffusionPipeline

    from ov_sd_trainer.compress import convert
    from ov_sd_trainer.eval.ptq import quantize_pipeline_int8
    from ov_sd_trainer.pipeline_folder import PTQ_INFO_FILE, SCHEDULER_CONFIG, has_openvino_tokenizer

    out = next(local_run["work"].glob("optimum-full-ptq-*"))
    info = json.loads((out / PTQ_INFO_FILE).read_text())
    assert has_openvino_tokenizer(out)  # ready for OpenVINO GenAI, as `ov-sd export` folders are
    assert json.loads((out / SCHEDULER_CONFIG).read_text())["trained_betas"]
    assert info["calibration"]["num_samples"] == 2 and info["quantization"]["subset_size"] == 2
    assert info["calibration"]["height"] == info["calibration"]["width"] == 64
    assert info["quantization"]["preset"] == "mixed" and info["quantization"]["model_type"] == "transformer"
    unet = ov.Core().read_model(out / "unet" / "openvino_model.xml")
    assert convert.count_fake_quantize(unet) == info["fake_quantize_ops"] > 50
    assert convert.count_int8_constants(unet) > 50
    assert "quantization" in unet.get_rt_info()["nncf"]
    text = ov.Core().read_model(out / "text_encoder" / "openvino_model.xml")
    assert convert.count_int8_constants(text) == 0  # other_components="fp32": left as optimum exports it
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
    from ov_sd_trainer.eval.ptq import quantize_pipeline_int8

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
    with pytest.raises(UserError, match="mode='int4'"):
        quantize_pipeline_int8(tmp_path, tmp_path / "o", ["a"], mode="int4")
    with pytest.raises(UserError, match="mode=full only"):
        quantize_pipeline_int8(tmp_path, tmp_path / "o", ["a"], mode="hybrid", smooth_quant_alpha=0.5)
    assert not (tmp_path / "o").exists()
