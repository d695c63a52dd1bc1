"""What a few-step (LCM) student is: the teacher's UNet plus LCM's guidance embedding, its sampler, the teacher's ODE
solver, and the record of what it was trained for.

One owner for what training (`train.consistency`), export (`export.openvino`), evaluation and the bench share, so
that none of them imports another stage for it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import families
from .errors import UserError

TIME_COND_PROJ_DIM = 256  # width of the student's guidance embedding (LCM-Dreamshaper's, the diffusers script's)
NUM_DDIM_TIMESTEPS = 50  # solver steps over the teacher's 1000 (skipping step k = 20); LCMScheduler's original steps
# Boundary-condition scalings: LCMScheduler's `timestep_scaling` default, so the student samples with the scalings it
# was trained with.
TIMESTEP_SCALING = 10.0


def make_student_unet(teacher, time_cond_proj_dim: int = TIME_COND_PROJ_DIM):
    """A `UNet2DConditionModel` with the teacher's config plus `time_cond_proj_dim` (LCM's guidance embedding), the
    teacher's weights, and the new `time_embedding.cond_proj` [D_time, time_cond_proj_dim] zero-initialised: the
    untrained student's prediction equals the teacher's at any w. On the teacher's device and dtype."""
    from diffusers import UNet2DConditionModel

    config = teacher.config
    families.check_unet_config(config)
    if families.extra_input_names(config):
        raise UserError(
            "consistency distillation needs an SD 1.x / 2.x teacher UNet (no time_cond_proj_dim, not SDXL); "
            f"this one takes {', '.join(families.extra_input_names(config))}"
        )
    # diffusers' from_config resets the keys listed in `_use_default_values` (time_cond_proj_dim among them for a
    # UNet built without it) to the class defaults, so that list is dropped
    config = {k: v for k, v in config.items() if k != "_use_default_values"}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": time_cond_proj_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(f"student/teacher weights differ beyond cond_proj: missing {missing}, extra {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    student.to(teacher.device)
    # (a float32 teacher, the usual case, skips the dtype cast, over which diffusers warns)
    return student if teacher.dtype == student.dtype else student.to(teacher.dtype)


def lcm_scheduler(scheduler_config, num_ddim_timesteps: int = NUM_DDIM_TIMESTEPS):
    """The student's sampler: diffusers' `LCMScheduler` on the teacher's noise schedule, with the training's
    solver schedule (`original_inference_steps`) and scalings, never clipping."""
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(scheduler_config, original_inference_steps=num_ddim_timesteps,
                                    timestep_scaling=TIMESTEP_SCALING, clip_sample=False, thresholding=False)  # fmt: skip


def ode_scheduler(scheduler_config):
    """The teacher's ODE solver: deterministic DDIM without clipping (`DDIMScheduler.from_config` of a PNDM config
    inherits DDIM's `clip_sample=True` default, which clips the predicted latents to [-1, 1] and ruins them)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config, clip_sample=False, thresholding=False)


def lcm_base_folder(base_model: str, dest: Path, time_cond_proj_dim: int = TIME_COND_PROJ_DIM,
                    num_ddim_timesteps: int = NUM_DDIM_TIMESTEPS) -> Path:  # fmt: skip
    """A diffusers `LatentConsistencyModelPipeline` folder at `dest` from the SD `base_model`: its text encoder,
    tokenizer and VAE, a float UNet of the student's architecture (the teacher plus the zero-initialised guidance
    embedding: optimum exports the folder's UNet, which the trained student then replaces) and diffusers'
    `LCMScheduler` from the base scheduler's config with the training's solver steps, never clipping."""
    from diffusers import LatentConsistencyModelPipeline

    from .pipeline_folder import load_pipeline

    base = load_pipeline(base_model)
    lcm = LatentConsistencyModelPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        unet=make_student_unet(base.unet, time_cond_proj_dim),
        scheduler=lcm_scheduler(base.scheduler.config, num_ddim_timesteps), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    lcm.save_pretrained(dest)
    return dest


def few_step_record(cfg) -> dict | None:
    """What a consistency student was trained for, written into the export (results.json `few_step`, the card)
    and read by `ov-sd generate` / `ov-sd demo` as their defaults; None for plain distillation. `cfg`: the run's
    config, or a checkpoint's saved config.json as a dict (`ov-sd export`)."""
    get = cfg.get if isinstance(cfg, dict) else lambda key: getattr(cfg, key)
    if get("objective") != "consistency":
        return None
    return {
        "steps": get("few_step_steps"),
        "guidance_scale": get("few_step_guidance_scale"),
        "scheduler": "LCMScheduler",
        "num_ddim_timesteps": get("num_ddim_timesteps"),
        "w_range": [get("w_min"), get("w_max")],
        "time_cond_proj_dim": get("time_cond_proj_dim"),
        "quantization_scheme": get("quantization_scheme"),
        "init_student": get("init_student"),
        "float_steps": get("float_steps"),
        "qat_teacher": get("qat_teacher"),
    }
