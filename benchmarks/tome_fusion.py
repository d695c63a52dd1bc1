"""Where the time of the int8 SD 1.5 UNet goes with and without ToMe: OpenVINO per-node counters, side by side.

Issue 16, item 1: on a VNNI CPU ToMe (ratio 0.4, max_downsample 1) gained only 1.015-1.15x per step over the int8
QAT UNet, with "five attention MatMuls as bf16 MatMul nodes instead of fused int8 subgraphs". This script compiles
each UNet IR given (`NAME=FOLDER`, an optimum-intel pipeline folder or a UNet .xml) with PERF_COUNT on, runs them
interleaved (one warm-up, then `--runs` timed inferences each, round-robin), and per node the median
over the timed runs of:

* time by executed node type and by the precision OpenVINO ran it in (`measure.summarize_profile`, as
  `ov-sd bench --profile` does);
* every MatMul / FullyConnected / Convolution node that ran in a float precision, with the source ops it was
  built from (the runtime graph's `originalLayersNames`) and a guess of what it is: the ToMe matching similarity
  (`metric @ metric^T`, hidden from NNCF by design, so never int8), attention (q @ k^T, attn @ v), or other;
* the layout and merge ops (Reorder, Transpose, Gather, ScatterNDUpdate, ...) with their time.

    python benchmarks/tome_fusion.py --work-dir W     # the two QAT folders of `ov-sd bench --arch sd15 --work-dir W`
    python benchmarks/tome_fusion.py int8=DIR tome=DIR --runs 2 --threads 1 --output benchmarks/tome_fusion.json

Weights are untrained (speed only). Inputs: sample [2,4,64,64], timestep, encoder_hidden_states [2,77,768] (shapes
read from the IR when static).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ov_sd_trainer.eval.bench.measure import exec_precision, summarize_profile  # noqa: E402

# the folders `ov-sd bench --arch sd15` builds in its --work-dir for qat-int8 and qat-int8-tome (default settings)
WORK_DIR_MODELS = {
    "int8": "qat-512x512-b2",
    "tome": "qat-tome-ratio0.4-max_downsample1-modetome-merge_mlpFalse-512x512-b2",
}
COMPUTE_TYPES = ("MatMul", "FullyConnected", "Convolution", "GroupConvolution")
LAYOUT_MERGE_TYPES = (
    "Reorder",
    "Transpose",
    "Gather",
    "GatherElements",
    "ScatterNDUpdate",
    "ScatterUpdate",
    "ScatterElementsUpdate",
    "TopK",
    "Concatenation",
    "Reshape",
)
MERGE_NODE_TYPES = ("TopK", "Gather", "GatherElements", "ScatterNDUpdate", "ScatterElementsUpdate", "ScatterUpdate")


def unet_xml(path: str) -> Path:
    p = Path(path)
    if p.suffix == ".xml":
        return p
    return p / "unet" / "openvino_model.xml" if (p / "unet").is_dir() else p / "openvino_model.xml"


def feed_for(model, rng):
    import numpy as np

    defaults = {"sample": (2, 4, 64, 64), "encoder_hidden_states": (2, 77, 768), "timestep": (2,)}
    feed = {}
    for port in model.inputs:
        name = port.get_any_name()
        ps = port.get_partial_shape()
        shape = tuple(d.get_length() for d in ps) if ps.is_static else defaults.get(name, ())
        if "timestep" in name:
            feed[name] = np.full(shape, 500, dtype=port.get_element_type().to_dtype())
        else:
            feed[name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def classify(names: str) -> str:
    """What a float MatMul was built from, by its original layer names (the TorchScript op names of the IR).

    The ToMe matching's similarity is the `aten::matmul` of `bipartite_soft_matching`, traced in the scope of the
    transformer block itself (`...transformer_blocks.N/aten::matmul`); attention's q @ k^T and attn @ v sit in
    `attn1`/`attn2` (as ScaledDotProductAttention, fused into a Subgraph when it stays int8); Linear layers are
    `aten::linear`."""
    import re

    if re.search(r"transformer_blocks\.\d+/aten::matmul", names):
        return "tome-similarity"
    if "scaled_dot_product" in names or "aten::bmm" in names or "baddbmm" in names:
        return "attention"
    if "aten::linear" in names:
        return "linear"
    return "other"


class _Counter:
    """One node's counters, the attributes of openvino.ProfilingInfo that `summarize_profile` reads."""

    def __init__(self, p, ms: float):
        self.status, self.node_name, self.node_type, self.exec_type = "EXECUTED", p.node_name, p.node_type, p.exec_type
        self.ms = ms

    @property
    def real_time(self):
        import datetime

        return datetime.timedelta(milliseconds=self.ms)


def median_profile(snapshots: list[list]) -> list[_Counter]:
    """Per-node median of the real time over the timed runs (load spikes on one run do not move it)."""
    by_node: dict[str, list] = {}
    for snap in snapshots:
        for p in snap:
            if str(p.status).split(".")[-1] == "EXECUTED":
                by_node.setdefault(p.node_name, []).append(p)
    return [
        _Counter(ps[0], statistics.median(p.real_time.total_seconds() * 1000 for p in ps)) for ps in by_node.values()
    ]


def runtime_nodes(compiled) -> dict[str, dict]:
    out = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()

        def get(key, rt=rt):
            return rt[key].astype(str) if key in rt else ""

        out[op.get_friendly_name()] = {
            "layerType": get("layerType"),
            "runtimePrecision": get("runtimePrecision"),
            "originalLayersNames": get("originalLayersNames"),
            "outputPrecisions": get("outputPrecisions"),
            "in_shapes": [str(i.get_partial_shape()) for i in op.inputs()],
            "out_shape": str(op.output(0).get_partial_shape()) if op.get_output_size() else "",
        }
    return out


def fake_quantize_summary(model) -> dict:
    """FakeQuantize count and what each one feeds (through layout ops), in the source IR."""
    layout = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Convert")
    consumers: dict[str, int] = {}
    n = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        n += 1
        stack = [t.get_node() for t in op.output(0).get_target_inputs()]
        seen = 0
        while stack and seen < 16:
            node = stack.pop()
            seen += 1
            if node.get_type_name() in layout:
                stack.extend(t.get_node() for t in node.output(0).get_target_inputs())
                continue
            consumers[node.get_type_name()] = consumers.get(node.get_type_name(), 0) + 1
    types = {}
    for op in model.get_ordered_ops():
        t = op.get_type_name()
        if t in ("MatMul", "ScaledDotProductAttention", "TopK", "ScatterNDUpdate", "Gather", "Convolution"):
            types[t] = types.get(t, 0) + 1
    return {"fake_quantize": n, "fq_consumers": dict(sorted(consumers.items())), "ir_op_counts": types}


def detail(profiling_info, rt: dict) -> dict:
    fp_compute, layout, merge_nodes = [], {}, []
    for p in profiling_info:
        if str(p.status).split(".")[-1] != "EXECUTED":
            continue
        ms = p.real_time.total_seconds() * 1000
        prec = exec_precision(p.exec_type)
        node = rt.get(p.node_name, {})
        if p.node_type in COMPUTE_TYPES and prec in ("f32", "bf16", "f16"):
            orig = node.get("originalLayersNames", "")
            fp_compute.append(
                {
                    "node": p.node_name,
                    "type": p.node_type,
                    "exec_type": p.exec_type,
                    "ms": round(ms, 3),
                    "in_shapes": node.get("in_shapes"),
                    "out_shape": node.get("out_shape"),
                    "kind": classify(orig),
                    "originalLayersNames": orig,
                }
            )
        if p.node_type in LAYOUT_MERGE_TYPES:
            e = layout.setdefault(p.node_type, {"ms": 0.0, "count": 0})
            e["ms"] = round(e["ms"] + ms, 3)
            e["count"] += 1
            if p.node_type in MERGE_NODE_TYPES and ms >= 1.0:
                merge_nodes.append(
                    {
                        "node": p.node_name,
                        "type": p.node_type,
                        "exec_type": p.exec_type,
                        "ms": round(ms, 3),
                        "in_shapes": node.get("in_shapes"),
                        "originalLayersNames": node.get("originalLayersNames", ""),
                    }
                )
    # subgraph (Subgraph/MHA) nodes: int8 or float, with their time
    subgraphs: dict[str, dict] = {}
    for p in profiling_info:
        if str(p.status).split(".")[-1] != "EXECUTED" or p.node_type not in (
            "Subgraph",
            "MHA",
            "ScaledDotProductAttention",
        ):
            continue
        key = f"{p.node_type}/{exec_precision(p.exec_type)}"
        e = subgraphs.setdefault(key, {"ms": 0.0, "count": 0})
        e["ms"] = round(e["ms"] + p.real_time.total_seconds() * 1000, 3)
        e["count"] += 1
    return {
        "fp_compute": sorted(fp_compute, key=lambda d: -d["ms"]),
        "layout_merge": layout,
        "merge_nodes": sorted(merge_nodes, key=lambda d: -d["ms"]),
        "subgraphs": subgraphs,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="NAME=FOLDER_OR_XML (default: int8 and tome of --work-dir)")
    ap.add_argument("--work-dir", default=None, help="an `ov-sd bench --arch sd15 --work-dir` folder")
    ap.add_argument("--runs", type=int, default=2, help="timed inferences per model after one warm-up (round-robin)")
    ap.add_argument("--threads", type=int, default=1, help="INFERENCE_NUM_THREADS")
    ap.add_argument("--output", default=str(Path(__file__).with_suffix(".json")), help="JSON output ('' for none)")
    args = ap.parse_args(argv)
    if not args.models:
        if args.work_dir is None:
            ap.error("give NAME=FOLDER models or --work-dir (an `ov-sd bench --arch sd15 --work-dir` folder)")
        args.models = [f"{name}={Path(args.work_dir) / folder}" for name, folder in WORK_DIR_MODELS.items()]

    import numpy as np
    import openvino as ov

    core = ov.Core()
    rng = np.random.default_rng(0)
    entries = []
    for spec in args.models:
        name, _, path = spec.partition("=")
        xml = unet_xml(path)
        model = core.read_model(xml)
        fq = fake_quantize_summary(model)
        t = time.perf_counter()
        compiled = core.compile_model(model, "CPU", {"PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": args.threads})
        compile_s = time.perf_counter() - t
        feed = feed_for(compiled, rng)
        request = compiled.create_infer_request()
        request.infer(feed)  # warm-up (allocations)
        entries.append(
            {
                "name": name,
                "xml": str(xml),
                "compiled": compiled,
                "request": request,
                "feed": feed,
                "times_s": [],
                "snapshots": [],
                "compile_s": round(compile_s, 1),
                "source_ir": fq,
                "precision_hint": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
            }
        )
        del model
        print(f"{name}: compiled in {compile_s:.1f} s, {fq['fake_quantize']} FakeQuantize", flush=True)
    load_before = os.getloadavg()
    for r in range(args.runs):
        for e in entries:
            t = time.perf_counter()
            e["request"].infer(e["feed"])
            e["times_s"].append(round(time.perf_counter() - t, 3))
            e["snapshots"].append(e["request"].profiling_info)
        print(
            f"run {r + 1}/{args.runs}: " + ", ".join(f"{e['name']} {e['times_s'][-1]:.2f} s" for e in entries),
            flush=True,
        )
    load_after = os.getloadavg()

    results = {}
    for e in entries:
        info = median_profile(e["snapshots"])
        rt = runtime_nodes(e["compiled"])
        results[e["name"]] = {
            "xml": e["xml"],
            "compile_s": e["compile_s"],
            "precision_hint": e["precision_hint"],
            "times_s": e["times_s"],
            "median_s": statistics.median(e["times_s"]),
            "source_ir": e["source_ir"],
            "profile": summarize_profile(info),
            **detail(info, rt),
        }
    print_tables(results)
    if args.output:
        cpu_flags = sorted(
            {f for f in open("/proc/cpuinfo").read().split() if f.startswith(("avx512", "amx", "avx_vnni"))}
        )
        out = {
            "machine": {
                "cpu_flags": cpu_flags,
                "cpu": _cpu_model(),
                "platform": platform.platform(),
                "loadavg": [load_before, load_after],
                "threads": args.threads,
                "openvino": ov.get_version(),
            },
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "models": results,
        }
        Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {args.output}")


def _cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def print_tables(results: dict) -> None:
    names = list(results)
    print(
        "\n| step (s) | "
        + " | ".join(f"{n}: {results[n]['median_s']:.2f} (runs {results[n]['times_s']})" for n in names)
        + " |"
    )
    print("\nTime by executed node type / precision (ms, per-node median over the timed runs):")
    rows: dict[str, dict[str, float]] = {}
    for n in names:
        for t in results[n]["profile"]["by_type"]:
            for k, v in t.items():
                if k in ("node_type", "ms", "count"):
                    continue
                rows.setdefault(f"{t['node_type']}/{k}", {})[n] = v
    order = sorted(rows, key=lambda k: -max(rows[k].values()))
    print("| node type / precision | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for k in order:
        if max(rows[k].values()) < 5:
            continue
        print(f"| {k} | " + " | ".join(f"{rows[k].get(n, 0):.0f}" for n in names) + " |")
    print("| total | " + " | ".join(f"{results[n]['profile']['total_ms']:.0f}" for n in names) + " |")
    print("| by precision | " + " | ".join(str(results[n]["profile"]["by_precision_ms"]) for n in names) + " |")
    for n in names:
        r = results[n]
        print(f"\n[{n}] source IR: {r['source_ir']}")
        print(f"[{n}] subgraphs: {r['subgraphs']}")
        print(f"[{n}] layout/merge ops: {r['layout_merge']}")
        for d in r["merge_nodes"][:8]:
            print(f"   {d['ms']:8.1f} ms {d['type']:15s} {d['in_shapes']}  {d['originalLayersNames'][:120]}")
        print(f"[{n}] float compute nodes ({len(r['fp_compute'])}):")
        for d in r["fp_compute"][:20]:
            print(
                f"   {d['ms']:8.1f} ms {d['type']:15s} {d['exec_type']:22s} {d['in_shapes']} -> {d['out_shape']}  "
                f"[{d['kind']}] {d['originalLayersNames'][:160]}"
            )


if __name__ == "__main__":
    main()
