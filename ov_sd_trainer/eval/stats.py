"""Paired bootstrap comparison of two evaluated variants: how much A is better than B, with a 95 % interval."""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .metrics import ACCURACY_KEYS, FIDELITY_METRICS


def _num(x) -> float:
    return float(x) if not isinstance(x, str) else float(x.replace("inf", "Infinity"))


def paired_comparison(result: dict, a: str, b: str, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """How much variant `a` is better than variant `b`, metric by metric, with a paired bootstrap 95% interval.

    Every image (and every UNet input) is seen by both variants, so differences are paired: the bootstrap
    resamples images (UNet inputs for the noise MSE) with replacement, `n_boot` times, and recomputes each metric
    as the result does (pooled PSNR from per-image MSEs, means otherwise). `margin` > 0 means `a` is better
    (higher PSNR/SSIM/accuracy, lower MSE). Returns one dict per metric: metric, a, b, margin, ci_low, ci_high."""
    va = next((v for v in result["variants"] if v["name"] == a), None)
    vb = next((v for v in result["variants"] if v["name"] == b), None)
    if va is None or vb is None or va.get("backend") == "pytorch" or vb.get("backend") == "pytorch":
        raise UserError(f"compare two evaluated --model variants by name, got {a!r} and {b!r}")
    rng = np.random.default_rng(seed)

    def mse_from_psnr(values):
        return 10.0 ** (-np.array([_num(x) for x in values]) / 10.0)  # data range 1

    def pooled_psnr(mse):
        m = mse.mean(-1)
        return np.where(m > 0, -10.0 * np.log10(np.maximum(m, 1e-300)), np.inf)

    def mean(x):
        return x.mean(-1)

    per = {}
    for key, _, _, higher_better in FIDELITY_METRICS:
        if va["per_image"].get(key) is None or vb["per_image"].get(key) is None:
            continue  # not measured for one of them (an LCM UNet's noise MSE)
        if key == "psnr":  # recomputed as the result computes it: PSNR of the pooled per-image MSE
            xa, xb, stat = mse_from_psnr(va["per_image"]["psnr"]), mse_from_psnr(vb["per_image"]["psnr"]), pooled_psnr
        else:
            xa, xb, stat = np.array(va["per_image"][key], float), np.array(vb["per_image"][key], float), mean
        per[key] = (xa, xb, stat, 1 if higher_better else -1)
    fa, fb = va.get("few_step"), vb.get("few_step")
    for k in (fa or {}).get("ode", {}) if fb else ():  # few-step variants: PSNR against the teacher's ODE endpoints
        if k in fb["ode"]:
            xa, xb = (mse_from_psnr(f["ode"][k]["per_image_psnr"]) for f in (fa, fb))
            per[f"psnr_vs_teacher_{k}"] = (xa, xb, pooled_psnr, 1)
    for k in ACCURACY_KEYS:
        per[f"accuracy_{k}"] = (
            np.array(va["per_image"]["correct"][k], float),
            np.array(vb["per_image"]["correct"][k], float),
            mean,
            +1,
        )
    rows = []
    for metric, (xa, xb, stat, sign) in per.items():
        idx = rng.integers(0, len(xa), size=(n_boot, len(xa)))
        boot = sign * (stat(xa[idx]) - stat(xb[idx]))
        lo, hi = np.percentile(boot[np.isfinite(boot)], [2.5, 97.5]) if np.isfinite(boot).any() else (np.nan,) * 2
        sa, sb = float(stat(xa)), float(stat(xb))
        rows.append(dict(metric=metric, a=sa, b=sb, margin=sign * (sa - sb), ci_low=float(lo), ci_high=float(hi)))
    return rows


def comparison_markdown(rows: list[dict], a: str, b: str) -> str:
    lines = [
        f"| metric | {b} | {a} | margin ({a} better by) | 95% CI (paired bootstrap) | {a} >= {b} |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        pct = r["metric"].startswith("accuracy")
        f = (lambda x: f"{x:+.1%}") if pct else (lambda x: f"{x:+.4g}")
        g = (lambda x: f"{x:.1%}") if pct else (lambda x: f"{x:.4g}")
        verdict = "yes" if r["margin"] >= 0 else "**no**"
        if r["ci_low"] > 0:
            verdict += " (CI > 0)"
        elif r["ci_high"] < 0:
            verdict += " (CI < 0)"
        lines.append(
            f"| {r['metric']} | {g(r['b'])} | {g(r['a'])} | {f(r['margin'])} | [{f(r['ci_low'])}, {f(r['ci_high'])}] "
            f"| {verdict} |"
        )
    return "\n".join(lines)
