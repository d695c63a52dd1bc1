"""What `ov-sd eval` writes: eval.json, eval.md (the table), grid.png, evaluate/ (`evaluate.save`), and the
fidelity section + Hub `model-index` of an evaluated folder's model card.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import UserError
from .metrics import ACCURACY_KEYS, FIDELITY_METRICS
from .stats import comparison_markdown

RESULT_FILE = "eval.json"
TABLE_FILE = "eval.md"
GRID_FILE = "grid.png"
EVALUATE_DIR = "evaluate"


def grid_columns(n_jobs: int, n: int) -> list[int]:
    """Job indices of the grid's `n` columns: a golden-ratio stride through the jobs (seed-major, the prompt set
    varying shape first), so neighbouring columns differ in shape, colour, background and seed; no repeats."""
    n = max(1, min(n, n_jobs))
    picked: list[int] = []
    i = 0
    while len(picked) < n:  # frac(i * phi) is equidistributed: every job is reached eventually
        j = int(i * 0.6180339887498949 * n_jobs) % n_jobs
        i += 1
        if j not in picked:
            picked.append(j)
    return picked


def make_grid(rows: list[list], scale: int = 1):
    """Rows of equally sized PIL images -> one image (len(row) * W * scale) x (len(rows) * H * scale)."""
    from PIL import Image

    w, h = rows[0][0].size
    cw, ch = w * scale, h * scale
    grid = Image.new("RGB", (cw * len(rows[0]), ch * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((cw, ch), Image.Resampling.NEAREST), (c * cw, r * ch))
    return grid


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return fmt.format(value)


def table_rows(result: dict) -> list[dict]:
    """One dict per row (teacher first) with the table's columns; shared by eval.md and the model card."""
    has_clip = any(v.get("clip_score") is not None for v in result["variants"])
    rows = []
    for v in result["variants"]:
        row = {"variant": v["name"], "what": v["description"]}
        for key, title, fmt, _ in FIDELITY_METRICS:
            row[title] = _fmt(v.get(key), fmt)
        for key in ACCURACY_KEYS:
            title = "all three" if key == "all" else key
            row[title] = f"{v['accuracy'][key]:.1%}"
        if has_clip:
            row["CLIP score"] = _fmt(v.get("clip_score"), "{:.2f}")
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def markdown_report(result: dict) -> str:
    s = result["settings"]
    grid = result["grid"]
    cols = ", ".join(f"`{c['prompt']}` (seed {c['seed']})" for c in grid["columns"])
    return "\n".join(
        [
            "# Fidelity to the FP32 teacher",
            "",
            f"Reference (teacher): `{result['reference']}`, PyTorch FP32. {s['prompts']} prompts x {s['seeds']} seeds "
            f"= {s['images']} images, {s['steps']} steps, guidance {s['guidance_scale']}, {s['scheduler']}, "
            f"{s['width']}x{s['height']} px, OpenVINO precision `{s['precision']}`; same initial latents for all.",
            "",
            markdown_table(table_rows(result)),
            "",
            "PSNR/SSIM: images vs the teacher's (torchmetrics; PSNR of the pooled MSE). latent MSE: final latents "
            "before the VAE. UNet noise MSE: the variant's UNet IR vs the torch teacher UNet on "
            f"{s['unet_samples']} fixed (noised latent, timestep, text) inputs. shape/color/background/all three: "
            "prompt accuracy by the judge.",
            "",
            f"`{GRID_FILE}`: rows {', '.join(grid['rows'])}; columns {cols}.",
            "",
        ]
        + few_step_markdown(result)
        + [
            f"{key}: PSNR {t['psnr']:.2f} dB, SSIM {t['ssim']:.4f} (the same latents).\n"
            for key, t in (result.get("twins") or {}).items()
        ]
        + decoders_markdown(result)
        + [
            f"## {key}\n\n{comparison_markdown(rows, *key.split(' vs '))}\n"
            for key, rows in result.get("comparisons", {}).items()
        ]
    )


def few_step_markdown(result: dict) -> list[str]:
    """The few-step variants against the teacher's ODE endpoints (`fewstep`), as lines of eval.md."""
    rows = [v for v in result["variants"] if v.get("few_step")]
    if not rows:
        return []
    ode_keys = list(rows[0]["few_step"]["ode"])
    head = ["variant", "steps", "guidance", "scheduler", *(f"PSNR / SSIM vs teacher {k}" for k in ode_keys),
            "Fréchet distance (judge features)", "teacher floor", "x floor", "all three"]  # fmt: skip
    lines = ["## Few-step variants against the teacher's ODE endpoints", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for v in rows:
        f = v["few_step"]
        cells = [v["name"], f["steps"], f"{f['guidance_scale']:g}", f["scheduler"],
                 *(f"{f['ode'][k]['psnr']:.2f} / {f['ode'][k]['ssim']:.4f}" for k in ode_keys),
                 f"{f['frechet_distance']:.4g}", f"{f['frechet_floor']:.4g}",
                 _fmt(f["frechet_vs_floor"], "{:.2f}"), f"{v['accuracy']['all']:.1%}"]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "Teacher: the same initial latents at the variant's guidance, deterministic DDIM without clipping. "
              "Floor: the teacher's images at other seeds against its own, in the same features.", ""]  # fmt: skip
    return lines


def decoders_markdown(result: dict) -> list[str]:
    """Tiny against full VAE decode of the same latents (`fewstep.decoder_comparison`), as lines of eval.md."""
    rows = [v for v in result["variants"] if v.get("decoders")]
    if not rows:
        return []
    lines = ["## Tiny VAE decoder against the full one (same final latents)", "",
             "| variant | active | PSNR (dB) | SSIM | all three, full decode | all three, tiny decode |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for v in rows:
        d = v["decoders"]
        lines.append(f"| {v['name']} | {d['active']} | {d['psnr']:.2f} | {d['ssim']:.4f} | "
                     f"{d['accuracy']['full']['all']:.1%} | {d['accuracy']['tiny']['all']:.1%} |")  # fmt: skip
    return [*lines, ""]


def _jsonable(obj):
    """inf -> "inf", nan -> None (strict JSON has neither)."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def model_index_metrics(result: dict, name: str) -> list[dict]:
    """The Hub model-index metrics of one variant: dicts with type, name, value (finite values only)."""
    v = next((v for v in result["variants"] if v["name"] == name), None)
    if v is None:
        raise UserError(f"no variant named {name!r} in the results")
    metrics = []
    for key, title, _, _ in FIDELITY_METRICS:
        value = v.get(key)
        if isinstance(value, float) and math.isfinite(value):
            metrics.append(dict(type=key, name=f"{title} vs FP32 teacher", value=float(f"{value:.6g}")))
    for key in ACCURACY_KEYS:
        label = "all three attributes" if key == "all" else key
        metrics.append(
            dict(type="accuracy", name=f"prompt accuracy ({label}, judge)", value=float(f"{v['accuracy'][key]:.6g}"))
        )
    if v.get("clip_score") is not None:
        metrics.append(dict(type="clip_score", name="CLIP score", value=float(f"{v['clip_score']:.6g}")))
    return metrics


def eval_dataset_name(result: dict) -> str:
    s = result["settings"]
    return (
        f"ov-sd-trainer prompt set, {s['prompts']} prompts x {s['seeds']} seeds, {s['steps']} steps, "
        f"guidance {s['guidance_scale']}, {s['width']} px, vs the FP32 teacher"
    )


def write_outputs(output: str | Path, result: dict, grid_rows: list[list], grid_scale: int, overwrite: bool = False,
                  extra_files: dict[str, str] | None = None) -> Path:  # fmt: skip
    """eval.json, eval.md, grid.png, evaluate.save(...) and `extra_files` (name -> text) into `output`, atomically."""
    import evaluate

    from ..outputs import atomic_output_dir

    result = _jsonable(result)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        (tmp / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n")
        (tmp / TABLE_FILE).write_text(markdown_report(result))
        make_grid(grid_rows, grid_scale).save(tmp / GRID_FILE)
        summary = {
            v["name"]: {k: v.get(k) for k in ("psnr", "ssim", "latent_mse", "noise_pred_mse", "clip_score")}
            | {f"accuracy_{k}": v["accuracy"][k] for k in ACCURACY_KEYS}
            for v in result["variants"]
        }
        evaluate.save(
            str(tmp / EVALUATE_DIR), reference=result["reference"], settings=result["settings"], results=summary
        )
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(output)


def update_cards(result: dict, folders: list[str | Path]) -> list[Path]:
    """Write the results into the model card (README.md) of each evaluated folder in `folders`."""
    from ..export.card import update_model_card

    by_path = {Path(v["path"]).resolve(): v["name"] for v in result["variants"][1:]}
    done = []
    for folder in folders:
        folder = Path(folder).expanduser().resolve()
        if folder not in by_path:
            raise UserError(f"--update-card {str(folder)!r} is not one of the evaluated --model folders")
        name = by_path[folder]
        update_model_card(
            folder,
            model_name=name,
            rows=table_rows(result),
            metrics=model_index_metrics(result, name),
            dataset_name=eval_dataset_name(result),
            note=_card_note(result, name),
        )
        done.append(folder)
    return done


def _card_note(result: dict, name: str) -> str:
    s = result["settings"]
    return (
        f"Measured with `ov-sd eval` against the FP32 teacher (`{Path(result['reference']).name}`, PyTorch) on "
        f"{s['prompts']} prompts x {s['seeds']} seeds ({s['images']} images, {s['steps']} steps, guidance "
        f"{s['guidance_scale']}, {s['width']}x{s['height']} px, identical initial latents; OpenVINO precision "
        f"`{s['precision']}`). This model is the row `{name}`. PSNR/SSIM compare images with the teacher's, latent "
        "MSE the final latents, UNet noise MSE the UNet outputs on fixed inputs; accuracy is the prompt-fidelity "
        "judge's (shape, colour, background)."
    )
