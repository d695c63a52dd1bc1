"""The model card (README.md) of an exported OpenVINO pipeline folder: written at export, updated by `ov-sd eval`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..families import DEFAULT_PIPELINE_CLASS, PIPELINE_CLASSES, SAMPLING_STEPS
from ..pipeline_folder import pipeline_class_name

CARD_FILE = "README.md"
FIDELITY_HEADING = "## Fidelity to the FP32 model"
EVAL_TASK = ("text-to-image", "Text-to-Image")
EVAL_DATASET_TYPE = "ov-sd-trainer/prompt-set"  # the fixed prompt set of `ov-sd eval`, not a Hub dataset


GAP_COLUMNS = (
    ("teacher_mse", "student vs teacher MSE"),
    ("task_loss", "task loss"),
    ("few_step_psnr", "few-step image PSNR vs the teacher's ODE endpoint (dB)"),
    ("few_step_mse", "few-step final-latent MSE"),
)


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def card_metadata(base_model: str, recipe: dict, results: dict) -> dict:
    base = recipe.get("pretrained_model_name_or_path", base_model)
    meta = {
        "library_name": "optimum-intel",
        "pipeline_tag": "text-to-image",
        "tags": [
            "openvino",
            "stable-diffusion",
            "text-to-image",
            "int8",
            "nncf",
            "quantization-aware-training",
            "ov-sd-trainer",
        ],  # fmt: skip
        "license": "openrail",
    }
    if "/" in base and not Path(base).exists():  # a Hub id: link the base model on the Hub
        meta["base_model"] = base
    dataset = recipe.get("dataset_name")
    if dataset and "/" in dataset and not Path(dataset).exists():
        meta["datasets"] = [dataset]
    if results.get("model_index"):
        meta["model-index"] = results["model_index"]
    return meta


def _yaml(meta: dict) -> str:
    import yaml

    return yaml.safe_dump(meta, sort_keys=False).strip()


def write_model_card(folder: str | Path, base_model: str, recipe: dict, results: dict, samples: list[dict]):
    """README.md with Hub metadata, what the model is, how it was made, its numbers and usage."""
    folder = Path(folder)
    meta = card_metadata(base_model, recipe, results)
    training = results.get("training", {})
    size_rows = [
        {
            "UNet FP32 (MB)": f"{results['unet_fp32_bytes'] / 1e6:.2f}",
            "UNet int8 (MB)": f"{results['unet_int8_bytes'] / 1e6:.2f}",
            "ratio": results["unet_size_ratio"],
            "FakeQuantize ops": results["fake_quantize_ops"],
        }
    ]
    res = recipe.get("resolution", 512)
    few_step = results.get("few_step")
    parts = [
        f"---\n{_yaml(meta)}\n---",
        f"# {folder.name if not folder.name.startswith('.') else 'OpenVINO int8 Stable Diffusion'}",
        (
            "An OpenVINO Stable Diffusion pipeline whose UNet was quantized to 8 bits with quantization-aware "
            "training (NNCF, distillation from the FP32 UNet, EMA) by "
            if few_step is None or few_step.get("quantization_scheme") != "none"
            else "An OpenVINO Stable Diffusion pipeline with a float UNet trained by "
        )
        + "[ov-sd-trainer](https://github.com/ov-sd-trainer/ov-sd-trainer). Text encoder and VAE are exported "
        "unchanged with optimum-intel.",
        None
        if few_step is None
        else "It is a few-step **latent consistency** student of the base model (consistency distillation with the "
        "guidance distilled in, `objective: consistency`; "
        + ("float UNet, no quantization" if few_step.get("quantization_scheme") == "none" else "int8 during training")
        + f"): it was trained to sample in **{few_step['steps']} steps at guidance scale "
        f"{few_step['guidance_scale']}** with `LCMScheduler`, one UNet call per step (no classifier-free guidance "
        f"batch); guidance scales {few_step['w_range'][0] + 1:g} to {few_step['w_range'][1] + 1:g} were seen in "
        "training." + _float_start(few_step),
        "## Training",
        f"- base model: `{recipe.get('pretrained_model_name_or_path', base_model)}`",
        f"- dataset: `{recipe.get('dataset_name', 'n/a')}`",
        f"- steps: {training.get('global_step', recipe.get('max_steps', 'n/a'))}, "
        f"training time: {training.get('train_runtime_s', 'n/a')} s",
        "",
        "Recipe:",
        "```json\n" + json.dumps(recipe, indent=2, default=str) + "\n```",
        "## Size",
        _md_table(size_rows),
    ]
    gap = training.get("teacher_gap") or []
    if gap:
        best = training.get("best_checkpoint")
        parts += [
            "## Teacher gap during training",
            "The student (its EMA when training kept one) against the FP32 teacher on "
            f"{training.get('teacher_gap_samples', 'the')} fixed held-out items, measured by the training loop: "
            "noise-prediction MSE on held-out UNet inputs, or for a few-step student the PSNR and latent MSE of its "
            "few-step samples against the teacher's ODE endpoints; step 0 is the student before training."
            + (f" The exported model is the best evaluation, `{Path(best).name}`." if best else ""),
            _md_table(
                [
                    {
                        "step": g["step"],
                        **{
                            label: f"{g[key]:.6f}" if g.get(key) is not None else ""
                            for key, label in GAP_COLUMNS
                            if any(h.get(key) is not None for h in gap)
                        },
                    }
                    for g in gap
                ]
            ),  # fmt: skip
        ]
    if results.get("benchmark"):
        parts += ["## Benchmark", _md_table(results["benchmark"])]
    if results.get("fidelity"):
        parts.append(fidelity_section(results["fidelity"], results.get("fidelity_note", "")))
    if samples:
        parts.append("## Samples")
        parts += [
            f"![{s['prompt']}]({s['file']})  \n`{s['prompt']}` (seed {s['seed']}, {s['steps']} steps)" for s in samples
        ]
    class_name = pipeline_class_name(folder) if (folder / "model_index.json").is_file() else DEFAULT_PIPELINE_CLASS
    ov_class, steps = PIPELINE_CLASSES[class_name], SAMPLING_STEPS[class_name]
    guidance = ""
    if few_step is not None:  # what the student was trained for
        steps, guidance = few_step["steps"], f", guidance_scale={few_step['guidance_scale']}"
    parts += [
        "## Usage",
        f"```python\nfrom optimum.intel import {ov_class}\n\n"
        f'pipe = {ov_class}.from_pretrained("<this folder or repo id>", compile=False)\n'
        f"pipe.reshape(batch_size=1, height={res}, width={res}, num_images_per_prompt=1)\n"
        "pipe.compile()\n"
        f'image = pipe("{samples[0]["prompt"] if samples else "a prompt"}", num_inference_steps={steps}).images[0]\n```',
        "Or with OpenVINO GenAI (no torch; also from C++), which the folder's tokenizer IRs "
        "(`tokenizer/openvino_tokenizer.xml`) are for:",
        "```python\nimport openvino_genai\n\n"
        'pipe = openvino_genai.Text2ImagePipeline("<this folder>", "CPU")\n'
        f'image = pipe.generate("{samples[0]["prompt"] if samples else "a prompt"}", num_inference_steps={steps}{guidance}, '
        f"height={res}, width={res}, generator=openvino_genai.TorchGenerator(0))  # image.data[0]: HxWx3 uint8\n```",
    ]
    (folder / CARD_FILE).write_text("\n\n".join(p for p in parts if p is not None) + "\n")


def fidelity_section(rows: list[dict], note: str = "") -> str:
    """The card's fidelity section: heading, what was measured, the table (one row per variant)."""
    return "\n\n".join(p for p in (FIDELITY_HEADING, note, _md_table(rows)) if p)


def eval_model_index(model_name: str, metrics: list[dict], dataset_name: str,
                     dataset_type: str = EVAL_DATASET_TYPE) -> list[dict]:  # fmt: skip
    """Hub `model-index` metadata for `metrics` (dicts with type, name, value), built with huggingface_hub's
    `EvalResult`, so the Hub shows them as evaluation results and `ModelCard.load` parses them back."""
    from huggingface_hub import EvalResult
    from huggingface_hub.repocard_data import eval_results_to_model_index

    if not metrics:
        raise ValueError("no metrics for the model-index")
    results = [
        EvalResult(
            task_type=EVAL_TASK[0],
            task_name=EVAL_TASK[1],
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            metric_type=m["type"],
            metric_name=m["name"],
            metric_value=m["value"],
        )
        for m in metrics
    ]
    return eval_results_to_model_index(model_name, results)


def _split_card(text: str) -> tuple[dict, str]:
    """(metadata, body) of a model card; a card without YAML front matter has empty metadata."""
    import yaml

    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            meta = yaml.safe_load(text[4:end]) or {}
            if not isinstance(meta, dict):
                raise UserError("the model card's metadata block is not a YAML mapping")
            return meta, text[end + 4 :].lstrip("\n")
    return {}, text


def replace_section(body: str, heading: str, section: str, before: tuple[str, ...] = ("## Samples", "## Usage")) -> str:
    """Replace the `heading` section of a markdown body (up to the next `## `), or insert it before the first of
    `before` found, or append it."""
    lines = body.rstrip("\n").split("\n")
    new = section.rstrip("\n").split("\n")
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new + ([""] if end < len(lines) else [])
    else:
        at = next((i for i, line in enumerate(lines) if line in before), len(lines))
        lines[at:at] = ([""] if at == len(lines) else []) + new + ([""] if at < len(lines) else [])
    return "\n".join(lines) + "\n"


def update_model_card(folder: str | Path, *, model_name: str, rows: list[dict], metrics: list[dict],
                      dataset_name: str, note: str = "") -> Path:  # fmt: skip
    """Put evaluation results into an existing model card (README.md): the fidelity section (table of `rows`) is
    added or replaced, and the metadata's `model-index` is set from `metrics` (see `eval_model_index`).

    Other metadata and sections stay as they are; the file is replaced in one rename."""
    card = Path(folder) / CARD_FILE
    if not card.is_file():
        raise UserError(f"{str(folder)!r} has no model card ({CARD_FILE}) to update")
    meta, body = _split_card(card.read_text())
    meta["model-index"] = eval_model_index(model_name, metrics, dataset_name)
    text = f"---\n{_yaml(meta)}\n---\n\n" + replace_section(body, FIDELITY_HEADING, fidelity_section(rows, note))
    tmp = card.with_name(f".{CARD_FILE}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, card)
    finally:
        tmp.unlink(missing_ok=True)
    return card


def _float_start(few_step: dict) -> str:
    """The card's sentence on a student started from a float consistency student (`init_student`), else ""."""
    if not few_step.get("init_student"):
        return ""
    learned = (
        "that student's outputs (QAT with the float student as the teacher)."
        if few_step.get("qat_teacher") == "init_student"
        else "the base model through the consistency loss (float, then QAT)."
    )
    return f" It started from the float consistency student `{few_step['init_student']}` and learned from {learned}"
