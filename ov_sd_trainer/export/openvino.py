"""Export a trained student to an OpenVINO pipeline folder that optimum-intel loads unchanged.

Text encoder, VAE, tokenizer and scheduler go through optimum-intel's own exporter (so the
folder is exactly what `OVStableDiffusionPipeline.from_pretrained` expects, or the optimum-intel class of the base
model's family: `OVLatentConsistencyModelPipeline` for an LCM, `families.PIPELINE_CLASSES`); the UNet is the
trained NNCF student converted with `openvino.convert_model`, keeping its FakeQuantize ops, so
`openvino.save_model` stores its weights as int8. The folder is made ready for OpenVINO GenAI's
`Text2ImagePipeline` too (`pipeline_folder.write_genai_files`: the tokenizer as OpenVINO IRs, the scheduler's betas
written out). The folder is written to a temporary sibling and renamed on success: a failed export leaves any
previous one untouched.

A consistency student (`objective: consistency`, `few_step`) is exported as an LCM folder from its SD base
(`lcm.lcm_base_folder`: model_index `LatentConsistencyModelPipeline`, an `LCMScheduler`, the UNet config with
`time_cond_proj_dim`), which `OVLatentConsistencyModelPipeline` loads and GenAI runs with its LCM scheduler;
results.json `few_step` records the steps and guidance it was trained for.

`ov-sd prepare-genai --model DIR` does the same to an OpenVINO folder written before (or by optimum-intel).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..compress import quantize
from ..compress.convert import convert_unet_to_openvino, count_fake_quantize, int8_constant_stats
from ..compress.tome import apply_tome_config, tome_config
from ..compress.tome_config import TomeConfig
from ..errors import UserError
from ..lcm import few_step_record, lcm_base_folder
from ..outputs import atomic_output_dir, check_output_dir
from ..pipeline_folder import (
    RECIPE_FILE,
    RESULTS_FILE,
    UNET_XML,
    check_openvino_folder,
    has_openvino_tokenizer,
    load_ov_pipeline,
    native_size,
    pin_scheduler_betas,
    pipeline_class_name,
    write_genai_files,
    write_openvino_tokenizer,
)

logger = logging.getLogger(__name__)
DEFAULT_SAMPLE_STEPS = 20


def _bin_size(xml: Path) -> int:
    return xml.with_suffix(".bin").stat().st_size


def export_openvino_pipeline(
    base_model: str,
    student,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    recipe: dict | None = None,
    training_info: dict | None = None,
    sample_prompts: list[str] | None = None,
    sample_steps: int = DEFAULT_SAMPLE_STEPS,
    resolution: int | None = None,
    few_step: dict | None = None,
) -> Path:
    """Write the OpenVINO pipeline folder. `student` is the quantized UNet (EMA already applied), or with `few_step`
    (a consistency student: `lcm.few_step_record`) the quantized or float LCM student of the SD `base_model`.

    Returns the folder. Results (sizes, FakeQuantize count, timings) go to results.json."""
    import tempfile

    import openvino as ov
    from optimum.intel import OVDiffusionPipeline

    from .card import write_model_card

    if few_step is None and not quantize.is_quantized(student):
        raise UserError("the student UNet is not quantized; export needs a checkpoint written by QAT training")
    if Path(base_model).is_dir():
        pipeline_class_name(base_model)  # a supported family, before the slow export
    t0 = time.perf_counter()
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp, tempfile.TemporaryDirectory() as lcm_tmp:
        source = base_model
        if few_step is not None:
            source = lcm_base_folder(
                base_model, Path(lcm_tmp) / "lcm", few_step["time_cond_proj_dim"], few_step["num_ddim_timesteps"]
            )
        logger.info("exporting text encoder, VAE, tokenizer and scheduler with optimum-intel")
        # optimum-intel's pipeline class of the base model's family (model_index.json `_class_name`)
        pipe = OVDiffusionPipeline.from_pretrained(source, export=True, compile=False)
        pipe.save_pretrained(tmp)
        del pipe
        if few_step is not None:  # name the SD base, not the temporary LCM folder it was exported from
            index = json.loads((tmp / "model_index.json").read_text())
            (tmp / "model_index.json").write_text(json.dumps({**index, "_name_or_path": str(base_model)}, indent=2))
        write_genai_files(tmp)  # OpenVINO GenAI: the tokenizer as IRs, diffusers' betas in the scheduler config
        fp32_bytes = _bin_size(tmp / UNET_XML)
        logger.info("converting the quantized student UNet")
        ov_unet = convert_unet_to_openvino(student)
        ov.save_model(ov_unet, tmp / UNET_XML, compress_to_fp16=False)
        int8_bytes = _bin_size(tmp / UNET_XML)
        saved = ov.Core().read_model(tmp / UNET_XML)
        n_int8, int8_const_bytes = int8_constant_stats(saved)
        results = {
            "unet_fp32_bytes": fp32_bytes,
            "unet_int8_bytes": int8_bytes,
            "unet_size_ratio": round(int8_bytes / fp32_bytes, 4),
            "fake_quantize_ops": count_fake_quantize(saved),
            "token_merging": tome.to_dict() if (tome := tome_config(student)) is not None else None,
            "int8_constants": n_int8,
            "int8_constant_bytes": int8_const_bytes,
            "total_bytes": sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()),
            "export_s": None,
        }
        if few_step is not None:
            results["few_step"] = few_step
        if training_info:
            results["training"] = {k: v for k, v in training_info.items() if k != "log_history"}
        samples = []
        if sample_prompts:
            steps, guidance = (few_step["steps"], few_step["guidance_scale"]) if few_step else (sample_steps, None)
            samples = _render_samples(tmp, sample_prompts, steps, resolution, guidance)
        results["export_s"] = round(time.perf_counter() - t0, 1)
        (tmp / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=str))
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe or {}, indent=2, default=str))
        write_model_card(tmp, base_model=base_model, recipe=recipe or {}, results=results, samples=samples)
    logger.info("OpenVINO pipeline written to %s (UNet %.3fx of FP32)", output_dir, results["unet_size_ratio"])
    return Path(output_dir)


def _render_samples(folder: Path, prompts: list[str], steps: int, resolution: int | None,
                    guidance_scale: float | None = None) -> list[dict]:  # fmt: skip
    """Generate sample images with the exported folder itself: proves it loads and runs."""
    import numpy as np

    h, w = (resolution, resolution) if resolution else native_size(folder)
    pipe = load_ov_pipeline(folder, h, w, guidance_scale=guidance_scale)
    (folder / "samples").mkdir(exist_ok=True)
    out = []
    kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    for i, prompt in enumerate(prompts):
        image = pipe(prompt, num_inference_steps=steps, generator=np.random.RandomState(i), **kwargs).images[0]
        name = f"samples/sample_{i}.png"
        image.save(folder / name)
        out.append({"prompt": prompt, "file": name, "seed": i, "steps": steps})
    return out


def load_student_from_checkpoint(checkpoint: str | Path, use_ema: bool = True):
    """(student, config dict, base model path, recipe) from a training checkpoint or final folder."""
    from ..assets import resolve_model_path
    from ..pipeline_folder import load_pipeline
    from ..run_folder import CONFIG_FILE, STUDENT_DIR, is_checkpoint, load_ema, load_student

    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise UserError(f"checkpoint {str(ckpt)!r} does not exist; pass output_dir/final or output_dir/checkpoint-N")
    if not is_checkpoint(ckpt):
        raise UserError(
            f"{str(ckpt)!r} is not a training checkpoint (no {CONFIG_FILE}); pass one written by `ov-sd train`"
        )
    cfg = json.loads((ckpt / CONFIG_FILE).read_text())
    base = resolve_model_path(cfg["pretrained_model_name_or_path"])
    pipe = load_pipeline(base, revision=cfg.get("revision"))
    fp32 = pipe.unet
    if cfg.get("objective") == "consistency":  # the teacher plus the guidance embedding
        from ..lcm import make_student_unet

        fp32 = make_student_unet(fp32, cfg["time_cond_proj_dim"])
    tome = TomeConfig.from_training_config(cfg)  # absent keys (older checkpoints): no token merging
    if tome.active:  # NNCF names the quantized ops by the patched graph: merge first, then load
        apply_tome_config(fp32, tome)
    student = load_student(fp32, ckpt / STUDENT_DIR, inplace=True)  # NNCF int8, or a float consistency student
    ema = load_ema(ckpt) if use_ema else None  # checkpoint-N folders hold the EMA apart; final/ has it applied
    if ema is not None:
        import torch

        params = dict(student.named_parameters())  # the export's student is whole (never sharded): plain copies
        with torch.no_grad():
            for name, tensor in ema.items():
                params[name].copy_(tensor)
    recipe_file = ckpt.parent / RECIPE_FILE  # written by the training run next to the checkpoints
    recipe = json.loads(recipe_file.read_text()) if recipe_file.is_file() else cfg
    return student, cfg, base, recipe


# --------------------------------------------------------------------------------------------------------------------
# `ov-sd export`
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="output_dir/final or output_dir/checkpoint-N")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-ema", action="store_true", help="export the raw student, not its EMA (checkpoint-N only)")
    p.add_argument("--sample-prompt", action="append", default=None, help="render a sample image (repeatable)")
    p.add_argument("--sample-steps", type=int, default=DEFAULT_SAMPLE_STEPS)


def main(args) -> int:
    check_output_dir(args.output, args.overwrite)  # fail before the slow load
    student, cfg, base, recipe = load_student_from_checkpoint(args.checkpoint, use_ema=not args.no_ema)
    export_openvino_pipeline(
        base,
        student,
        args.output,
        overwrite=args.overwrite,
        recipe=recipe,
        sample_prompts=args.sample_prompt,
        sample_steps=args.sample_steps,
        resolution=cfg.get("resolution"),
        few_step=few_step_record(cfg),
    )
    print(f"OpenVINO pipeline written to {args.output}")
    return 0


# --------------------------------------------------------------------------------------------------------------------
# `ov-sd prepare-genai`
# --------------------------------------------------------------------------------------------------------------------


def add_prepare_genai_arguments(p) -> None:
    p.add_argument("--model", required=True, help="an OpenVINO pipeline folder (an export, a PTQ peer, optimum's)")


def prepare_genai_main(args) -> int:
    """Add tokenizer/openvino_tokenizer.xml and openvino_detokenizer.xml to an existing OpenVINO folder and list its
    scheduler's betas (`pipeline_folder.write_genai_files`), in place."""
    folder = check_openvino_folder(args.model, "--model")
    had = has_openvino_tokenizer(folder)
    tokenizer_xml, detokenizer_xml = write_openvino_tokenizer(folder)
    if (folder / "tokenizer_2").is_dir():  # SDXL's second tokenizer
        write_openvino_tokenizer(folder, "tokenizer_2")
    pinned = pin_scheduler_betas(folder)
    done = [f"{'replaced' if had else 'added'} {tokenizer_xml.relative_to(folder)} and {detokenizer_xml.name}"]
    if pinned:
        done.append("listed the scheduler's betas (trained_betas)")
    print(f"{'; '.join(done)}: OpenVINO GenAI's Text2ImagePipeline loads {folder}")
    return 0
