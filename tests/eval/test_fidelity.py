"""`ov-sd eval`: fidelity of OpenVINO variants to the FP32 teacher, on a tiny pipeline and its OV exports."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from ov_sd_trainer import cli
from ov_sd_trainer.assets.builders import TinySDConfig
from ov_sd_trainer.errors import UserError
from ov_sd_trainer.eval import fidelity, metrics, report, stats

SIDE = TinySDConfig().resolution  # the session's tiny pipeline (conftest.py): 64 px, 16x16 latents
EVAL_ARGS = ["--steps", "3", "--seeds", "2", "--subset", "4", "--batch-size", "4", "--unet-samples", "4",
             "--grid-samples", "3", "--grid-scale", "1", "--threads", "1", "--no-progress"]  # fmt: skip
CARD = (
    "---\nlibrary_name: optimum-intel\ntags:\n- openvino\n- int8\n---\n\n# tiny\n\nSome text.\n\n## Usage\n\nuse it\n"
)


def _tiny_clip(folder):
    """A randomly initialised tiny CLIP (model + processor) saved offline, for the CLIP-score path."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ov_sd_trainer.assets import synthetic
    from ov_sd_trainer.assets.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(folder / "tok", synthetic.vocabulary())
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(image_size=SIDE, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder / "clip")
    return folder / "clip"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_pipeline, fp32_export):
    """The session's tiny diffusers pipeline (the teacher), a copy of its OpenVINO FP32 export (`fp`, given a model
    card) and the same export with 8-bit weights (`w8`, NNCF weight compression: a variant that really differs)."""
    import nncf
    import openvino as ov

    root = tmp_path_factory.mktemp("eval")
    base = tiny_pipeline  # read only: the card updates and bad-input cases write into the copies below
    shutil.copytree(fp32_export, root / "fp")
    (root / "fp" / "README.md").write_text(CARD)
    shutil.copytree(root / "fp", root / "w8")
    xml = root / "w8" / "unet" / "openvino_model.xml"
    ov.save_model(nncf.compress_weights(ov.Core().read_model(xml)), xml.with_name("w8.xml"))
    xml.with_name("w8.xml").replace(xml)
    xml.with_name("w8.bin").replace(xml.with_suffix(".bin"))
    clip = _tiny_clip(root)
    out = root / "out"
    argv = ["--reference", str(base), "--model", f"fp={root / 'fp'}", "--model", f"w8={root / 'w8'}",
            "--output", str(out), "--clip-model", str(clip), "--update-card", str(root / "fp"), "--compare", "fp,w8", "--twin", "w8,fp",
            *EVAL_ARGS]  # fmt: skip
    assert cli.main(["eval", *argv]) == 0
    result = json.loads((out / report.RESULT_FILE).read_text())
    return dict(
        root=root, base=base, out=out, result=result, clip=clip, rows={v["name"]: v for v in result["variants"]}
    )


def test_json_rows_and_settings(setup):
    res, rows = setup["result"], setup["rows"]
    assert [v["name"] for v in res["variants"]] == ["fp32", "fp", "w8"]
    s = res["settings"]
    assert (s["steps"], s["seeds"], s["prompts"], s["images"], s["height"], s["width"]) == (3, 2, 4, 8, SIDE, SIDE)
    assert s["ov_config"]["INFERENCE_PRECISION_HINT"] == "f32" and s["scheduler"] == "PNDMScheduler"
    assert rows["fp32"]["backend"] == "pytorch" and rows["fp32"]["psnr"] is None
    for name in ("fp", "w8"):
        v = rows[name]
        assert v["backend"] == "openvino"
        assert len(v["per_image"]["psnr"]) == len(v["per_image"]["latent_mse"]) == len(v["per_image"]["ssim"]) == 8
        assert len(v["per_image"]["noise_pred_mse"]) == 4
        for k in metrics.ACCURACY_KEYS:
            assert 0.0 <= v["accuracy"][k] <= 1.0
            assert v["accuracy_delta_vs_fp32"][k] == pytest.approx(v["accuracy"][k] - rows["fp32"]["accuracy"][k])
    assert rows["w8"]["description"] == "int8-weight UNet" and rows["fp"]["description"] == "float UNet"


def test_equal_variant_matches_and_a_different_one_does_not(setup):
    """The FP32 OpenVINO export equals the teacher (README parity: 1e-4); 8-bit weights measurably do not."""
    fp, w8 = setup["rows"]["fp"], setup["rows"]["w8"]
    assert fp["psnr"] > 45 and fp["ssim"] > 0.999
    assert fp["latent_mse"] < 1e-7 and fp["noise_pred_mse"] < 1e-8
    assert w8["latent_mse"] > 10 * max(fp["latent_mse"], 1e-12)
    assert w8["noise_pred_mse"] > 10 * max(fp["noise_pred_mse"], 1e-14)
    assert w8["psnr"] < fp["psnr"]
    # the aggregate PSNR is that of the pooled MSE, so it never exceeds the worst image by more than 10*log10(N)
    assert min(w8["per_image"]["psnr"]) <= w8["psnr"] <= min(w8["per_image"]["psnr"]) + 10 * np.log10(8) + 1e-4
    # --twin w8,fp: w8's images against fp's; fp is the teacher up to > 45 dB, so this is w8's PSNR to within a dB
    assert abs(setup["result"]["twins"]["w8 vs fp"]["psnr"] - w8["psnr"]) < 1.0


@pytest.mark.slow  # `ov-sd quality` and an eval of the teacher (~50 s): CI
def test_reference_row_is_what_quality_generates(setup, tmp_path):
    """Same prompts, seeds and initial latents as `quality.prompt_accuracy`: the teacher's grid cells are the very
    images quality saves, and its accuracy is quality's."""
    from ov_sd_trainer.eval.accuracy import prompt_accuracy

    q = prompt_accuracy(str(setup["base"]), steps=3, seeds=2, subset=4, batch_size=4, progress=False,
                        save_images=tmp_path)  # fmt: skip
    fp32 = setup["rows"]["fp32"]
    assert {k: q[k] for k in metrics.ACCURACY_KEYS} == fp32["accuracy"]
    grid = np.asarray(Image.open(setup["out"] / report.GRID_FILE).convert("RGB"))
    for c, col in enumerate(setup["result"]["grid"]["columns"]):
        index = next(j["index"] for j in setup["result"]["jobs"] if j["prompt"] == col["prompt"])
        saved = np.asarray(Image.open(next(tmp_path.glob(f"{index:03d}_s{col['seed']}_*.png"))).convert("RGB"))
        assert np.array_equal(grid[:SIDE, c * SIDE : (c + 1) * SIDE], saved), col


def test_grid_png_is_variants_by_samples(setup):
    res = setup["result"]
    grid = Image.open(setup["out"] / report.GRID_FILE)
    assert res["grid"]["rows"] == ["fp32", "fp", "w8"] and len(res["grid"]["columns"]) == 3
    assert grid.size == (3 * SIDE, 3 * SIDE)
    a = np.asarray(grid.convert("RGB")).astype(int)
    assert np.abs(a[:SIDE] - a[SIDE : 2 * SIDE]).max() <= 2  # row fp = row fp32 (to rounding)


def test_markdown_and_evaluate_save(setup):
    md = (setup["out"] / report.TABLE_FILE).read_text()
    assert "| fp32 |" in md and "| w8 |" in md and "PSNR (dB)" in md and "CLIP score" in md
    saved = list((setup["out"] / report.EVALUATE_DIR).glob("result-*.json"))
    assert len(saved) == 1
    data = json.loads(saved[0].read_text())
    assert "_evaluate_version" in data and set(data["results"]) == {"fp32", "fp", "w8"}
    assert data["results"]["w8"]["psnr"] == pytest.approx(setup["rows"]["w8"]["psnr"])
    assert not list(setup["out"].parent.glob(".out.tmp-*"))


def test_clip_score(setup):
    rows = setup["rows"]
    for v in rows.values():
        assert 0.0 <= v["clip_score"] <= 100.0
    # near-identical images -> near-identical CLIP score (a random CLIP still sees pixel differences)
    assert rows["fp"]["clip_score"] == pytest.approx(rows["fp32"]["clip_score"], abs=0.05)
    (setup["root"] / "notclip").mkdir(exist_ok=True)
    with pytest.raises(UserError, match="not a local CLIP model folder"):
        metrics.clip_scorer(setup["root"] / "notclip")
    broken = setup["root"] / "brokenclip"
    broken.mkdir(exist_ok=True)
    shutil.copy(setup["clip"] / "config.json", broken / "config.json")  # no weights, no processor files
    with pytest.raises(UserError, match="cannot be loaded"):
        metrics.clip_scorer(broken)


def test_model_card_update_is_parseable_model_index(setup):
    from huggingface_hub import ModelCard, metadata_load

    card = setup["root"] / "fp" / "README.md"
    meta = metadata_load(card)
    assert meta["library_name"] == "optimum-intel" and meta["tags"] == ["openvino", "int8"]  # kept
    (entry,) = meta["model-index"]
    assert entry["name"] == "fp"
    (res,) = entry["results"]
    assert res["task"]["type"] == "text-to-image"
    metrics = {(m["type"], m["name"]): m["value"] for m in res["metrics"]}
    fp = setup["rows"]["fp"]
    assert metrics[("psnr", "PSNR (dB) vs FP32 teacher")] == pytest.approx(fp["psnr"], rel=1e-5)
    assert metrics[("latent_mse", "latent MSE vs FP32 teacher")] == pytest.approx(fp["latent_mse"], rel=1e-3, abs=1e-9)
    assert metrics[("accuracy", "prompt accuracy (all three attributes, judge)")] == pytest.approx(
        fp["accuracy"]["all"]
    )
    assert ("clip_score", "CLIP score") in metrics
    parsed = ModelCard.load(card)
    assert parsed.data.model_name == "fp"
    assert {r.metric_type for r in parsed.data.eval_results} >= {"psnr", "ssim", "latent_mse", "accuracy"}
    text = card.read_text()
    assert text.count(evaluation_heading()) == 1
    assert text.index(evaluation_heading()) < text.index("## Usage") and "Some text." in text
    assert "| fp32 |" in text and "| w8 |" in text
    # updating again replaces the section, it does not add a second one; other cards are refused
    report.update_cards(setup["result"], [setup["root"] / "fp"])
    assert card.read_text().count(evaluation_heading()) == 1 and card.read_text().endswith("use it\n")
    with pytest.raises(UserError, match="not one of the evaluated"):
        report.update_cards(setup["result"], [setup["base"]])


def evaluation_heading():
    from ov_sd_trainer.export.card import FIDELITY_HEADING

    return FIDELITY_HEADING


def test_write_outputs_is_atomic(setup, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(report, "make_grid", boom)
    with pytest.raises(OSError, match="disk full"):
        report.write_outputs(tmp_path / "o", setup["result"], [[Image.new("RGB", (4, 4))]], 1)
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())


def test_bad_inputs_are_one_line_errors(setup, tmp_path, capsys):
    root, base = setup["root"], str(setup["base"])
    bad_res = tmp_path / "twice-size"
    shutil.copytree(root / "fp", bad_res)
    cfg_file = bad_res / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["sample_size"] *= 2  # this export claims images twice the reference's size
    cfg_file.write_text(json.dumps(cfg))
    cases = [
        (["--reference", base, "--model", str(tmp_path / "nope")], "folder does not exist"),
        (["--reference", base, "--model", base], "not an OpenVINO pipeline folder"),
        (
            ["--reference", base, "--model", str(bad_res)],
            f"made for {2 * SIDE}x{2 * SIDE} px images, the reference for {SIDE}x{SIDE}",
        ),
        (["--reference", str(tmp_path / "nope"), "--model", str(root / "fp")], "does not exist"),
        (["--reference", str(root / "fp"), "--model", str(root / "w8")], "is an OpenVINO folder"),
        (["--reference", base, "--model", f"a={root / 'fp'}", "--model", f"a={root / 'w8'}"], "used twice"),
        (["--reference", base, "--model", "=x"], "use NAME=DIR or DIR"),
        (["--reference", base, "--model", str(root / "fp"), "--update-card", base], "not one of the evaluated"),
        (["--reference", base, "--model", str(root / "w8"), "--update-card", str(root / "w8")], None),
        (["--reference", base, "--model", str(root / "fp"), "--steps", "0"], "must be >= 1"),
        (["--reference", base, "--model", f"a={root / 'fp'}", "--compare", "a,b"], "give two --model names"),
        (["--reference", base, "--model", f"a={root / 'fp'}", "--twin", "a"], "--twin 'a': give two --model names"),
        (["--reference", base, "--model", f"a={root / 'fp'}", "--steps", "b=2"], "'b' is not a --model name"),
        (["--reference", base, "--model", str(root / "fp"), "--output", str(setup["out"])], "not empty"),
    ]
    (root / "w8" / "README.md").unlink(missing_ok=True)  # w8 has a card copied from fp: remove it for its case
    for argv, message in cases:
        if "--output" not in argv:
            argv = [*argv, "--output", str(tmp_path / "o")]
        assert cli.main(["eval", *argv, "--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("ov-sd: error: ") and "\n" not in err, err
        assert (message or "has no model card") in err, (argv, err)
        assert not (tmp_path / "o").exists()


def test_model_spec_names_and_subparser_wiring(tmp_path):
    assert fidelity.parse_model_spec("qat=out/x") == ("qat", fidelity.Path("out/x"))
    assert fidelity.parse_model_spec(str(tmp_path / "run" / "openvino"))[0] == "run"
    assert fidelity.parse_model_spec(str(tmp_path / "ptq-int8"))[0] == "ptq-int8"
    parser = cli.build_parser("eval")  # the registry imports only the chosen command's module
    args = parser.parse_args(["eval", "--reference", "r", "--model", "a", "--model", "b=c", "--output", "o"])
    assert cli.COMMANDS[args.command][0] == fidelity.__name__ and args.model == ["a", "b=c"] and args.seeds == 3


def test_clip_score_is_torchmetrics_definition(setup):
    """The wrapper around transformers 5's CLIPModel gives 100 * cosine(image, text embeddings), as CLIPScore
    defines it, computed here directly from the model's forward."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, SIDE, SIDE), generator=g, dtype=torch.uint8)
    prompts = ["a red circle on a white background", "a blue square on a black background", "a green cross"]
    got = metrics.clip_score(metrics.clip_scorer(setup["clip"]), images, prompts)
    model, proc = CLIPModel.from_pretrained(setup["clip"]), CLIPProcessor.from_pretrained(setup["clip"])
    with torch.no_grad():
        out = model(**proc(text=prompts, images=list(images), return_tensors="pt", padding=True))
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert got == pytest.approx(max(float(100 * cos.mean()), 0.0), abs=1e-4)


def test_paired_comparison(setup):
    res = setup["result"]
    rows = {r["metric"]: r for r in stats.paired_comparison(res, "fp", "w8", n_boot=200)}
    assert set(rows) == {"psnr", "ssim", "latent_mse", "noise_pred_mse"} | {
        f"accuracy_{k}" for k in metrics.ACCURACY_KEYS
    }
    fp, w8 = setup["rows"]["fp"], setup["rows"]["w8"]
    # the FP32 export is closer to the teacher than the 8-bit-weight one on every fidelity metric
    assert rows["latent_mse"]["margin"] == pytest.approx(w8["latent_mse"] - fp["latent_mse"], rel=1e-6)
    assert rows["noise_pred_mse"]["margin"] > 0 and rows["noise_pred_mse"]["ci_low"] > 0
    assert rows["psnr"]["margin"] > 0 and rows["psnr"]["b"] == pytest.approx(w8["psnr"], abs=1e-3)
    for r in rows.values():
        assert r["ci_low"] <= r["margin"] <= r["ci_high"] or r["ci_low"] == r["ci_high"] == r["margin"]
    same = stats.paired_comparison(res, "w8", "w8", n_boot=50)
    assert all(r["margin"] == 0 and r["ci_low"] == r["ci_high"] == 0 for r in same)
    with pytest.raises(UserError, match="compare two evaluated"):
        stats.paired_comparison(res, "fp", "fp32")
    assert "| psnr |" in stats.comparison_markdown(list(rows.values()), "fp", "w8")
    # --compare fp,w8 put the same comparison into eval.json and eval.md
    saved = {r["metric"]: r for r in res["comparisons"]["fp vs w8"]}
    assert saved["latent_mse"]["margin"] == pytest.approx(rows["latent_mse"]["margin"])
    assert "## fp vs w8" in (setup["out"] / report.TABLE_FILE).read_text()


def test_grid_columns_are_distinct_jobs():
    for n_jobs, n in ((396, 8), (8, 3), (4, 4), (5, 9), (1, 2)):
        cols = report.grid_columns(n_jobs, n)
        assert len(cols) == min(n, n_jobs) == len(set(cols)) and all(0 <= c < n_jobs for c in cols)


def test_variant_labels_name_the_consistency_students_scheme(tmp_path):
    """An export's label comes from what wrote it: a consistency student's results.json `few_step` names its scheme
    (a float student is not 'QAT int8'); a plain QAT export keeps the recipe's scheme."""
    for scheme, label in [("none", "float consistency student"), ("full", "QAT int8 consistency student"),
                          ("hybrid", "QAT hybrid int8 consistency student")]:  # fmt: skip
        folder = tmp_path / scheme
        folder.mkdir()
        (folder / "training_recipe.json").write_text(json.dumps({"objective": "consistency"}))
        (folder / "results.json").write_text(json.dumps({"few_step": {"quantization_scheme": scheme}}))
        assert fidelity.describe_variant(folder) == f"{label} (ov-sd-trainer)"
    plain = tmp_path / "qat"
    plain.mkdir()
    (plain / "training_recipe.json").write_text(json.dumps({"quantization_scheme": "hybrid"}))
    assert fidelity.describe_variant(plain) == "QAT hybrid int8 (ov-sd-trainer)"
