"""Which ops of the int8 SD 1.5 UNet pay off in int8 on this CPU, and which are faster left in floating point.

Reads the IRs that `ov-sd bench --arch sd15 --work-dir DIR` builds and keeps (OpenVINO FP32, optimum's int8 PTQ, the
QAT int8 graph), derives variants of the QAT IR with some FakeQuantize nodes bypassed, and times them round-robin in
one process (every variant sees the same load drift):

    c            OpenVINO FP32 IR
    e            optimum-intel full int8 PTQ
    f            QAT int8 (NNCF), as exported
    f_attn_fp    QAT int8 with the activations feeding ScaledDotProductAttention left in FP (Q, K, V not
                 quantized), so OpenVINO can fuse the attention into its floating-point MHA kernel
    f_conv_only  as f_attn_fp and the Linear (FullyConnected) layers in FP too: only the convolutions are int8

    python benchmarks/int8_fp_ops.py --work-dir /tmp/bd/sd15 --output benchmarks/int8_fp_ops.json

Weights are untrained (speed only). The bypassed variants are experiments on the IR, not a product option.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze")
VARIANTS = ("c", "e", "f", "f_attn_fp", "f_conv_only")


def _is_constant_path(output, depth: int = 0) -> bool:
    node = output.get_node()
    if node.get_type_name() == "Constant":
        return True
    if node.get_type_name() in ("Convert", "Multiply", "Subtract", "Reshape", "Transpose") and depth < 6:
        return all(_is_constant_path(i.get_source_output(), depth + 1) for i in node.inputs())
    return False


def _feeds(node, op_type: str, depth: int = 0):
    """The first node of `op_type` that `node` feeds through layout ops, or None."""
    if node.get_type_name() == op_type:
        return node
    if node.get_type_name() in LAYOUT_OPS and depth < 4:
        for target in node.output(0).get_target_inputs():
            found = _feeds(target.get_node(), op_type, depth + 1)
            if found is not None:
                return found
    return None


def feeds_attention(node) -> bool:
    return _feeds(node, "ScaledDotProductAttention") is not None


def feeds_linear(node) -> bool:
    matmul = _feeds(node, "MatMul")
    return matmul is not None and any(_is_constant_path(i.get_source_output()) for i in matmul.inputs())


def bypass_fake_quantize(model, predicate) -> int:
    """Remove every FakeQuantize whose consumers all satisfy `predicate` (its input goes straight through)."""
    removed = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        consumers = [t.get_node() for t in op.output(0).get_target_inputs()]
        if consumers and all(predicate(c) for c in consumers):
            op.output(0).replace(op.input_value(0))
            removed += 1
    return removed


def find_ir(work_dir: Path, variant: str) -> Path:
    patterns = {"c": "openvino-fp32", "e": "optimum-int8-ptq-*", "f": "qat-int8-[0-9]*"}
    hits = sorted(work_dir.glob(patterns[variant.split("_")[0]] + "/unet/openvino_model.xml"))
    if not hits:
        sys.exit(f"int8_fp_ops: error: no {variant} IR under {work_dir}; build it with ov-sd bench --work-dir")
    return hits[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", required=True, help="the --work-dir of an `ov-sd bench --arch sd15` run")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=5, help="timed round-robin rounds after one warm-up call each")
    p.add_argument("--threads", type=int, default=0, help="INFERENCE_NUM_THREADS (0: OpenVINO default)")
    p.add_argument("--output", default=None, help="JSON file for the results (not overwritten)")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [n for n in names if n not in VARIANTS]:
        sys.exit(f"int8_fp_ops: error: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.output and Path(args.output).exists():
        sys.exit(f"int8_fp_ops: error: {args.output} exists; pass another --output or delete it")
    import numpy as np
    import openvino as ov

    core = ov.Core()
    rng = np.random.default_rng(0)
    feed = {
        "sample": rng.standard_normal((2, 4, 64, 64), dtype=np.float32),
        "timestep": np.array([500]),
        "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32),
    }
    requests, info = {}, {}
    for name in names:
        model = core.read_model(find_ir(Path(args.work_dir), name))
        record = {}
        if name in ("f_attn_fp", "f_conv_only"):
            record["fake_quantize_removed_attention"] = bypass_fake_quantize(model, feeds_attention)
        if name == "f_conv_only":
            record["fake_quantize_removed_linear"] = bypass_fake_quantize(model, feeds_linear)
        model.reshape({k: list(v.shape) for k, v in feed.items()})
        config = {"PERFORMANCE_HINT": "LATENCY"} | ({"INFERENCE_NUM_THREADS": args.threads} if args.threads else {})
        t = time.perf_counter()
        compiled = core.compile_model(model, "CPU", config)
        record["compile_s"] = round(time.perf_counter() - t, 1)
        del model
        requests[name] = compiled.create_infer_request()
        requests[name].infer(feed)  # warm-up
        info[name] = record | {"times_s": []}
        gc.collect()
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for name in names:
            t = time.perf_counter()
            requests[name].infer(feed)
            info[name]["times_s"].append(round(time.perf_counter() - t, 4))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {info[n]['times_s'][-1]:.2f}" for n in names))
    load_after = os.getloadavg()
    base = statistics.median(info[names[0]]["times_s"])
    print(
        f"\nSD 1.5 UNet, 512 px, batch 2, OpenVINO {ov.get_version().split('-')[0]}, median of {args.rounds} "
        f"round-robin rounds; load average {load_before[0]:.2f} before / {load_after[0]:.2f} after\n"
    )
    print(f"| variant | FQ removed (attention / linear) | s/step (median) | min | vs {names[0]} |")
    print("|---|---|---|---|---|")
    for name in names:
        med, low = statistics.median(info[name]["times_s"]), min(info[name]["times_s"])
        info[name] |= {"median_s": med, "min_s": low}
        removed = f"{info[name].get('fake_quantize_removed_attention', 0)} / {info[name].get('fake_quantize_removed_linear', 0)}"
        print(f"| {name} | {removed} | {med:.2f} | {low:.2f} | {base / med:.2f}x |")
    if args.output:
        result = {"variants": info, "loadavg": [load_before, load_after], "openvino": ov.get_version()}
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
