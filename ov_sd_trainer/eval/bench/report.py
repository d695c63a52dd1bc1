"""The bench's results: ratios (per UNet step and per image), targets, machine description, the markdown tables and
the chart."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

from .fewstep import few_step_section
from .variants import BY_NAME, OPENVINO_FP32, OPTIMUM_HYBRID, OPTIMUM_INT8, PYTORCH_FP32, QAT, QAT_TOME, W8TV, forms

# The published anchors for SD 1.5 at 512 px, batch 2 (the 2023 NNCF/Optimum blog: QAT int8 3.9x PyTorch with a
# 0.26x UNet, + token merging 5.1x; tomesd's 1.3x over int8 alone): (target, variant, row key, comparison, goal).
TARGETS = (
    ("qat_int8_vs_pytorch_fp32", QAT, "speedup_vs_pytorch_fp32", ">=", 3.9),
    ("qat_int8_unet_size_vs_fp32", QAT, "unet_size_vs_fp32", "<=", 0.26),
    ("qat_tome_vs_pytorch_fp32", QAT_TOME, "speedup_vs_pytorch_fp32", ">=", 5.1),
    ("qat_tome_vs_optimum_int8", QAT_TOME, "speedup_vs_optimum_int8", ">=", 1.3),
)
BEST = "best QAT variant"  # a target's variant: the fastest per image of this project's int8 variants (qat-*)
# Issue 16's per-image targets: a 50-step 512 px image (text encoder + UNet calls + VAE decode), SD 1.5 architecture,
# UNet batch 2 (CFG), on a CPU with VNNI; the best of this project's int8 variants against each baseline.
IMAGE_TARGETS = (
    ("best_int8_image_vs_pytorch_fp32", BEST, "image_speedup_vs_pytorch_fp32", ">=", 6.0),
    ("best_int8_image_vs_optimum_hybrid", BEST, "image_speedup_vs_optimum_hybrid", ">=", 1.5),
    ("best_int8_image_vs_optimum_int8", BEST, "image_speedup_vs_optimum_int8", ">=", 1.3),
)
IMAGE_TARGET_CONDITIONS = {"arch": "sd15", "height": 512, "width": 512, "batch_size": 2}
# Speed-up columns: row key -> the variant it divides by.
BASELINES = {
    "speedup_vs_pytorch_fp32": PYTORCH_FP32,
    "speedup_vs_optimum_int8": OPTIMUM_INT8,
    "speedup_vs_optimum_hybrid": OPTIMUM_HYBRID,
}
# Per-image speed-up columns: row key -> the variants whose fastest image it divides by (a peer's two forms: the UNet
# only, as the project builds it, and `+w8tv`, as optimum-cli ships it).
IMAGE_BASELINES = {
    "image_speedup_vs_pytorch_fp32": [PYTORCH_FP32],
    "image_speedup_vs_optimum_hybrid": forms(OPTIMUM_HYBRID),
    "image_speedup_vs_optimum_int8": forms(OPTIMUM_INT8),
}
GiB = 1024**3
MiB = 1024**2


def image_baselines(rows: list[dict]) -> dict[str, str | None]:
    """Per-image speed-up key -> the measured variant it divides by (the faster form of a peer)."""
    by_name = {r["name"]: r for r in rows}
    out = {}
    for key, names in IMAGE_BASELINES.items():
        present = [by_name[n] for n in names if n in by_name]
        out[key] = min(present, key=lambda r: r["image_s"])["name"] if present else None
    return out


def add_ratios(rows: list[dict]) -> None:
    """Speed-ups (UNet step, pipeline, composed image) against each baseline of `BASELINES` / `IMAGE_BASELINES`,
    and UNet size vs the FP32 UNet (PyTorch's weights, else the FP32 IR)."""
    by_name = {r["name"]: r for r in rows}
    for key, name in image_baselines(rows).items():
        for r in rows:
            r[key] = by_name[name]["image_s"] / r["image_s"] if name else None
    fp32_size = (by_name.get(PYTORCH_FP32) or by_name.get(OPENVINO_FP32) or {}).get("unet_bytes")
    for r in rows:
        for key, ref in BASELINES.items():
            base = by_name.get(ref)
            r[key] = base["unet_step_s"] / r["unet_step_s"] if base else None
            ok = base and base.get("pipeline_s") and r.get("pipeline_s")
            r["pipeline_" + key] = base["pipeline_s"] / r["pipeline_s"] if ok else None
        r["unet_size_vs_fp32"] = r["unet_bytes"] / fp32_size if fp32_size else None


def best_project_row(rows: list[dict]) -> dict | None:
    """The fastest image among this project's int8 variants (qat-*, with or without int8 text encoder and VAE)."""
    ours = [r for r in rows if BY_NAME[r["name"]].is_project]
    return min(ours, key=lambda r: r["image_s"]) if ours else None


def check_targets(rows: list[dict]) -> list[dict]:
    by_name = {r["name"]: r for r in rows}
    best = best_project_row(rows)
    checks = []
    for target, variant, key, op, goal in TARGETS + IMAGE_TARGETS:
        row = best if variant == BEST else by_name.get(variant)
        value = (row or {}).get(key)
        if value is not None:
            met = value >= goal if op == ">=" else value <= goal
            checks.append({"target": target, "variant": row["name"], "op": op, "goal": goal,
                           "measured": round(value, 3), "met": bool(met)})  # fmt: skip
    return checks


def image_target_differences(result: dict) -> list[str]:
    """How this run differs from the conditions the per-image targets are stated for (empty: none)."""
    s, out = result["settings"], []
    if result.get("arch") != IMAGE_TARGET_CONDITIONS["arch"]:
        out.append(f"the model is {result['source']}, not the SD 1.5 architecture (--arch sd15)")
    if (s["height"], s["width"]) != (IMAGE_TARGET_CONDITIONS["height"], IMAGE_TARGET_CONDITIONS["width"]):
        out.append(f"{s['height']}x{s['width']} px, not 512x512")
    if s["batch_size"] != IMAGE_TARGET_CONDITIONS["batch_size"]:
        out.append(f"UNet batch {s['batch_size']}, not 2")
    if not has_vnni(result["machine"]):
        out.append("this CPU has no VNNI (int8 dot products): int8 runs far below its speed on a VNNI CPU")
    return out


def has_vnni(machine: dict) -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return bool(set(machine.get("isa", [])) & {"avx512_vnni", "avx_vnni", "amx_int8"})


ISA_NAMES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI", "avx512_bf16": "AVX512-BF16",
             "avx_vnni": "AVX-VNNI", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8",
             "amx_tile": "AMX-TILE"}  # fmt: skip


def isa_summary(machine: dict) -> str:
    """'AVX2, AVX-512, AVX512-VNNI (VNNI: yes, AMX: no, bf16: no)': what int8 and bf16 speed depend on."""
    isa = machine.get("isa", [])
    names = ", ".join(ISA_NAMES.get(f, f) for f in isa) or "unknown (no /proc/cpuinfo flags)"
    amx = any(f.startswith("amx") for f in isa)

    def yn(flag):
        return "yes" if flag else "no"

    return f"{names} (VNNI: {yn(has_vnni(machine))}, AMX: {yn(amx)}, bf16: {yn(native_bf16(machine))})"


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
        f"after {s['warmup']} warm-up call(s) and >= {s['warmup_s']} s; pipeline = median of {s['pipeline_repeats']} runs of {s['steps_pipeline']} "
        f"steps (text encoder + UNet + VAE decode); threads: {s['threads'] or 'library default'}; "
        f"{'static' if s['static_shapes'] else 'dynamic'} OpenVINO shapes.",
        "",
        "UNet step inputs (fixed, every variant): "
        + ", ".join(f"{k} {v}" for k, v in (result.get("unet_inputs") or {}).items())
        + ".",
        "",
        f"CPU instruction set: {isa_summary(result['machine'])}. Every speed on this page depends on it.",
        "",
        "## UNet step",
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
    lines += image_section(result)
    lines += int8_text_vae_section(result)
    if result.get("notes"):
        lines += [""] + [f"- {n}" for n in result["notes"]]
    if result["targets"]:
        lines += ["", "## Targets", "", "| target | variant | goal | measured | met |", "|---|---|---|---|---|"]
        for t in result["targets"]:
            met = "met" if t["met"] else "**not met**"
            lines.append(f"| {t['target']} | {t['variant']} | {t['op']} {t['goal']} | {t['measured']} | {met} |")
        differences = image_target_differences(result)
        if differences and any(t["target"] in {x[0] for x in IMAGE_TARGETS} for t in result["targets"]):
            lines += ["", "The per-image targets are stated for the SD 1.5 architecture at 512x512 px, UNet batch 2 "
                      "(CFG), on a CPU with VNNI; this run differs: " + "; ".join(differences) + "."]  # fmt: skip
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
    lines += few_step_section(result)
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


def _s(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def image_section(result: dict) -> list[str]:
    """The per-image table: measured parts, the composed image latency, its ratios and the composition checks."""
    s, rows = result["settings"], result["variants"]
    if not rows:
        return []
    calls = " / ".join(map(str, sorted({r["unet_calls_per_image"] for r in rows})))
    measured = any(r.get("image_measured_s") for r in rows)
    base = result.get("image_baselines", {})
    peers = ", ".join(filter(None, (base.get(k) for k in ("image_speedup_vs_optimum_hybrid",
                                                          "image_speedup_vs_optimum_int8"))))  # fmt: skip
    check = f"the {s['steps_pipeline']}-step pipeline (table above)"
    if measured:
        check += f", then the whole {s['image_steps']}-step pipeline timed directly (median of {s['pipeline_repeats']})"
    else:
        check += f"; the {s['image_steps']}-step pipeline itself was not timed (--measure-image)"
    lines = [
        "",
        f"## One {s['image_steps']}-step image, composed from measured parts",
        "",
        "image s = text encoder + UNet calls x UNet s/call + VAE decode: **composed from parts measured on their "
        f"own** (medians of {s['repeats']} calls after {s['warmup']} or more warm-up calls lasting at least "
        f"{s['warmup_s']} s, in the variant's loaded pipeline): "
        f"`encode_prompt` with CFG (prompt and empty negative prompt), one UNet call at batch {s['batch_size']}, the "
        f"VAE decode of {s['batch_size'] // 2} latent(s) with the conversion to PIL. The scheduler makes {calls} UNet "
        f"calls for {s['image_steps']} steps; with step caching (interval N) call k runs the full UNet when "
        "k % N == 0, the shallow path otherwise. Left out: the scheduler, guidance arithmetic and tensor "
        "conversions between calls, shown as overhead per UNet call (measured - composed). The optimum columns "
        f"divide by the peer's faster form ({peers or 'not measured'}).",
        "",
        f"Composition checks, composed / measured: {check}.",
        "",
        "| variant | text encoder s | UNet s/call | shallow s/call | VAE decode s | UNet calls (full + shallow) "
        "| image s (composed) | vs PyTorch FP32 | vs optimum hybrid | vs optimum int8 | image s (measured) "
        f"| composed / measured ({s['steps_pipeline']} steps / image) | overhead ms/call |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        checks = " / ".join(_ratio(r.get(k)) or "-" for k in ("pipeline_composed_vs_measured",
                                                              "image_composed_vs_measured"))  # fmt: skip
        overhead = r.get("overhead_s_per_call")
        lines.append(
            f"| {r['name']} | {_s(r['text_encoder_s'])} | {_s(r['unet_step_s'])} | {_s(r['shallow_step_s'])} "
            f"| {_s(r['vae_decode_s'])} | {r['unet_calls_full']} + {r['unet_calls_shallow']} | **{_s(r['image_s'])}** "
            f"| {_x(r['image_speedup_vs_pytorch_fp32'])} | {_x(r['image_speedup_vs_optimum_hybrid'])} "
            f"| {_x(r['image_speedup_vs_optimum_int8'])} | {_s(r.get('image_measured_s'))} | {checks} "
            f"| {'' if overhead is None else f'{overhead * 1000:.1f}'} |"
        )
    return lines


def text_vae_pairs(rows: list[dict]) -> list[dict]:
    """Each `+w8tv` twin against its base, same run: what int8 text encoder and VAE weights save per image. The UNet
    is the same file in both, so the saving is taken from the text encoder and VAE parts alone (the UNet's step
    noise stays out): image with int8 text encoder and VAE = the base's composed image - the saving."""
    by_name = {r["name"]: r for r in rows}
    out = []
    for name, twin in by_name.items():
        base = by_name.get(name[: -len(W8TV)]) if name.endswith(W8TV) else None
        if base is None:
            continue
        before = base["text_encoder_s"] + base["vae_decode_s"]
        saved = before - (twin["text_encoder_s"] + twin["vae_decode_s"])
        out.append({"base": base["name"], "twin": name, "text_vae_s": [before, before - saved], "saved_s": saved,
                    "image_s": [base["image_s"], base["image_s"] - saved],
                    "image_gain": base["image_s"] / (base["image_s"] - saved),
                    "text_vae_bytes": [base["text_vae_bytes"], twin["text_vae_bytes"]]})  # fmt: skip
    return out


def int8_text_vae_section(result: dict) -> list[str]:
    pairs = result.get("int8_text_vae") or []
    if not pairs:
        return []
    by_name = {r["name"]: r for r in result["variants"]}
    lines = [
        "",
        f"## int8 text encoder and VAE weights (`{W8TV}` vs its base)",
        "",
        f"A `{W8TV}` twin is its base folder with the text encoder and VAE weights compressed to int8 as "
        "optimum-intel's pipeline quantization does (`OVWeightQuantizationConfig(bits=8)`: NNCF `compress_weights`, "
        "asymmetric int8, per channel); the UNet is the same file, so the saving is the text encoder + VAE parts' "
        "difference and the image column applies it to the base's composed image.",
        "",
        "| base -> twin | text encoder s | VAE decode s | saved s per image | image s (composed) | image gain "
        "| text encoder + VAE MB |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for p in pairs:
        b, t = by_name[p["base"]], by_name[p["twin"]]
        lines.append(
            f"| {p['base']} -> {p['twin']} | {_s(b['text_encoder_s'])} -> {_s(t['text_encoder_s'])} "
            f"| {_s(b['vae_decode_s'])} -> {_s(t['vae_decode_s'])} | {p['saved_s']:.3f} "
            f"| {_s(p['image_s'][0])} -> {_s(p['image_s'][1])} | {_x(p['image_gain'])} "
            f"| {_mb(p['text_vae_bytes'][0])} -> {_mb(p['text_vae_bytes'][1])} |"
        )
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["variants"]
    labels = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(19, 0.45 * len(rows) + 2.0))
    panels = (
        ("unet_step_s", "UNet step (s)", "speedup_vs_pytorch_fp32"),
        ("image_s", f"{result['settings']['image_steps']}-step image, composed (s)", "image_speedup_vs_pytorch_fp32"),
        ("pipeline_s", f"pipeline, {result['settings']['steps_pipeline']} steps, measured (s)", None),
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
    title = f"{result['source']}: {s['height']}x{s['width']}, UNet batch {s['batch_size']}"
    fig.suptitle(f"{title}; CPU: {isa_summary(result['machine'])}", fontsize=10)
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
