"""Fidelity of optimized OpenVINO pipelines to their FP32 teacher: `ov-sd eval`.

    ov-sd eval --reference ov_sd_trainer/assets/reference \
        --model qat=outputs/reference-int8/openvino --model ptq=outputs/reference-ptq --output docs/eval

The teacher (`--reference`, a diffusers folder run in PyTorch FP32) and every variant (`--model`, an
OpenVINO pipeline folder run by optimum-intel's `OVStableDiffusionPipeline`) generate the fixed prompt set
(`quality.prompt_set`) x seeds from the same initial latents (passed as `latents=`, drawn as `quality`
draws them), with the teacher's scheduler, the same steps and guidance. Per variant:

- image PSNR and SSIM against the teacher's images (torchmetrics; PSNR of the mean squared error over the
  whole image set, data range 1; SSIM averaged over images, 11x11 Gaussian window);
- final-latent MSE: the latents after the last denoising step, before the VAE decoder;
- UNet noise-prediction MSE on fixed inputs (the teacher's final latents noised at evenly spread
  timesteps, the teacher's text embeddings): the variant's UNet IR, compiled directly, against the torch
  teacher UNet. This isolates the UNet's error from the way small errors grow along a trajectory;
- prompt accuracy by the reference judge (shape / colour / background / all three), the teacher's row
  being the baseline;
- CLIP score (torchmetrics `CLIPScore`) when `--clip-model DIR` names a local CLIP model.

`--compare A,B` adds a paired bootstrap comparison of two variants (`paired_comparison`): how much A is better
than B on each metric, with a 95% interval.

Writes, atomically, `eval.json`, `eval.md` (the table), `grid.png` (rows: teacher then variants in order;
columns: evenly spaced prompt/seed samples) and `evaluate/result-*.json` (`evaluate.save`). `--update-card`
writes the results into an evaluated folder's model card (table + Hub `model-index`, see `hub.py`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

REFERENCE_NAME = "fp32"
RESULT_FILE = "eval.json"
TABLE_FILE = "eval.md"
GRID_FILE = "grid.png"
EVALUATE_DIR = "evaluate"
PRECISIONS = ("f32", "default")
# Metrics of a variant against the teacher, in table order: key, column title, format, higher is better.
FIDELITY_METRICS = (
    ("psnr", "PSNR (dB)", "{:.2f}", True),
    ("ssim", "SSIM", "{:.4f}", True),
    ("latent_mse", "latent MSE", "{:.3g}", False),
    ("noise_pred_mse", "UNet noise MSE", "{:.3g}", False),
)
ACCURACY_KEYS = ("shape", "color", "background", "all")


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


def parse_model_spec(spec: str) -> tuple[str, Path]:
    """`NAME=DIR` or `DIR` -> (name, path). A bare `.../openvino` folder is named after its parent (the run)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    if sep and (not name or not path):
        raise UserError(f"--model {spec!r}: use NAME=DIR or DIR")
    p = Path(path).expanduser()
    if not name:
        resolved = p.resolve()
        name = resolved.parent.name if resolved.name == "openvino" else resolved.name
    return name, p


def _unet_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def check_reference(path: str | Path) -> Path:
    from .generate import is_openvino_folder
    from .models import check_pipeline_source

    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"--reference {str(path)!r} does not exist; pass the FP32 diffusers pipeline folder")
    if is_openvino_folder(path):
        raise UserError(
            f"--reference {str(path)!r} is an OpenVINO folder; pass the FP32 diffusers pipeline (the teacher) "
            "and the OpenVINO folders with --model"
        )
    check_pipeline_source(str(path.resolve()))
    return path.resolve()


def check_variant(name: str, path: Path, reference: Path) -> Path:
    """A variant must be an OpenVINO pipeline folder of the same model geometry as the reference."""
    from .generate import _default_size, is_openvino_folder

    label = f"--model {name}={path}"
    if not path.exists():
        raise UserError(f"{label}: folder does not exist")
    if not path.is_dir() or not is_openvino_folder(path) or not (path / "model_index.json").is_file():
        raise UserError(
            f"{label}: not an OpenVINO pipeline folder (needs model_index.json and unet/openvino_model.xml); "
            "pass a folder written by `ov-sd export`, train.py (output_dir/openvino) or optimum-intel"
        )
    size, ref_size = _default_size(str(path)), _default_size(str(reference))
    if size != ref_size:
        raise UserError(
            f"{label}: made for {size[1]}x{size[0]} px images, the reference for {ref_size[1]}x{ref_size[0]}; "
            "evaluate variants of the reference model"
        )
    cfg, ref_cfg = _unet_config(path), _unet_config(reference)
    for key in ("in_channels", "cross_attention_dim", "sample_size"):
        if key in cfg and key in ref_cfg and cfg[key] != ref_cfg[key]:
            raise UserError(
                f"{label}: UNet {key} {cfg[key]} differs from the reference's {ref_cfg[key]}; "
                "evaluate variants of the reference model"
            )
    return path.resolve()


def describe_variant(path: Path) -> str:
    """What a variant folder holds, from the files its writer leaves (informative only)."""
    import openvino as ov

    from .quantization import count_fake_quantize, count_int8_constants

    recipe_file = path / "training_recipe.json"  # written by ov-sd-trainer's export
    if recipe_file.is_file():
        try:
            ratio = float(json.loads(recipe_file.read_text()).get("tome_ratio") or 0)
        except (ValueError, TypeError, AttributeError):
            ratio = 0.0
        return f"QAT int8 + ToMe {ratio:g} (ov-sd-trainer)" if ratio > 0 else "QAT int8 (ov-sd-trainer)"
    if (path / "ptq_info.json").is_file():  # written by ov_sd_trainer.ptq
        try:
            fix = json.loads((path / "ptq_info.json").read_text())["quantization"]["overflow_fix"]
        except (ValueError, KeyError, TypeError):
            fix = None
        return "PTQ int8 (optimum-intel)" + (f", overflow fix {fix}" if fix and fix != "disable" else "")
    unet = ov.Core().read_model(path / "unet" / "openvino_model.xml")
    if count_fake_quantize(unet):
        return "int8 UNet"
    return "int8-weight UNet" if count_int8_constants(unet) else "float UNet"


def initial_latents(jobs: list[dict], shape: tuple[int, int, int]) -> torch.Tensor:
    """(N, C, h, w) starting noise, one generator per image seeded as `quality.prompt_accuracy` seeds it
    (1000 * seed + prompt index), so accuracy here equals `quality`'s and does not depend on the batch."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(1000 * j["seed"] + j["index"])) for j in jobs]
    )


# --------------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------------


class _FinalLatents:
    """`callback_on_step_end` keeping the latents after the latest step (the final ones once the loop ends)."""

    def __init__(self):
        self.latents = None

    def __call__(self, pipe, step, timestep, callback_kwargs):
        self.latents = torch.as_tensor(callback_kwargs["latents"]).detach().float().clone()
        return callback_kwargs


def generate_set(pipe, jobs: list[dict], latents: torch.Tensor, *, steps: int, guidance_scale: float,
                 batch_size: int, height: int, width: int, desc: str = "generate", progress: bool = True):  # fmt: skip
    """Images (PIL) and final latents (N, C, h, w) of `jobs`; a static OpenVINO batch is padded and cut."""
    from tqdm.auto import tqdm

    from .quality import _static_batch

    static = _static_batch(pipe) if type(pipe).__module__.startswith("optimum.intel") else None
    if static is not None:
        batch_size = static
    images, finals = [], []
    for start in tqdm(range(0, len(jobs), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
        chunk = jobs[start : start + batch_size]
        lat = latents[start : start + batch_size]
        pad = batch_size - len(chunk) if static is not None else 0
        if pad:
            chunk = chunk + [chunk[-1]] * pad
            lat = torch.cat([lat, lat[-1:].expand(pad, *lat.shape[1:])])
        grab = _FinalLatents()
        out = pipe(
            [j["prompt"] for j in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            latents=lat.clone(),
            callback_on_step_end=grab,
        )
        n = len(chunk) - pad
        images.extend(out.images[:n])
        finals.append(grab.latents[:n])
    return images, torch.cat(finals)


def _ov_config(precision: str, threads: int | None) -> dict:
    cfg = {"PERFORMANCE_HINT": "LATENCY"}
    if precision == "f32":  # run the float parts in f32: measure quantization, not the CPU's bf16 default
        cfg["INFERENCE_PRECISION_HINT"] = "f32"
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = str(threads)
    return cfg


def load_variant(path: Path, batch_size: int, ov_config: dict, scheduler):
    """The OpenVINO pipeline, reshaped to the batch, compiled with `ov_config`, using the teacher's scheduler."""
    from .quality import load_for_quality

    pipe = load_for_quality(path, "openvino", batch_size)
    if any(pipe.ov_config.get(k) != v for k, v in ov_config.items()):
        pipe.ov_config.update(ov_config)  # the parts share this dict: recompile them with it
        pipe.clear_requests()
        pipe.compile()
    pipe.scheduler = type(scheduler).from_config(scheduler.config)
    return pipe


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------


def images_to_uint8(images) -> torch.Tensor:
    """PIL images -> uint8 tensor (N, 3, H, W)."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


def image_fidelity(reference: torch.Tensor, images: torch.Tensor) -> dict:
    """PSNR/SSIM of uint8 (N, 3, H, W) images against the reference images (torchmetrics, data range 1)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    if reference.shape != images.shape:
        raise ValueError(f"image sets differ in shape: {tuple(reference.shape)} vs {tuple(images.shape)}")
    ref, img = reference.float() / 255.0, images.float() / 255.0
    psnr, ssim = PeakSignalNoiseRatio(data_range=1.0), StructuralSimilarityIndexMeasure(data_range=1.0)
    psnr.update(img, ref)
    ssim.update(img, ref)
    per_psnr = peak_signal_noise_ratio(img, ref, data_range=1.0, reduction="none", dim=(1, 2, 3))
    per_ssim = structural_similarity_index_measure(img, ref, data_range=1.0, reduction="none")
    return dict(
        psnr=float(psnr.compute()),
        ssim=float(ssim.compute()),
        psnr_mean_per_image=float(per_psnr.mean()),
        per_image=dict(psnr=per_psnr.tolist(), ssim=per_ssim.tolist()),
    )


def unet_inputs(teacher, jobs: list[dict], final_latents: torch.Tensor, num: int) -> dict:
    """`num` fixed UNet inputs: teacher final latents of evenly spaced jobs, noised at evenly spread timesteps
    (DDPM forward process of the teacher's noise schedule), with the teacher's text embeddings of their prompts.

    Returns numpy arrays sample (num, C, h, w) f32, timestep (num,) i64, encoder_hidden_states (num, 77, D) f32."""
    from diffusers import DDPMScheduler

    num = min(num, len(jobs))
    pick = [int(i * len(jobs) / num) for i in range(num)]
    ddpm = DDPMScheduler.from_config(teacher.scheduler.config)
    n_train = ddpm.config.num_train_timesteps
    timesteps = torch.tensor([int((i + 0.5) * n_train / num) for i in range(num)], dtype=torch.long)
    noise = torch.randn(num, *final_latents.shape[1:], generator=torch.Generator().manual_seed(2024))
    sample = ddpm.add_noise(final_latents[pick], noise, timesteps)
    with torch.no_grad():
        embeds, _ = teacher.encode_prompt([jobs[i]["prompt"] for i in pick], "cpu", 1, False)
    return dict(
        sample=sample.float().numpy(),
        timestep=timesteps.numpy().astype(np.int64),
        encoder_hidden_states=embeds.float().numpy(),
        jobs=pick,
    )


@torch.no_grad()
def teacher_noise(teacher, inputs: dict, batch_size: int = 16) -> np.ndarray:
    out = []
    for s in range(0, len(inputs["sample"]), batch_size):
        sl = slice(s, s + batch_size)
        out.append(
            teacher.unet(
                torch.from_numpy(inputs["sample"][sl]),
                torch.from_numpy(inputs["timestep"][sl]),
                encoder_hidden_states=torch.from_numpy(inputs["encoder_hidden_states"][sl]),
            ).sample.numpy()
        )
    return np.concatenate(out)


def ov_unet_noise(folder: Path, inputs: dict, ov_config: dict) -> np.ndarray:
    """Run a variant's UNet IR (`unet/openvino_model.xml`) on `inputs`, one sample per request.

    The IR is reshaped to batch 1 first, so static and dynamic exports are handled alike."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(folder / "unet" / "openvino_model.xml")
    names = ("sample", "timestep", "encoder_hidden_states")
    order, shapes = [], {}
    for port in model.inputs:
        name = next((n for n in names if n in port.get_names()), None)  # a port can carry several names
        if name is None:
            raise UserError(f"{folder}: UNet input {port.get_any_name()!r} is not one of {names}; not an SD UNet")
        scalar = port.get_partial_shape().rank.get_length() == 0
        order.append((name, port.get_element_type().to_dtype(), scalar))
        shapes[port] = ov.PartialShape([] if scalar else list(inputs[name][:1].shape))
    model.reshape(shapes)
    request = core.compile_model(model, "CPU", ov_config).create_infer_request()
    out = []
    for i in range(len(inputs["sample"])):
        feed = []
        for name, dtype, scalar in order:  # by position, cast to the port's type (e.g. an f32 timestep input)
            x = inputs[name][i : i + 1].astype(dtype)
            feed.append(x.reshape(()) if scalar else x)
        request.infer(feed)
        out.append(request.get_output_tensor(0).data.copy())
    return np.concatenate(out)


def noise_fidelity(reference: np.ndarray, pred: np.ndarray) -> dict:
    diff = pred.astype(np.float64) - reference.astype(np.float64)
    per = (diff**2).reshape(len(diff), -1).mean(1)
    return dict(
        noise_pred_mse=float(per.mean()),
        noise_pred_rel_l2=float(np.linalg.norm(diff) / max(np.linalg.norm(reference), 1e-30)),
        per_sample_noise_mse=per.tolist(),
    )


class _CLIPFeatures(torch.nn.Module):
    """A `CLIPModel` whose get_image_features / get_text_features return the projected embeddings (N, D).

    transformers 5 returns a `BaseModelOutputWithPooling` (embeddings in `pooler_output`) where torchmetrics 1.9's
    CLIPScore expects the tensor itself and fails with "'BaseModelOutputWithPooling' object has no attribute 'norm'"."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config  # CLIPScore reads text_config.max_position_embeddings from it

    @staticmethod
    def _embeds(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embeds(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embeds(self.model.get_text_features(*args, **kwargs))


def clip_scorer(clip_dir: str | Path):
    """A torchmetrics `CLIPScore` on a local CLIP folder (`CLIPModel` + `CLIPProcessor` files), never a download.

    torchmetrics 1.9 accepts only its listed Hub names as a path (others raise ValueError), so the model and
    processor are loaded here, offline, and handed over through its callable form."""
    from torchmetrics.multimodal import CLIPScore

    clip_dir = Path(clip_dir).expanduser()
    if not (clip_dir / "config.json").is_file():
        raise UserError(f"--clip-model {str(clip_dir)!r} is not a local CLIP model folder (no config.json)")

    def load():
        from transformers import CLIPModel, CLIPProcessor

        try:
            return (
                _CLIPFeatures(CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()),
                CLIPProcessor.from_pretrained(clip_dir, local_files_only=True),
            )
        except Exception as exc:  # a half-saved folder, a non-CLIP model, a processor missing
            raise UserError(
                f"--clip-model {str(clip_dir)!r} cannot be loaded as CLIPModel + CLIPProcessor "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None

    return CLIPScore(model_name_or_path=load)


@torch.no_grad()
def clip_score(scorer, images: torch.Tensor, prompts: list[str], batch_size: int = 64) -> float:
    scorer.reset()
    for s in range(0, len(prompts), batch_size):
        scorer.update(list(images[s : s + batch_size]), prompts[s : s + batch_size])
    return float(scorer.compute())


def judge_accuracy(judge, images, jobs: list[dict]) -> dict:
    """The judge's accuracy on `images` (as `quality.prompt_accuracy` scores it) and per-image correctness."""
    from .judge import ATTRIBUTES, score
    from .quality import _by_value

    preds = judge.predict(images)
    expected = [{a: j[a] for a in ATTRIBUTES} for j in jobs]
    acc = score(preds, expected)
    correct = {a: [int(p[a] == e[a]) for p, e in zip(preds, expected)] for a in ATTRIBUTES}
    correct["all"] = [int(all(p[a] == e[a] for a in ATTRIBUTES)) for p, e in zip(preds, expected)]
    return dict(accuracy={k: acc[k] for k in ACCURACY_KEYS}, by_value=_by_value(jobs, preds), correct=correct)


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------


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
        + [
            f"## {key}\n\n{comparison_markdown(rows, *key.split(' vs '))}\n"
            for key, rows in result.get("comparisons", {}).items()
        ]
    )


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

    def mse_from_psnr(v):
        return 10.0 ** (-np.array([_num(x) for x in v["per_image"]["psnr"]]) / 10.0)  # data range 1

    def pooled_psnr(mse):
        m = mse.mean(-1)
        return np.where(m > 0, -10.0 * np.log10(np.maximum(m, 1e-300)), np.inf)

    def mean(x):
        return x.mean(-1)

    per = {}
    for key, _, _, higher_better in FIDELITY_METRICS:
        if key == "psnr":  # recomputed as the result computes it: PSNR of the pooled per-image MSE
            xa, xb, stat = mse_from_psnr(va), mse_from_psnr(vb), pooled_psnr
        else:
            xa, xb, stat = np.array(va["per_image"][key], float), np.array(vb["per_image"][key], float), mean
        per[key] = (xa, xb, stat, 1 if higher_better else -1)
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


# --------------------------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------------------------


def evaluate_fidelity(
    reference: str | Path,
    models: list[tuple[str, str | Path]],
    *,
    steps: int = 25,
    guidance_scale: float = 7.5,
    seeds: int = 3,
    subset: int | None = None,
    batch_size: int = 16,
    unet_samples: int = 32,
    precision: str = "f32",
    threads: int | None = None,
    clip_model: str | Path | None = None,
    grid_samples: int = 8,
    judge=None,
    progress: bool = True,
) -> tuple[dict, list[list]]:
    """Run the evaluation. Returns (result dict as written to eval.json, grid rows of PIL images).

    `models`: (name, OpenVINO folder) pairs. Raises UserError for bad input before any slow work."""
    from .judge import load_judge
    from .quality import _image_size, load_for_quality, prompt_set

    if steps < 1 or seeds < 1 or batch_size < 1 or unet_samples < 1 or grid_samples < 1:
        raise UserError("--steps, --seeds, --batch-size, --unet-samples and --grid-samples must be >= 1")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    if not models:
        raise UserError("pass at least one --model (an OpenVINO pipeline folder) to compare with the reference")
    ref_path = check_reference(reference)
    checked, seen = [], {REFERENCE_NAME}
    for name, path in models:
        if name in seen:
            raise UserError(f"--model name {name!r} is used twice (or is the reference's); name them NAME=DIR")
        seen.add(name)
        checked.append((name, check_variant(name, Path(path).expanduser(), ref_path)))
    scorer = clip_scorer(clip_model) if clip_model else None
    if threads:
        torch.set_num_threads(threads)
    ov_config = _ov_config(precision, threads)
    judge = judge or load_judge()
    jobs = [dict(p, seed=s) for s in range(seeds) for p in prompt_set(subset)]
    prompts = [j["prompt"] for j in jobs]
    cols = grid_columns(len(jobs), grid_samples)
    t_start = time.perf_counter()

    teacher = load_for_quality(ref_path, "pytorch")
    height, width = _image_size(teacher)
    shape = (teacher.unet.config["in_channels"], height // teacher.vae_scale_factor, width // teacher.vae_scale_factor)
    latents = initial_latents(jobs, shape)
    gen = dict(steps=steps, guidance_scale=guidance_scale, batch_size=batch_size, height=height, width=width)
    t0 = time.perf_counter()
    ref_images, ref_final = generate_set(
        teacher, jobs, latents, desc=f"generate {REFERENCE_NAME}", progress=progress, **gen
    )
    ref_gen_s = time.perf_counter() - t0
    ref_u8 = images_to_uint8(ref_images)
    inputs = unet_inputs(teacher, jobs, ref_final, unet_samples)
    ref_noise = teacher_noise(teacher, inputs)
    scheduler = teacher.scheduler
    ref_judge = judge_accuracy(judge, ref_images, jobs)
    variants = [
        dict(
            name=REFERENCE_NAME,
            path=str(ref_path),
            description="FP32 teacher (PyTorch)",
            backend="pytorch",
            **{k: None for k, *_ in FIDELITY_METRICS},
            accuracy=ref_judge["accuracy"],
            by_value=ref_judge["by_value"],
            clip_score=clip_score(scorer, ref_u8, prompts) if scorer else None,
            generate_s=round(ref_gen_s, 1),
            per_image=dict(correct=ref_judge["correct"]),
        )
    ]
    grid_rows = [[ref_images[i] for i in cols]]
    del teacher
    gc.collect()

    for name, path in checked:
        t0 = time.perf_counter()
        pipe = load_variant(path, batch_size, ov_config, scheduler)
        images, final = generate_set(pipe, jobs, latents, desc=f"generate {name}", progress=progress, **gen)
        gen_s = time.perf_counter() - t0
        del pipe
        gc.collect()
        u8 = images_to_uint8(images)
        fid = image_fidelity(ref_u8, u8)
        lat_per = ((final.double() - ref_final.double()) ** 2).flatten(1).mean(1)
        noise = noise_fidelity(ref_noise, ov_unet_noise(path, inputs, ov_config))
        jud = judge_accuracy(judge, images, jobs)
        variants.append(
            dict(
                name=name,
                path=str(path),
                description=describe_variant(path),
                backend="openvino",
                psnr=fid["psnr"],
                ssim=fid["ssim"],
                latent_mse=float(lat_per.mean()),
                noise_pred_mse=noise["noise_pred_mse"],
                psnr_mean_per_image=fid["psnr_mean_per_image"],
                noise_pred_rel_l2=noise["noise_pred_rel_l2"],
                accuracy=jud["accuracy"],
                accuracy_delta_vs_fp32={k: jud["accuracy"][k] - ref_judge["accuracy"][k] for k in ACCURACY_KEYS},
                by_value=jud["by_value"],
                clip_score=clip_score(scorer, u8, prompts) if scorer else None,
                generate_s=round(gen_s, 1),
                per_image=dict(
                    psnr=fid["per_image"]["psnr"],
                    ssim=fid["per_image"]["ssim"],
                    latent_mse=lat_per.tolist(),
                    correct=jud["correct"],
                    noise_pred_mse=noise["per_sample_noise_mse"],
                ),
            )
        )
        grid_rows.append([images[i] for i in cols])

    import openvino as ov

    result = dict(
        reference=str(ref_path),
        settings=dict(
            steps=steps,
            guidance_scale=guidance_scale,
            seeds=seeds,
            prompts=len(jobs) // seeds,
            images=len(jobs),
            subset=subset,
            batch_size=batch_size,
            height=height,
            width=width,
            scheduler=type(scheduler).__name__,
            unet_samples=len(inputs["jobs"]),
            unet_timesteps=inputs["timestep"].tolist(),
            precision=precision,
            ov_config=ov_config,
            threads=threads,
            clip_model=str(clip_model) if clip_model else None,
            latents="torch.Generator().manual_seed(1000 * seed + prompt_index), as ov_sd_trainer.quality",
            openvino=ov.get_version(),
            torch=torch.__version__,
        ),
        variants=variants,
        grid=dict(
            file=GRID_FILE,
            rows=[v["name"] for v in variants],
            columns=[dict(prompt=jobs[i]["prompt"], seed=jobs[i]["seed"]) for i in cols],
            cell=[width, height],
        ),
        jobs=[dict(prompt=j["prompt"], seed=j["seed"], index=j["index"]) for j in jobs],
        time_s=round(time.perf_counter() - t_start, 1),
    )
    return result, grid_rows


def write_outputs(output: str | Path, result: dict, grid_rows: list[list], grid_scale: int, overwrite: bool = False,
                  extra_files: dict[str, str] | None = None) -> Path:  # fmt: skip
    """eval.json, eval.md, grid.png, evaluate.save(...) and `extra_files` (name -> text) into `output`, atomically."""
    import evaluate

    from .outputs import atomic_output_dir

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
    from .hub import update_model_card

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


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `ov-sd eval`'s options to `parser` (a subparser) and make it run the evaluation."""
    parser.description = parser.description or __doc__.split("\n")[0]
    parser.add_argument("--reference", required=True, help="the FP32 diffusers pipeline folder (the teacher)")
    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR",
                        help="an OpenVINO pipeline folder to evaluate (repeatable); NAME labels its row")  # fmt: skip
    parser.add_argument("--output", required=True, help="output folder (eval.json, eval.md, grid.png, evaluate/)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per prompt")
    parser.add_argument("--subset", type=int, default=None, help="N evenly spaced prompts of the 132 (default all)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per pipeline call")
    parser.add_argument("--unet-samples", type=int, default=32, help="fixed inputs for the UNet noise-prediction MSE")
    parser.add_argument("--precision", choices=PRECISIONS, default="f32",
                        help="OpenVINO inference precision of the float ops: f32, or the CPU's default (bf16 on "
                        "CPUs with bf16 support)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch and OpenVINO threads (default: theirs)")
    parser.add_argument("--clip-model", default=None, help="local CLIP model folder for the CLIP score (optional)")
    parser.add_argument("--grid-samples", type=int, default=8, help="columns of grid.png")
    parser.add_argument(
        "--grid-scale", type=int, default=None, help="upscale factor of grid cells (default: to ~128 px)"
    )
    parser.add_argument("--judge", default=None, help="judge folder (default: the committed one)")
    parser.add_argument("--update-card", action="append", default=[], metavar="DIR",
                        help="write the results into this evaluated --model folder's README.md (repeatable)")  # fmt: skip
    parser.add_argument("--compare", action="append", default=[], metavar="A,B",
                        help="paired bootstrap comparison of variant A against variant B (repeatable)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run_from_args)
    return parser


def run_from_args(args: argparse.Namespace) -> dict:
    from .judge import load_judge
    from .outputs import check_output_dir

    check_output_dir(args.output, args.overwrite)  # fail before the slow work
    models = [parse_model_spec(m) for m in args.model]
    resolved = {p.expanduser().resolve() for _, p in models}
    for card in args.update_card:
        folder = Path(card).expanduser().resolve()
        if folder not in resolved:
            raise UserError(f"--update-card {card!r} is not one of the evaluated --model folders")
        if not (folder / "README.md").is_file():
            raise UserError(f"--update-card {card!r} has no model card (README.md) to update")
    names = [n for n, _ in models]
    pairs = []
    for spec in args.compare:
        pair = tuple(x.strip() for x in spec.split(","))
        if len(pair) != 2 or not all(x in names for x in pair):
            raise UserError(f"--compare {spec!r}: give two --model names as A,B (names: {', '.join(names)})")
        pairs.append(pair)
    result, grid_rows = evaluate_fidelity(
        args.reference,
        models,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        seeds=args.seeds,
        subset=args.subset,
        batch_size=args.batch_size,
        unet_samples=args.unet_samples,
        precision=args.precision,
        threads=args.threads,
        clip_model=args.clip_model,
        grid_samples=args.grid_samples,
        judge=load_judge(args.judge) if args.judge else None,
        progress=not args.no_progress,
    )
    if pairs:
        result["comparisons"] = {f"{a} vs {b}": paired_comparison(result, a, b) for a, b in pairs}
    side = max(result["settings"]["height"], result["settings"]["width"])
    scale = args.grid_scale or max(1, 128 // side)
    write_outputs(args.output, result, grid_rows, scale, overwrite=args.overwrite)
    print(markdown_table(table_rows(result)))
    print(f"written to {args.output} ({result['time_s']} s)")
    for folder in update_cards(result, args.update_card):
        print(f"model card updated: {folder / 'README.md'}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="ov-sd eval", allow_abbrev=False))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"ov-sd: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
