"""`ov-sd bench` and optimum-intel's int8 PTQ peers (`eval/ptq.py`) on tiny pipelines: every variant runs, the
reports agree with the measurements (per UNet step and per composed image), bad input gives one-line errors.

The `--arch sd15` path is exercised with `builders.build_sd15_pipeline` swapped for the tiny pipeline (the real one is
1.1 B parameters): same code (build, optimum export, PTQ, QAT graph with and without ToMe), tiny sizes. `--arch sdxl`
the same way, `builders.build_sdxl_pipeline` swapped for the tiny SDXL pipeline (`ov-sd make-tiny --family sdxl`)."""

import json
import math
import os
import shutil
import statistics
from pathlib import Path

import pytest
from PIL import Image

from ov_sd_trainer import cli
from ov_sd_trainer.assets import builders
from ov_sd_trainer.errors import UserError
from ov_sd_trainer.eval.bench import measure, report, run, variants

REQUIRED = ("name", "unet_step_s", "unet_bytes", "speedup_vs_pytorch_fp32", "text_encoder_s", "vae_decode_s")
REQUIRED += ("image_s", "image_speedup_vs_pytorch_fp32")
A, B, C, D = "pytorch-fp32", "pytorch-bf16", "openvino-fp32", "openvino-default"
H, E, F, FH, G = "optimum-hybrid-ptq", "optimum-int8-ptq", "qat-int8", "qat-int8-hybrid", "qat-int8-tome"
DC = variants.QAT_DEEPCACHE
W = variants.W8TV  # the twin with int8 text encoder and VAE weights: H + W, ...
ALL = [v.name for v in variants.VARIANTS]  # registry order
IMAGE_STEPS = (
    5  # PNDM: 6 UNet calls (the default 50 steps make 51: test_image_composition); few: every variant times it
)
FAST = ["--threads", "1", "--repeats", "2", "--pipeline-repeats", "1", "--steps-pipeline", "2", "--warmup", "1"]
FAST += ["--warmup-s", "0.1", "--image-steps", str(IMAGE_STEPS)]


def _tiny_sd15(output_dir=None, seed=0):
    return builders.build_tiny_pipeline(output_dir, builders.TinySDConfig(seed=seed))


def _tiny_sdxl(output_dir=None, seed=0):
    return builders.build_tiny_pipeline(output_dir, builders.TinySDConfig(seed=seed, family="sdxl"))


def _rows(result):
    return {r["name"]: r for r in result["variants"]}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_pipeline, fp32_export):
    """`ov-sd bench --model TINY --profile` with every variant but qat-int8-deepcache3+w8tv: all but the QAT ones
    apply (they need --qat/--qat-tome/...), and the step-caching one, given a folder with step-caching IRs (FP32
    ones, `ov-sd deepcache --fp32` on optimum's export: the measuring path is the same as for int8 IRs). The work
    folder starts with the session's FP32 export of the same model, which the bench reuses as its openvino-fp32."""
    from ov_sd_trainer.export.deepcache import add_from_diffusers

    root = tmp_path_factory.mktemp("bench")
    pipe, work, dc = tiny_pipeline, root / "work", root / "deepcache"
    shutil.copytree(fp32_export, work / "openvino-fp32")
    shutil.copytree(fp32_export, dc)
    add_from_diffusers(pipe, dc)
    argv = ["bench", "--model", str(pipe), "--output", str(root / "out"), "--work-dir", str(work)]
    argv += FAST + ["--profile", "--ptq-samples", "2", "--ptq-steps", "1", "--qat-deepcache", str(dc)]
    argv += ["--variants", ",".join(n for n in ALL if n != DC + W)]
    assert cli.main(argv) == 0
    result = json.loads((root / "out" / "bench.json").read_text())
    assert result["preparation"]["openvino-fp32 export"] == {"reused": str(work / "openvino-fp32")}
    return {"root": root, "pipe": pipe, "out": root / "out", "work": work, "deepcache": dc, "result": result}


def check_rows(result, ids, extra_calls=1):
    """`extra_calls`: UNet calls beyond the steps (PNDM, the tiny SD pipeline's: 1; EulerDiscrete, SDXL's: 0)."""
    rows = _rows(result)
    assert list(rows) == [n for n in ALL if n in ids], result["skipped"]
    for r in rows.values():
        for key in REQUIRED:
            assert r[key] is not None, (r["name"], key)
        assert r["label"] == variants.BY_NAME[r["name"]].label
        for key in ("unet_step", "text_encoder", "vae_decode"):
            times = r[f"{key}_times_s"]
            assert len(times) == 2 and all(t > 0 for t in times), (r["name"], key)
            assert r[f"{key}_s"] == pytest.approx(statistics.median(times), abs=1e-4)
        assert r["pipeline_s"] > 0 and r["pipeline_steps"] == 2 and r["unet_calls_pipeline"] == 2 + extra_calls
        check_image(r, measured=result["settings"]["measure_image"], extra_calls=extra_calls)
        assert r["load_compile_s"] > 0
        assert r["peak_rss_bytes"] >= r["rss_start_bytes"] > 100 * 2**20
        assert r["total_bytes"] > r["unet_bytes"] > 0 and r["total_bytes"] > r["text_vae_bytes"] > 0
    a, e, h = rows.get(A), rows.get(E), rows.get(H)
    for r in rows.values():
        if a:
            assert r["speedup_vs_pytorch_fp32"] == pytest.approx(a["unet_step_s"] / r["unet_step_s"])
            assert r["pipeline_speedup_vs_pytorch_fp32"] == pytest.approx(a["pipeline_s"] / r["pipeline_s"])
            assert r["image_speedup_vs_pytorch_fp32"] == pytest.approx(a["image_s"] / r["image_s"])
        if e:
            assert r["speedup_vs_optimum_int8"] == pytest.approx(e["unet_step_s"] / r["unet_step_s"])
        if h:
            assert r["speedup_vs_optimum_hybrid"] == pytest.approx(h["unet_step_s"] / r["unet_step_s"])
        for key, peer in (("image_speedup_vs_optimum_int8", E), ("image_speedup_vs_optimum_hybrid", H)):
            forms = [rows[n]["image_s"] for n in (peer, peer + W) if n in rows]  # the peer's faster form
            assert r[key] == (pytest.approx(min(forms) / r["image_s"]) if forms else None), (r["name"], key)
    return rows


def check_image(r, steps=IMAGE_STEPS, measured=True, extra_calls=1):
    """The image latency is the composition of the measured parts, and the direct measurements are there."""
    interval = variants.BY_NAME[r["name"]].cache_interval
    calls = steps + extra_calls  # PNDM with skip_prk_steps (the tiny SD pipeline's, as SD 1.5's): steps + 1
    full = math.ceil(calls / interval)
    assert (r["unet_calls_per_image"], r["unet_calls_full"], r["unet_calls_shallow"]) == (calls, full, calls - full)
    assert r["cache_interval"] == interval and (r["shallow_step_s"] is not None) == (interval > 1)
    shallow = r["shallow_step_s"] or 0.0
    parts = r["text_encoder_s"] + r["vae_decode_s"]
    assert r["image_s"] == pytest.approx(parts + full * r["unet_step_s"] + (calls - full) * shallow)
    calls_k = 2 + extra_calls  # the K = 2-step pipeline
    full_k = math.ceil(calls_k / interval)
    composed_k = parts + full_k * r["unet_step_s"] + (calls_k - full_k) * shallow
    assert r["pipeline_composed_s"] == pytest.approx(composed_k)
    assert r["pipeline_composed_vs_measured"] == pytest.approx(composed_k / r["pipeline_s"])
    if measured:
        assert r["image_measured_s"] > 0 and r["image_steps"] == steps
        assert r["image_composed_vs_measured"] == pytest.approx(r["image_s"] / r["image_measured_s"])
        assert r["overhead_s_per_call"] == pytest.approx((r["image_measured_s"] - r["image_s"]) / calls)
    else:
        assert r["image_measured_s"] is None and r["image_measured_times_s"] == []


@pytest.mark.slow  # every test of the 9-variant bench (`local_run`, ~100 s) is slow: CI runs them
def test_all_applicable_variants_run(local_run):
    result = local_run["result"]
    rows = check_rows(result, [A, B, C, D, H, H + W, E, E + W, DC])
    assert rows[A]["speedup_vs_pytorch_fp32"] == 1.0 and rows[E]["speedup_vs_optimum_int8"] == 1.0
    assert rows[H]["speedup_vs_optimum_hybrid"] == 1.0
    assert set(result["skipped"]) == {F, FH, G} | {n + W for n in (F, FH, G)}
    assert "--qat OV_DIR" in result["skipped"][F] and "--qat-tome OV_DIR" in result["skipped"][G]
    assert "--qat-hybrid OV_DIR" in result["skipped"][FH] and "--qat OV_DIR" in result["skipped"][F + W]
    assert result["settings"]["height"] == result["settings"]["width"] == 64  # the model's own size
    assert rows[C]["ov_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert rows[C]["unet_execution"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert rows[C]["unet_execution"]["INFERENCE_NUM_THREADS"] == "1"


@pytest.mark.slow
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


@pytest.mark.slow
def test_profile_shows_execution_precision(local_run):
    rows = _rows(local_run["result"])
    assert all("profile" not in rows[v] for v in (A, B))
    for name in (C, D, H, E):
        assert rows[name]["profile"]["total_ms"] > 0, name
    assert "i8" not in rows[C]["profile"]["by_precision_ms"]
    assert rows[E]["profile"]["by_precision_ms"].get("i8", 0) > 0
    assert rows[H]["profile"]["by_precision_ms"].get("i8", 0) > 0  # hybrid: the convolutions run int8


@pytest.mark.slow
def test_reports_written(local_run):
    out = local_run["out"]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png"]
    with Image.open(out / "bench.png") as im:
        assert im.format == "PNG" and im.size[0] > 600
    md = (out / "bench.md").read_text()
    for v in variants.VARIANTS:
        assert (f"{v.name}: {v.label}" in md) == (v.name != DC + W), v.name  # every one asked for has its row
    assert "omitted: pass --qat" in md and "Where the time goes" in md
    assert f"## One {IMAGE_STEPS}-step image, composed from measured parts" in md
    assert "**composed from parts measured on their own**" in md and "timed directly" in md
    assert f"| {E}{W} | " in md and "## int8 text encoder and VAE weights" in md
    assert "CPU instruction set: " in md and "VNNI: " in md  # every speed figure names the instruction set
    assert not list(out.parent.glob(".out.tmp-*"))  # atomic: no temporary folder left


@pytest.mark.slow
def test_given_folders_are_measured(local_run, capsys):
    """The full-int8 peer and qat-int8 from given OpenVINO folders, qat-int8-tome omitted without one. The PTQ folder
    stands in for a QAT export here: this checks that a given folder is what gets loaded and sized (QAT graphs are
    built in the slow --arch test)."""
    work, out = local_run["work"], local_run["root"] / "given"
    ptq = next(work.glob("optimum-full-ptq-*"))
    argv = ["bench", "--model", str(local_run["pipe"]), "--output", str(out), "--work-dir", str(work)]
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
def test_int8_text_vae_twins(local_run):
    """A `+w8tv` twin: its base folder with the text encoder and VAE compressed to int8 weights (optimum-intel's
    weight-only bits=8), everything else hard-linked; the report compares each twin with its base."""
    import openvino as ov

    from ov_sd_trainer.compress.convert import count_int8_constants

    result, work = local_run["result"], local_run["work"]
    rows = _rows(result)
    for peer, mode in ((E, "full"), (H, "hybrid")):
        base, twin = (Path(rows[n]["folder"]) for n in (peer, peer + W))
        assert base.parent == twin.parent == work and twin.name == base.name + "-w8tv"
        assert result["preparation"][variants.BY_NAME[peer + W].folder_key]["base"] == str(base)
        for name in ("text_encoder", "vae_decoder", "vae_encoder"):
            xml = "openvino_model.xml"
            assert count_int8_constants(ov.Core().read_model(base / name / xml)) == 0, name
            assert count_int8_constants(ov.Core().read_model(twin / name / xml)) > 0, name
        for f in ("unet/openvino_model.bin", "unet/openvino_model.xml", "scheduler/scheduler_config.json"):
            assert os.path.samefile(base / f, twin / f)  # the same UNet: a hard link
        assert rows[peer + W]["unet_bytes"] == rows[peer]["unet_bytes"]
        assert rows[peer + W]["text_vae_bytes"] < 0.5 * rows[peer]["text_vae_bytes"], mode
    pairs = {p["twin"]: p for p in result["int8_text_vae"]}
    assert set(pairs) == {E + W, H + W}
    p, b, t = pairs[E + W], rows[E], rows[E + W]
    saved = b["text_encoder_s"] + b["vae_decode_s"] - t["text_encoder_s"] - t["vae_decode_s"]
    assert p["base"] == E and p["saved_s"] == pytest.approx(saved)
    assert p["image_s"] == pytest.approx([b["image_s"], b["image_s"] - saved])
    assert result["image_baselines"]["image_speedup_vs_optimum_int8"] in (E, E + W)


@pytest.mark.slow
def test_step_caching_variant(local_run, tmp_path, capsys):
    """qat-int8-deepcache3 (from the given folder): the full IR is the step, the shallow IR is timed too, 6 UNet
    calls split 2 full + 4 shallow; a `--qat` folder holding the IRs serves it too; a folder without them is
    refused in one line; its `+w8tv` twin keeps the IRs (hard links)."""
    from ov_sd_trainer.eval.bench import prepare, settings
    from ov_sd_trainer.export.deepcache import FULL_XML, SHALLOW_XML

    result, dc = local_run["result"], local_run["deepcache"]
    row = _rows(result)[DC]
    assert row["folder"] == str(dc) and result["preparation"]["qat-deepcache"] == {"given": str(dc)}
    assert row["cache_interval"] == 3 and (row["unet_calls_full"], row["unet_calls_shallow"]) == (2, 4)  # calls 0, 3
    assert row["shallow_step_s"] > 0 and len(row["shallow_step_times_s"]) == 2
    assert row["profile"]["total_ms"] > 0  # the full IR's counters
    md = (local_run["out"] / "bench.md").read_text()
    assert f"| {DC} | " in md and "| 2 + 4 |" in md and "UNet s/step is the full IR's call" in md

    prep = prepare.prepare([DC], settings.BenchSettings(), local_run["work"], model=str(local_run["pipe"]),
                           given={"qat": dc}, progress=False)  # fmt: skip
    assert prep.folders["qat-deepcache"] == dc and prep.log["qat-deepcache"] == {"given": str(dc)}
    twin = tmp_path / "twin"
    twin.mkdir()
    info = prepare.int8_text_vae_folder(dc, twin)
    assert info["text_encoder"]["bin_bytes"] < info["text_encoder"]["bin_bytes_before"]
    for xml in (FULL_XML, SHALLOW_XML):
        assert os.path.samefile(dc / xml, twin / xml) and os.path.samefile(
            dc / xml.with_suffix(".bin"), twin / xml.with_suffix(".bin")
        )
    argv = ["bench", "--model", str(local_run["pipe"]), "--output", str(tmp_path / "o")]
    assert cli.main(argv + ["--qat-deepcache", str(local_run["work"] / "openvino-fp32")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no step-caching IRs" in err and "ov-sd deepcache --run" in err and "\n" not in err


def test_image_composition():
    """The 50-step image of SD 1.5's scheduler (PNDM) is 51 UNet calls; step caching splits them; the ratios divide
    by the peer's faster form; the per-image targets take the fastest QAT variant."""
    from diffusers import PNDMScheduler

    assert measure.unet_calls(PNDMScheduler(skip_prk_steps=True), 50) == 51
    assert measure.split_calls(51, 1) == (51, 0) and measure.split_calls(51, 3) == (17, 34)
    parts = {"text_encoder_s": 0.5, "unet_step_s": 3.0, "shallow_step_s": 1.5, "vae_decode_s": 4.0}
    assert measure.compose(parts, 51, 3) == pytest.approx(0.5 + 17 * 3.0 + 34 * 1.5 + 4.0)
    assert measure.compose({**parts, "shallow_step_s": None}, 51, 1) == pytest.approx(0.5 + 51 * 3.0 + 4.0)

    def row(name, image_s):
        return {"name": name, "image_s": image_s, "unet_step_s": 1.0, "pipeline_s": None, "unet_bytes": 1}

    rows = [row(A, 400.0), row(H, 200.0), row(H + W, 190.0), row(E, 150.0), row(F, 120.0), row(DC, 90.0)]
    rows.append(row(DC + W, 80.0))
    report.add_ratios(rows)
    by = _rows({"variants": rows})
    assert by[DC + W]["image_speedup_vs_pytorch_fp32"] == pytest.approx(5.0)
    assert by[DC + W]["image_speedup_vs_optimum_hybrid"] == pytest.approx(190 / 80)  # the faster hybrid form
    assert by[DC + W]["image_speedup_vs_optimum_int8"] == pytest.approx(150 / 80)  # only one int8 form measured
    targets = {t["target"]: t for t in report.check_targets(rows)}
    image = targets["best_int8_image_vs_optimum_int8"]
    assert image["variant"] == DC + W and image["measured"] == 1.875 and image["met"] and image["goal"] == 1.3
    assert not targets["best_int8_image_vs_pytorch_fp32"]["met"]  # 5.0 < 6.0
    avx2 = {"isa": ["avx2"], "openvino_cpu_capabilities": ["FP32", "INT8"]}
    vnni = {"isa": ["avx2", "avx512f", "avx512_vnni"], "openvino_cpu_capabilities": ["FP32", "INT8"]}
    assert report.isa_summary(avx2) == "AVX2 (VNNI: no, AMX: no, bf16: no)"
    assert "AVX512-VNNI (VNNI: yes" in report.isa_summary(vnni)
    settings = {"height": 512, "width": 512, "batch_size": 2}
    result = {"arch": "sd15", "source": "--arch sd15", "settings": settings, "machine": vnni}
    assert report.image_target_differences(result) == []
    differences = report.image_target_differences({**result, "machine": avx2})
    assert len(differences) == 1 and "no VNNI" in differences[0]


@pytest.mark.slow
def test_arch_sd15_path_builds_qat_and_tome_graphs(local_run, tmp_path):
    """`--arch sd15` with `builders.build_sd15_pipeline` swapped for the tiny pipeline (the real one is 1.1 B
    parameters): the same code builds the QAT graphs with and without ToMe and step caching, and their int8 text/VAE
    twins. The optimum export, the PTQ peers and their twins are the work folder's cache: `local_run` built them from
    the same tiny pipeline (seed 0) with the same code and settings, so they are copied in and reused, not built
    twice."""
    work = tmp_path / "work"
    reused = [d for d in local_run["work"].iterdir() if d.name == "openvino-fp32" or d.name.startswith("optimum-")]
    assert len(reused) == 5, reused  # the FP32 export, both PTQ peers and their +w8tv twins
    for d in reused:
        shutil.copytree(d, work / d.name)
    argv = ["bench", "--arch", "sd15", "--output", str(tmp_path / "out"), "--work-dir", str(work)]
    # the few-step rows (on by default with --arch sd15: test_arch_defaults) are tests/eval/test_bench_fewstep.py's
    argv += FAST + ["--profile", "--ptq-samples", "2", "--ptq-steps", "1", "--no-few-step"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builders, "build_sd15_pipeline", _tiny_sd15)
        assert cli.main(argv) == 0
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    prep = result["preparation"]
    assert prep["openvino-fp32 export"] == {"reused": str(work / "openvino-fp32")}
    for source in ("ptq-hybrid", "ptq-full", "qat", "qat-hybrid", "qat-tome"):
        want = "reused" if source.startswith("ptq") else "build_s"
        assert want in prep[source] and want in prep[source + W], (source, prep[source], prep[source + W])
    # a default run leaves PyTorch bf16 out on a CPU without bf16 instructions (an AVX2-only host), and only then
    skipped = run.default_skips(ALL, False, result["machine"])
    assert result["skipped"] == skipped
    rows = check_rows(result, [n for n in ALL if n not in skipped])
    for name in (H, E, F, FH, G, DC):
        for n in (name, name + W):
            assert rows[n]["unet_bytes"] < 0.5 * rows[C]["unet_bytes"], n
            assert rows[n]["profile"]["by_precision_ms"].get("i8", 0) > 0, n
        assert rows[name + W]["text_vae_bytes"] < 0.5 * rows[name]["text_vae_bytes"], name
    assert result["settings"]["measure_image"] is False  # sd15: composed only, by default
    assert rows[DC]["shallow_step_s"] > 0 and rows[DC]["unet_calls_full"] == 2
    # one QAT graph for both: qat-int8's folder holds the step-caching IRs
    assert result["preparation"]["qat-deepcache"]["shared with"] == "qat" and rows[DC]["folder"] == rows[F]["folder"]
    deepcache = result["preparation"]["qat-deepcache"]["deepcache"]
    assert deepcache["full_vs_unet_relative_l2"] < 1e-3  # the full IR is the plain QAT UNet
    assert deepcache["irs"]["shallow.xml"]["fake_quantize_ops"] > 0
    merge_types = set(measure.MERGE_OP_TYPES)
    f_types = {t["node_type"] for t in rows[F]["profile"]["by_type"]}
    g_types = {t["node_type"] for t in rows[G]["profile"]["by_type"]}
    assert not f_types & merge_types and g_types & merge_types  # only the ToMe graph merges tokens
    assert result["preparation"]["qat-tome"]["tome"]["ratio"] == 0.4
    targets = {t["target"]: t for t in result["targets"]}
    assert set(targets) == {t[0] for t in report.TARGETS + report.IMAGE_TARGETS}
    assert targets["qat_int8_vs_pytorch_fp32"]["met"] == (rows[F]["speedup_vs_pytorch_fp32"] >= 3.9)
    best = min((r for r in rows.values() if r["name"].startswith("qat")), key=lambda r: r["image_s"])
    assert targets["best_int8_image_vs_optimum_int8"]["variant"] == best["name"]
    assert "untrained random weights" in (tmp_path / "out" / "bench.md").read_text()


SDXL_ARGV = ["bench", "--arch", "sdxl", "--height", "64", "--width", "64"]  # the tiny SDXL's size (default: 512)


def _sdxl_shapes(work):
    """The fixed UNet inputs of the tiny SDXL at 64 px: its text_embeds are text_encoder_2's projection."""
    text = json.loads((work / "sdxl-diffusers" / "text_encoder_2" / "config.json").read_text())
    return {"sample": [2, 4, 16, 16], "timestep": [1], "encoder_hidden_states": [2, 77, 64],
            "text_embeds": [2, text["projection_dim"]], "time_ids": [2, 6]}  # fmt: skip


def _run_sdxl(tmp_path, argv):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builders, "build_sdxl_pipeline", _tiny_sdxl)
        mp.setattr(builders, "build_sd15_pipeline", None)  # --arch sdxl must not build SD 1.5
        assert cli.main(SDXL_ARGV + ["--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
                        + FAST + argv) == 0  # fmt: skip
    return json.loads((tmp_path / "out" / "bench.json").read_text())


def test_arch_sdxl_pytorch_step_takes_sdxl_inputs(tmp_path):
    """`--arch sdxl` end to end with the PyTorch variant (`builders.build_sdxl_pipeline` swapped for the tiny SDXL
    pipeline; the OpenVINO ones are in the slow test): the timed UNet step is fed text_embeds [B,P] and time_ids [B,6]
    (as added_cond_kwargs), the text encoder part is SDXL's `encode_prompt` (both encoders), the scheduler
    (EulerDiscrete) makes one UNet call per step; step caching is skipped with a note, before any export."""
    result = _run_sdxl(tmp_path, ["--variants", f"{A},{DC},{DC}{W}"])
    rows = check_rows(result, [A], extra_calls=0)
    assert set(result["skipped"]) == {DC, DC + W}
    assert all("SD 1.x/2.x UNets only" in note for note in result["skipped"].values())
    assert not (tmp_path / "work" / "openvino-fp32").exists()  # nothing exported for a skipped variant
    shapes = _sdxl_shapes(tmp_path / "work")
    assert result["unet_inputs"] == rows[A]["unet_inputs"] == shapes
    assert (result["settings"]["tome_max_downsample"], result["settings"]["measure_image"]) == (2, False)
    md = (tmp_path / "out" / "bench.md").read_text()
    assert f"text_embeds {shapes['text_embeds']}, time_ids [2, 6]" in md and "both text encoders" in md


@pytest.mark.slow  # ~3 min on 2 cores: optimum's SDXL export, a PTQ peer and its twin, two QAT graphs
def test_arch_sdxl_path_builds_export_ptq_and_qat_graphs(tmp_path):
    """`--arch sdxl` with the tiny SDXL pipeline: the same code builds optimum's SDXL export (FP32: not compressed for
    size), the PTQ peer (calibrated through `OVStableDiffusionXLPipeline`), the QAT graph (calibrated with
    text_embeds and time_ids) and the ToMe one (downsampling 2 by default: SDXL has no attention at full
    resolution); the `+w8tv` twin compresses both text encoders. Every OpenVINO UNet IR takes text_embeds and
    time_ids, statically shaped as the fixed inputs. Left out, as they add no SDXL-specific path: the hybrid PTQ peer
    and the hybrid QAT graph (the same calibration with another scheme; `local_run` and the sd15 test build them),
    OpenVINO's default hint (the FP32 IR again) and PyTorch bf16 (the fp32 step's inputs)."""
    import openvino as ov

    from ov_sd_trainer.compress.convert import count_int8_constants

    names = [A, C, E, E + W, F, G, DC]
    result = _run_sdxl(tmp_path, ["--variants", ",".join(names), "--profile", "--ptq-samples", "2", "--ptq-steps", "1"])
    rows = check_rows(result, [n for n in names if n != DC], extra_calls=0)
    assert list(result["skipped"]) == [DC] and "SD 1.x/2.x UNets only" in result["skipped"][DC]
    shapes = _sdxl_shapes(tmp_path / "work")
    for r in rows.values():
        assert r["unet_inputs"] == shapes, r["name"]
        if r["runtime"] == "openvino":
            ir = r["unet_ir_inputs"]
            assert list(ir) == list(shapes), ir
            assert ir["text_embeds"] == str(shapes["text_embeds"]).replace(" ", "") and ir["time_ids"] == "[2,6]", ir
    fp32_unet = ov.Core().read_model(tmp_path / "work" / "openvino-fp32" / "unet" / "openvino_model.xml")
    assert count_int8_constants(fp32_unet) == 0 and "nncf" not in fp32_unet.get_rt_info()
    for name in (E, E + W, F, G):
        assert rows[name]["unet_bytes"] < 0.5 * rows[C]["unet_bytes"], name
        assert rows[name]["profile"]["by_precision_ms"].get("i8", 0) > 0, name
    twin = Path(rows[E + W]["folder"])
    assert count_int8_constants(ov.Core().read_model(twin / "text_encoder_2" / "openvino_model.xml")) > 0
    assert result["preparation"]["qat-tome"]["tome"]["max_downsample"] == 2
    assert {t["node_type"] for t in rows[G]["profile"]["by_type"]} & set(measure.MERGE_OP_TYPES)
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "untrained random weights" in md and f"| {DC}: " in md


def test_arch_defaults():
    """The per-arch defaults, defined once (`settings.ARCH_DEFAULTS`): SDXL at 512 px (not its native 1024) with
    ToMe at downsampling 2; SD 1.5 at the model's size; a --model run at the model's size."""
    import argparse

    from ov_sd_trainer.eval.bench import settings

    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    for arch, size, tome, few_step in (("sdxl", 512, 2, False), ("sd15", 1000, 1, True)):
        s = run.settings_from_args(parser.parse_args(["--arch", arch, "--output", "o"]))
        assert settings.image_size(s, arch, 1000) == (size, size) and s.tome_max_downsample == tome
        assert s.few_step is few_step  # the few-step rows: SD 1.5 only
        assert (s.repeats, s.steps_pipeline, s.measure_image) == (3, 2, False)
    s = run.settings_from_args(parser.parse_args(["--arch", "sdxl", "--output", "o", "--height", "1024"]))
    assert settings.image_size(s, "sdxl", 1024) == (1024, 512)
    assert settings.image_size(settings.BenchSettings(), None, 64) == (64, 64)


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
        (["--arch", "sd15", "--image-steps", "0"], "--image-steps must be a positive integer"),
        (["--arch", "sd15", "--warmup-s", "-1"], "--warmup-s must be >= 0"),
        (["--arch", "sd15", "--height", "100"], "multiple of 8"),
        (["--arch", "sd15", "--ov-config", "NOVALUE"], "expected KEY=VALUE"),
        (["--arch", "sdxl", "--tome-max-downsample", "1"], "SDXL has no attention at full resolution"),
        (["--arch", "sdxl", "--batch-size", "3"], "must be even"),
        (["--arch", "sdxl", "--width", "100"], "--width 100: must be a positive multiple of 8"),
        (["--arch", "sdxl", "--variants", "qat-int8,zz"], "unknown variant 'zz'"),
        (["--arch", "sdxl", "--tome-ratio", "0.9"], "--tome-ratio=0.9: must be between 0 and 0.75"),
    ],
)
def test_bad_input_one_line_errors(tmp_path, capsys, monkeypatch, extra, message):
    def must_not_build(*args, **kwargs):
        raise AssertionError("bad input must be refused before any model is built")

    monkeypatch.setattr(builders, "build_sd15_pipeline", must_not_build)
    monkeypatch.setattr(builders, "build_sdxl_pipeline", must_not_build)
    out = tmp_path / "out"
    assert cli.main(["bench", "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ov-sd: error: ") and message in err and "\n" not in err, err
    assert not out.exists()


def test_bad_folders_fail_before_any_work(tmp_path, capsys, tiny_pipeline):
    pipe = tiny_pipeline
    not_ov = tmp_path / "not_ov"
    not_ov.mkdir()
    for flag in ("--qat", "--qat-hybrid", "--qat-tome", "--qat-deepcache", "--ptq", "--ptq-hybrid"):
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
    assert variants.parse_variants(f"{DC}{W},{E}{W},{E}") == [E, E + W, DC + W]  # a twin right after its base
    assert [n for n in ALL if n.endswith(W)] == [n + W for n in (H, E, F, FH, G, DC)]  # every int8 variant has one
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


@pytest.mark.slow
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
