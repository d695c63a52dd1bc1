"""The bench's results: ratios, targets, machine description, the markdown table and the chart."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

from .variants import BY_NAME, OPENVINO_FP32, OPTIMUM_HYBRID, OPTIMUM_INT8, PYTORCH_FP32, QAT, QAT_TOME

# The published anchors for SD 1.5 at 512 px, batch 2 (the 2023 NNCF/Optimum blog: QAT int8 3.9x PyTorch with a
# 0.26x UNet, + token merging 5.1x; tomesd's 1.3x over int8 alone): (target, variant, row key, comparison, goal).
TARGETS = (
    ("qat_int8_vs_pytorch_fp32", QAT, "speedup_vs_pytorch_fp32", ">=", 3.9),
    ("qat_int8_unet_size_vs_fp32", QAT, "unet_size_vs_fp32", "<=", 0.26),
    ("qat_tome_vs_pytorch_fp32", QAT_TOME, "speedup_vs_pytorch_fp32", ">=", 5.1),
    ("qat_tome_vs_optimum_int8", QAT_TOME, "speedup_vs_optimum_int8", ">=", 1.3),
)
# Speed-up columns: row key -> the variant it divides by.
BASELINES = {
    "speedup_vs_pytorch_fp32": PYTORCH_FP32,
    "speedup_vs_optimum_int8": OPTIMUM_INT8,
    "speedup_vs_optimum_hybrid": OPTIMUM_HYBRID,
}
GiB = 1024**3
MiB = 1024**2


def add_ratios(rows: list[dict]) -> None:
    """Speed-ups (UNet step and pipeline) against each baseline of `BASELINES`, and UNet size vs the FP32 UNet
    (PyTorch's weights, else the FP32 IR)."""
    by_name = {r["name"]: r for r in rows}
    fp32_size = (by_name.get(PYTORCH_FP32) or by_name.get(OPENVINO_FP32) or {}).get("unet_bytes")
    for r in rows:
        for key, ref in BASELINES.items():
            base = by_name.get(ref)
            r[key] = base["unet_step_s"] / r["unet_step_s"] if base else None
            ok = base and base.get("pipeline_s") and r.get("pipeline_s")
            r["pipeline_" + key] = base["pipeline_s"] / r["pipeline_s"] if ok else None
        r["unet_size_vs_fp32"] = r["unet_bytes"] / fp32_size if fp32_size else None


def check_targets(rows: list[dict]) -> list[dict]:
    by_name = {r["name"]: r for r in rows}
    checks = []
    for target, variant, key, op, goal in TARGETS:
        value = (by_name.get(variant) or {}).get(key)
        if value is not None:
            met = value >= goal if op == ">=" else value <= goal
            checks.append({"target": target, "op": op, "goal": goal, "measured": round(value, 3), "met": bool(met)})
    return checks


def native_bf16(machine: dict) -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX); without them torch autocast emulates bf16."""
    isa = set(machine.get("isa", []))
    return bool(isa & {"avx512_bf16", "amx_bf16"}) or "BF16" in machine.get("openvino_cpu_capabilities", [])


def machine_info() -> dict[str, Any]:
    import psutil

    flags: list[str] = []
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")
    info = {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "isa": [f for f in wanted if f in flags],
        "ram_gib": round(psutil.virtual_memory().total / GiB, 1),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }
    with contextlib.suppress(Exception):
        import openvino as ov

        info["openvino_cpu_capabilities"] = list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return info


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / MiB:,.1f}"


def _ratio(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def markdown_report(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# ov-sd bench: {result['source']}",
        "",
        f"{s['height']}x{s['width']} px, UNet batch {s['batch_size']} (CFG), UNet step = median of {s['repeats']} "
        f"after {s['warmup']} warm-up; pipeline = median of {s['pipeline_repeats']} runs of {s['steps_pipeline']} "
        f"steps (text encoder + UNet + VAE decode); threads: {s['threads'] or 'library default'}; "
        f"{'static' if s['static_shapes'] else 'dynamic'} OpenVINO shapes.",
        "",
        "| variant | UNet s/step | vs PyTorch FP32 | vs optimum hybrid | vs optimum int8 | pipeline s "
        "| pipeline vs FP32 | UNet MB | UNet vs FP32 | total MB | load+compile s | peak RSS GiB | other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["variants"]:
        lines.append(
            f"| {r['name']}: {r['label']} | {r['unet_step_s']:.3f} | {_x(r['speedup_vs_pytorch_fp32'])} "
            f"| {_x(r['speedup_vs_optimum_hybrid'])} | {_x(r['speedup_vs_optimum_int8'])} | {r['pipeline_s']:.2f} | {_x(r['pipeline_speedup_vs_pytorch_fp32'])} "
            f"| {_mb(r['unet_bytes'])} | {_ratio(r['unet_size_vs_fp32'])} "
            f"| {_mb(r['total_bytes'])} | {r['load_compile_s']:.1f} | {r['peak_rss_bytes'] / GiB:.2f} "
            f"| {r['other_load_cores']:.2f} |"
        )
    for name, note in result["skipped"].items():
        lines.append(f"| {name}: {BY_NAME[name].label} | {note} ||||||||||||")
    if result.get("notes"):
        lines += [""] + [f"- {n}" for n in result["notes"]]
    if result["targets"]:
        lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {t['op']} {t['goal']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
    profiled = [r for r in result["variants"] if "profile" in r]
    if profiled:
        lines += ["", "## Where the time goes (OpenVINO PERF_COUNT, one UNet inference)", ""]
        for r in profiled:
            p = r["profile"]
            prec = ", ".join(f"{k} {v / 1000:.2f} s" for k, v in p["by_precision_ms"].items())
            lines += [
                f"**{r['name']}: {r['label']}**: {p['total_ms'] / 1000:.2f} s summed over nodes; by execution "
                f"precision: {prec}; merge ops (TopK/Gather/Scatter): {p['merge_ops_ms'] / 1000:.3f} s; "
                f"conv/matmul nodes left in floating point: {p['fp_compute_ops'] or 'none'}",
                "",
                "| op type | s | share | nodes | by precision (s) |",
                "|---|---|---|---|---|",
            ]
            for t in p["by_type"][:12]:
                precs = ", ".join(
                    f"{k} {v / 1000:.3f}" for k, v in t.items() if k not in ("node_type", "ms", "count") and v
                )
                share = t["ms"] / p["total_ms"] if p["total_ms"] else 0
                lines.append(f"| {t['node_type']} | {t['ms'] / 1000:.3f} | {share:.1%} | {t['count']} | {precs} |")
            lines.append("")
    m = result["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, instruction set {', '.join(m['isa']) or 'n/a'}, "
        f"OpenVINO CPU capabilities {m.get('openvino_cpu_capabilities')}, {m['ram_gib']} GiB RAM; load average "
        f"{m['loadavg_start']} at start, {m.get('loadavg_end')} at end. Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["variants"]
    labels = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.6 * len(rows) + 2.0))
    panels = (
        ("unet_step_s", "UNet step (s)", "speedup_vs_pytorch_fp32"),
        ("pipeline_s", f"pipeline, {result['settings']['steps_pipeline']} steps (s)", None),
        ("unet_bytes", "UNet on disk (MB)", "unet_size_vs_fp32"),
    )
    for ax, (key, title, ratio) in zip(axes, panels, strict=True):
        values = [(r[key] or 0) / (MiB if key == "unet_bytes" else 1) for r in rows]
        bars = ax.barh(labels, values, color=["#888" if r["runtime"] == "pytorch" else "#2a7" for r in rows])
        ax.invert_yaxis()
        ax.set_title(title)
        for bar, r in zip(bars, rows, strict=True):
            text = f" {r[ratio]:.2f}x" if ratio and r.get(ratio) is not None else ""
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=8)
        if ax is not axes[0]:
            ax.set_yticklabels([])
    s = result["settings"]
    fig.suptitle(f"{result['source']}: {s['height']}x{s['width']}, UNet batch {s['batch_size']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "diffusers", "openvino", "optimum-intel", "nncf"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
