"""Bad input: a clear one-line error naming the problem, exit status 2, and no partial output.

Each case runs the real entry point (`ov-sd`'s main, which `train.py` and `python -m ov_sd_trainer.train` call)
in-process. Every case fails before anything is trained or loaded (the suite runs offline: conftest sets
HF_HUB_OFFLINE)."""

import json
from pathlib import Path

import pytest

from ov_sd_trainer import cli


@pytest.fixture
def tiny(tiny_pipeline):
    return tiny_pipeline


def write(path: Path, obj) -> str:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def imagefolder(root: Path, rows: list[tuple[str, bytes | None, str]]) -> str:
    """rows: (file name, PNG bytes or None for a corrupt file, caption)."""
    from ov_sd_trainer.assets.synthetic import draw_shape

    root.mkdir()
    with open(root / "metadata.jsonl", "w") as f:
        for name, ok, caption in rows:
            if ok:
                draw_shape("circle", "red", "blue", 32).save(root / name)
            else:
                (root / name).write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return str(root)


def cases(tiny: Path, tmp: Path):
    """(id, argv builder, expected message fragment). Each builder may create its inputs under tmp."""
    base = ["--pretrained_model_name_or_path", str(tiny), "--max_steps", "1", "--use_cpu", "true",
            "--report_to", "none", "--num_calibration_samples", "2", "--dataset_name", "synthetic:8"]  # fmt: skip
    not_sd = tmp / "not_sd"
    not_sd.mkdir()
    (not_sd / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["diffusers", "U"]}))
    nonempty = tmp / "nonempty"
    nonempty.mkdir()
    (nonempty / "results.txt").write_text("earlier results")
    incomplete = tmp / "incomplete" / "checkpoint-2"
    incomplete.mkdir(parents=True)
    return [
        ("unknown recipe key", ["--recipe", write(tmp / "a.json", {"learning_rat": 1})], "unknown key 'learning_rat'"),
        ("wrong value type", ["--recipe", write(tmp / "b.json", {"max_steps": "ten"})], "key 'max_steps' has value"),
        ("invalid JSON", ["--recipe", write(tmp / "c.json", "{oops")], "not valid JSON"),
        ("missing recipe file", ["--recipe", str(tmp / "none.json")], "not found"),
        ("model path missing", base + ["--pretrained_model_name_or_path", str(tmp / "nope")], "does not exist"),
        ("folder not an SD pipeline", base + ["--pretrained_model_name_or_path", str(not_sd)], "is not a Stable Diffusion pipeline"),
        ("dataset lacks caption column", base + ["--caption_column", "caption"], "no column 'caption' (columns found"),
        ("dataset path missing", base + ["--dataset_name", str(tmp / "nodata")], "does not exist"),
        ("all images unreadable", base + ["--dataset_name", imagefolder(tmp / "corrupt", [("a.png", None, "a red circle")])], "can be read"),
        ("empty captions", base + ["--dataset_name", imagefolder(tmp / "empty", [("a.png", b"1", "a red circle"), ("b.png", b"1", " ")])], "empty caption"),
        ("tome_ratio out of range", base + ["--tome_ratio", "0.9"], "tome_ratio=0.9"),
        ("resolution not a multiple of 8", base + ["--resolution", "100"], "multiple of 8"),
        ("calibration samples > dataset", base + ["--num_calibration_samples", "50"], "exceeds the dataset's 8 rows"),
        ("non-empty output without --overwrite", base + ["--output_dir", str(nonempty)], "pass --overwrite true"),
        ("resume from incomplete checkpoint", base + ["--resume_from_checkpoint", str(incomplete)], "is incomplete"),
        ("unknown flag", base + ["--learning_rat", "1"], "unrecognized arguments"),
        ("output_dir is a file", ["--recipe", "reference-int8", "--output_dir", write(tmp / "run.txt", "a file")], "is a file"),
        ("max_steps below -1", base + ["--max_steps", "-5"], "max_steps=-5"),
    ]  # fmt: skip


def test_train_bad_inputs(tiny, tmp_path, capsys):
    failures = []
    all_cases = cases(tiny, tmp_path)
    assert len(all_cases) >= 18
    for name, argv, fragment in all_cases:
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        if "--output_dir" not in argv:
            argv = argv + ["--output_dir", str(out)]
        before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
        rc = cli.main(["train", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        last = err[-1] if err else ""
        if rc != 2 or not last.startswith("ov-sd: error:") or fragment not in last:
            failures.append(f"{name}: rc={rc} last line={last!r}")
        if out.exists():
            failures.append(f"{name}: created {out}")
        after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
        if any(after.get(p) != t for p, t in before.items()):
            failures.append(f"{name}: changed an existing file")
    assert not failures, "\n".join(failures)


UNCACHED = "nor a Hub model in the Hugging Face cache"  # pipeline_folder.check_hub_id, offline


def load_cases(tiny: Path, tmp: Path, export: Path):
    """Commands that load a pipeline, each through pipeline_folder: (id, argv, expected message fragment)."""
    gen = ["generate", "--prompt", "hi", "--output", "x.png"]
    not_sd = tmp / "not_sd"
    not_sd.mkdir()
    return [
        ("generate: no such model", gen + ["--model", "nope"], UNCACHED),
        ("generate: uncached Hub id", gen + ["--model", "someone/some-model"], UNCACHED),
        ("generate: missing folder", gen + ["--model", str(tmp / "nope")], "does not exist"),
        ("generate: not a pipeline", gen + ["--model", str(not_sd)], "no model_index.json"),
        ("generate: steps 0", gen + ["--model", str(tiny), "--steps", "0"], "--steps must be at least 1"),
        ("generate: height 0", gen + ["--model", str(tiny), "--height", "0"], "--height 0: must be a positive multiple of 8"),
        ("generate --decoder tiny: no tiny decoder", gen + ["--model", str(export), "--decoder", "tiny"], "has no tiny decoder"),
        ("generate --decoder: diffusers folder", gen + ["--model", str(tiny), "--decoder", "full"], "is not an OpenVINO pipeline folder"),
        ("generate: genai, missing folder", gen + ["--runtime", "genai", "--model", "nope"], "does not exist"),
        ("generate --backend pytorch: no such model", gen + ["--backend", "pytorch", "--model", "nope"], UNCACHED),
        ("ptq: no such model", ["ptq", "--model", "nope", "--mode", "hybrid", "--output", "o"], UNCACHED),
        ("quality: no such model", ["quality", "--model", "nope"], UNCACHED),
        ("quality --backend openvino: uncached Hub id", ["quality", "--backend", "openvino", "--model", "someone/some-model"], UNCACHED),
        ("eval: missing reference", ["eval", "--reference", "nope", "--model", "nope", "--output", "e"], "does not exist"),
        ("deepcache: not a diffusers folder", ["deepcache", "--fp32", "nope", "--model", "nope"], "is not a diffusers pipeline folder"),
        ("export: missing checkpoint", ["export", "--checkpoint", "nope", "--output", "ex"], "does not exist"),
        ("bench: no such model", ["bench", "--model", "nope", "--output", "b"], UNCACHED),
        ("bench: uncached Hub id", ["bench", "--model", "someone/some-model", "--output", "b"], UNCACHED),
        ("push --dry-run: missing folder", ["push", "--model", "nope", "--repo-id", "a/b", "--dry-run"], "does not exist"),
        ("push --dry-run: not an OpenVINO folder", ["push", "--model", str(not_sd), "--repo-id", "a/b", "--dry-run"], "is not an OpenVINO pipeline folder"),
    ]  # fmt: skip


def test_load_bad_inputs(tiny, fp32_export, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs (x.png, o, e, ex) would land here
    failures = []
    for name, argv, fragment in load_cases(tiny, tmp_path, fp32_export):
        before = set(tmp_path.rglob("*"))
        rc = cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        last = err[-1] if err else ""
        if rc != 2 or not last.startswith("ov-sd: error:") or fragment not in last:
            failures.append(f"{name}: rc={rc} last line={last!r}")
        if set(tmp_path.rglob("*")) != before:
            failures.append(f"{name}: wrote {sorted(map(str, set(tmp_path.rglob('*')) - before))}")
    assert not failures, "\n".join(failures)


def test_corrupt_images_are_skipped_with_a_count(tmp_path):
    from ov_sd_trainer.train.data import drop_unreadable_images, load_captioned_dataset

    folder = imagefolder(
        tmp_path / "mixed", [("a.png", b"1", "a red circle"), ("b.png", None, "x"), ("c.png", b"1", "y")]
    )
    ds = load_captioned_dataset(folder)
    kept, skipped = drop_unreadable_images(ds, "image")
    assert (len(ds), len(kept), skipped) == (3, 2, 1)
    assert kept["text"] == ["a red circle", "y"]


def test_export_of_unquantized_checkpoint(tiny, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    (ckpt / "student").mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"pretrained_model_name_or_path": str(tiny)}))
    rc = cli.main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "ov")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "is not a quantized checkpoint" in last
    assert not (tmp_path / "ov").exists()
