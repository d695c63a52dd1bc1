"""benchmarks/gpu_check.py on the CPU with the tiny UNet: every row runs and the JSON and table hold its numbers."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a benchmark script (6 rows, 4 quantized builds): CI runs it (make ci-test), `make test` does not
def test_gpu_check_cpu_tiny_writes_every_row(tmp_path, capsys):
    gpu_check = _load()
    assert gpu_check.main(["--output", str(tmp_path), "--device", "cpu", "--size", "tiny"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["rows"]
    expected = {(name, ckpt) for name, _, _ in gpu_check.ROWS for ckpt in (False, True)}
    assert {(r["name"], r["gradient_checkpointing"]) for r in rows} == expected and len(rows) == 6
    for r in rows:
        assert r["status"] == "ok", r
        numbers = ("peak_memory_gb", "s_per_step", "time_ratio_vs_plain", "memory_ratio_vs_plain", "fwd_bwd_s",
                   "fwd_bwd_ratio_vs_plain", "optimizer_s", "ema_s", "last_loss")  # fmt: skip
        for key in numbers:
            assert isinstance(r[key], float) and r[key] > 0, (key, r)
        if r["quantized"]:
            assert r["kernels_in_use"] == r["kernels"], r  # the row really ran on the path it names
        else:
            assert r["time_ratio_vs_plain"] == 1.0
        assert r["targets_met"] is None  # the targets are for SD 1.5 on CUDA
    assert result["environment"]["quantizers"] > 100
    # 8-bit Adam: used, or skipped with the reason recorded (never faked)
    if result["config"]["optimizer"] == "adamw8bit":
        assert all(r["optimizer"] == "adamw8bit" for r in rows)
    else:
        assert any("8-bit Adam skipped" in n for n in result["notes"]), result["notes"]

    table = (tmp_path / "results.md").read_text()
    lines = [line for line in table.splitlines() if re.match(r"\| (plain|qat/)", line)]
    assert len(lines) == 6
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2] == "ok", line
        assert all(re.fullmatch(r"\d+\.\d+x?", c) for c in cells[3:11]), line
    assert "16 GB" in table and "1.4x" in table


def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _load().main(["--output", str(tmp_path), "--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
