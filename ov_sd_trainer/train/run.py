"""`ov-sd train`: setup (pipeline, data, calibration, student/teacher) -> train -> save -> export.

    ov-sd train --recipe reference-int8 --output_dir outputs/reference-int8
    accelerate launch -m ov_sd_trainer.train --recipe sd15-pokemon-int8 --output_dir outputs/pokemon
    accelerate launch --config_file ov_sd_trainer/recipes/accelerate/fsdp-full-shard.yaml -m ov_sd_trainer.train ...

`run(config)` is the whole job: `build_trainer` (everything up to training: checks, model, data, calibration
(`train.calibration`), held-out set, sharding, EMA, the Trainer), `trainer.train()`, then `finish` (save, report
(`train.report`), export, push). Tests build their Trainer with `build_trainer` too, so they run the wiring
`ov-sd train` runs. What the output folder holds is `run_folder`'s contract.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import families, lcm
from ..assets import resolve_model_path
from ..compress import quantize
from ..compress.kernels import select_quantize_kernels
from ..compress.tome import apply_tome_config
from ..compress.tome_config import TomeConfig
from ..errors import UserError
from ..export.openvino import export_openvino_pipeline
from ..pipeline_folder import load_pipeline
from ..run_folder import (
    CONFIG_FILE,
    FINAL_DIR,
    FLOAT_PHASE_DIR,
    LOSS_PLOT,
    OPENVINO_DIR,
    RECIPE_FILE,
    STUDENT_DIR,
    TRAINING_INFO_FILE,
    find_resumable_checkpoint,
    float_student_dir,
    is_complete,
    load_student,
    save_student,
)
from . import consistency as lcd
from . import fsdp
from .calibration import calibrate_once, calibration_calls
from .config import NO_QUANTIZATION, QATConfig, parse_config
from .data import (
    INDEX_COLUMN,
    Augmentation,
    check_captions,
    collate,
    drop_unreadable_images,
    load_captioned_dataset,
    make_train_transform,
)
from .ema import EMACallback
from .losses import QATModel
from .report import plot_losses, quantizer_digest, training_info
from .teacher_gap import build_teacher_gap_set
from .trainer import QATTrainer

logger = logging.getLogger(__name__)


def prepare_dataset(cfg: QATConfig, tokenizer, tokenizer_2=None):
    ds = load_captioned_dataset(
        cfg.dataset_name,
        image_column=cfg.image_column,
        caption_column=cfg.caption_column,
        max_samples=cfg.max_train_samples,
        synthetic_size=cfg.synthetic_size,
        synthetic_resolution=cfg.resolution,
        seed=cfg.seed,
        config_name=cfg.dataset_config_name,
    )
    check_captions(ds, cfg.caption_column)
    ds, skipped = drop_unreadable_images(ds, cfg.image_column)
    if skipped:
        print(f"warning: skipped {skipped} unreadable image(s); training on the other {len(ds)}")
    if cfg.num_calibration_samples > len(ds):
        raise UserError(
            f"num_calibration_samples={cfg.num_calibration_samples} exceeds the dataset's {len(ds)} rows; "
            f"lower it or use more data"
        )
    augmentation = Augmentation(cfg.seed)
    transform = make_train_transform(
        tokenizer,
        cfg.resolution,
        cfg.center_crop,
        cfg.random_flip,
        cfg.image_column,
        cfg.caption_column,
        augmentation,
        tokenizer_2,
    )
    ds = ds.add_column(INDEX_COLUMN, list(range(len(ds))))
    return ds.with_transform(transform), augmentation


def build_model(cfg: QATConfig):
    """The pipeline and a `QATModel` whose student is still the FP32 teacher. Returns (model, pipe)."""
    path = resolve_model_path(cfg.pretrained_model_name_or_path)
    pipe = load_pipeline(path, revision=cfg.revision)
    factor = pipe.vae_scale_factor
    if cfg.resolution % factor:
        raise UserError(f"resolution={cfg.resolution} is not divisible by the VAE factor {factor} of {path}")
    device = cfg.device
    teacher = pipe.unet.to(device).eval().requires_grad_(False)
    model = QATModel(
        student=teacher,  # replaced by its quantized copy in `build`
        teacher=teacher,
        vae=pipe.vae.to(device),
        text_encoder=pipe.text_encoder.to(device),
        noise_scheduler=_noise_scheduler(path, cfg.revision),
        distillation_weight=cfg.distillation_weight,
        task_weight=cfg.task_weight,
        prediction_type=cfg.prediction_type,
        snr_gamma=cfg.snr_gamma,
        noise_offset=cfg.noise_offset,
        text_encoder_2=pipe.text_encoder_2.to(device) if getattr(pipe, "text_encoder_2", None) else None,
    )
    model.tokenizer = pipe.tokenizer  # for the teacher-gap set's captions (not a module: the Trainer ignores it)
    model.pipeline = pipe  # for trajectory inputs (idem)
    families.configure_model(model, pipe)
    return model, pipe


def build(cfg: QATConfig):
    """Load everything and quantize the student. Returns (model, train_dataset, augmentation)."""
    model, pipe = build_model(cfg)
    extra_inputs = families.extra_input_names(model.teacher.config)
    if cfg.calibration_draws > 1 and extra_inputs:
        raise UserError(
            f"calibration_draws={cfg.calibration_draws} scores each draw on rollouts, which {type(pipe).__name__} "
            f"cannot sample (its UNet needs {', '.join(extra_inputs)}); set calibration_draws 1"
        )
    tome = TomeConfig.from_training_config(cfg)
    train_ds, augmentation = prepare_dataset(cfg, pipe.tokenizer, getattr(pipe, "tokenizer_2", None))
    device = cfg.device
    if cfg.objective == "consistency":
        return build_consistency(cfg, model, pipe, train_ds, device, tome), train_ds, augmentation
    calls = calibration_calls(cfg, pipe, train_ds)
    teacher = model.teacher
    # Token merging goes on a copy of the FP32 UNet before NNCF traces it, so that the quantizers sit on the merged
    # attention; the teacher stays exact. (quantize_unet / load_quantized copy it again: this copy is freed below.)
    fp32_student = apply_tome_config(copy.deepcopy(teacher), tome) if tome.active else teacher
    select_quantize_kernels(cfg.quantize_kernels, device)  # before NNCF's first quantized forward (calibration)
    student = calibrate_once(cfg, model, fp32_student, train_ds, device, calls)
    del fp32_student
    student.train()
    for p in student.parameters():  # NNCF also keeps integer buffers-as-parameters (e.g. bit widths)
        p.requires_grad_(p.is_floating_point())
    if cfg.tune_quantizers_only:
        for _, p in quantize.weight_parameters(student):
            p.requires_grad_(False)
    model.student = student
    model.sample_prompt = train_ds.with_format(None)[0][cfg.caption_column]  # the export's sample image (idem)
    return model, train_ds, augmentation


# NNCF node names of the guidance embedding's projection, kept out of quantization: `make_student_unet`
# zero-initialises its weight, so NNCF would calibrate its weight quantizer on all-zero weights (the minimal range)
# and QAT could then never grow it. It is one [time_embed_dim x time_cond_proj_dim] matmul on a [B, 256] vector per
# step: int8 there would save nothing measurable, so it stays float (also in the hybrid scheme's weight compression).
COND_PROJ_SCOPE = r".*cond_proj.*"


def consistency_calibration_calls(cfg: QATConfig, pipe, float_student, train_ds) -> list[dict]:
    """The float consistency student's own UNet calls sampling the training captions with diffusers'
    `LatentConsistencyModelPipeline` (`LCMScheduler`, `few_step_steps` steps, `few_step_guidance_scale` embedded as
    timestep_cond), as optimum-intel and GenAI will run it: what its quantizer ranges must fit."""
    from diffusers import LatentConsistencyModelPipeline

    from .unet_inputs import collect_trajectory_inputs

    sampler = LatentConsistencyModelPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=float_student,
        scheduler=lcm.lcm_scheduler(pipe.scheduler.config, cfg.num_ddim_timesteps), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    captions = list(train_ds.with_format(None)[cfg.caption_column])
    return collect_trajectory_inputs(
        sampler, captions, cfg.num_calibration_samples, cfg.resolution, cfg.seed, steps=cfg.few_step_steps,
        guidance_scale=cfg.few_step_guidance_scale, desc="student few-step trajectories",
    )  # fmt: skip


def build_consistency(cfg: QATConfig, model: QATModel, pipe, train_ds, device, tome: TomeConfig) -> QATModel:
    """`objective: consistency`: the student is the teacher plus the guidance embedding (`make_student_unet`), token
    merging applied if `tome` is active (before NNCF traces it, as in distillation runs; the teacher stays exact),
    calibrated on its own few-step sampling and quantized (or left float with `quantization_scheme none`); the loss
    is `ConsistencyObjective`. The target network (`ConsistencyTarget`) is made in `build_trainer`, after the
    student is final and before it is sharded."""
    float_student = lcm.make_student_unet(model.teacher, cfg.time_cond_proj_dim)
    if tome.active:  # (patching adds no module: a float phase's student loads onto it unchanged)
        apply_tome_config(float_student, tome)
    model.time_cond_proj_dim = cfg.time_cond_proj_dim
    init_teacher = None
    if cfg.init_student is not None:  # a float consistency run's student (the float-then-QAT orders)
        try:
            float_student = load_student(float_student, float_student_dir(cfg.init_student), inplace=True)
        except RuntimeError as e:  # safetensors' load_model: a student of another architecture
            raise UserError(f"init_student {cfg.init_student!r} does not fit this model's student: "
                            f"{str(e).splitlines()[0]}") from None  # fmt: skip
        if cfg.qat_teacher == "init_student":
            init_teacher = copy.deepcopy(float_student).eval().requires_grad_(False)
    if cfg.quantized:
        select_quantize_kernels(cfg.quantize_kernels, device)
        calls = consistency_calibration_calls(cfg, pipe, float_student, train_ds)
        scoped = copy.copy(cfg)  # the cond_proj exclusion joins the user's ignored_scope for this calibration only
        scoped.ignored_scope = [*(cfg.ignored_scope or []), COND_PROJ_SCOPE]
        student = calibrate_once(scoped, model, float_student, train_ds, device, calls)
        del float_student
    else:
        student = float_student
    student.train()
    for p in student.parameters():
        p.requires_grad_(p.is_floating_point())
    if cfg.tune_quantizers_only:
        for _, p in quantize.weight_parameters(student):
            p.requires_grad_(False)
    model.student = student
    model.consistency = lcd.ConsistencyObjective(
        model.noise_scheduler, cfg.num_ddim_timesteps, cfg.w_min, cfg.w_max, cfg.consistency_loss_type, cfg.huber_c
    )
    model.consistency.init_teacher = init_teacher
    model.uncond_states = lcd.empty_prompt_states(pipe.tokenizer, pipe.text_encoder)
    model.few_step = (cfg.few_step_steps, cfg.num_ddim_timesteps)
    model.sample_prompt = train_ds.with_format(None)[0][cfg.caption_column]
    return model


def _noise_scheduler(path: str, revision: str | None):
    """The training scheduler: DDPM with the pipeline's noise schedule and prediction type."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)


def check_output_dir(cfg: QATConfig) -> None:
    """A run writes into a new or empty folder, or resumes from a complete checkpoint in it (`latest` resolved)."""
    out = Path(cfg.output_dir)
    if cfg.resume_from_checkpoint is None and out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(
            f"output_dir {str(out)!r} exists and is not empty; pass --overwrite true to reuse it "
            f"or --resume_from_checkpoint latest to continue"
        )
    if cfg.resume_from_checkpoint == "latest":
        last = find_resumable_checkpoint(out) if out.is_dir() else None
        if last is None:
            raise UserError(f"--resume_from_checkpoint latest: no complete checkpoint-N folder in {str(out)!r}")
        cfg.resume_from_checkpoint = str(last)
    elif cfg.resume_from_checkpoint is not None:
        ckpt = Path(cfg.resume_from_checkpoint)
        if not is_complete(ckpt):
            what = "does not exist" if not ckpt.exists() else "is incomplete or not a training checkpoint"
            raise UserError(f"resume_from_checkpoint {str(ckpt)!r} {what}; pass a checkpoint-N folder or latest")


@dataclass
class Training:
    """What `build_trainer` sets up: the Trainer and what `run` (and tests) need around it."""

    trainer: QATTrainer
    model: QATModel
    ema: EMACallback | None
    sharded: fsdp.ShardedStudent | None  # the student's FSDP shards under an FSDP launch, else None
    sharding: dict | None  # the per-rank sharding record for training_info
    eval_dataset: object | None  # the held-out teacher-gap set, when the run evaluates
    start_digests: list[str]  # every rank's quantizer digest after calibration
    started: float  # time.perf_counter() at the start of the build


def build_trainer(cfg: QATConfig, recipe: dict | None = None) -> Training:
    """Everything `ov-sd train` does before `trainer.train()`: check the output folder and resume point, load and
    calibrate the model, build the training and held-out sets, cast the teacher, shard the student (FSDP), set up the
    EMA and the Trainer, and write the recipe into the output folder."""
    check_output_dir(cfg)
    cfg.remove_unused_columns = False  # the transform needs the raw image and caption columns
    if cfg.push_openvino and not cfg.export:
        raise UserError("push_to_hub needs export=true: the OpenVINO folder is what gets uploaded")
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    model, train_ds, augmentation = build(cfg)
    eval_ds = None
    model.gap_set = None
    evaluates = cfg.eval_strategy != "no" or cfg.eval_on_start  # eval_on_start alone: the calibrated student's gap
    if evaluates and cfg.objective == "consistency":
        from .teacher_gap import heldout_rows

        rows = heldout_rows(cfg.teacher_gap_samples, cfg.seed, cfg.resolution, cfg.dataset_name, cfg.caption_column,
                            cfg.image_column)  # fmt: skip
        model.gap_set = eval_ds = lcd.build_gap_set(
            model.pipeline,
            list(rows[cfg.caption_column]),
            cfg.seed,
            cfg.few_step_guidance_scale,
            resolution=cfg.resolution,
        )  # fmt: skip (the Trainer only checks it is set: `QATTrainer.evaluate` reads model.gap_set)
    elif evaluates:
        eval_ds = build_teacher_gap_set(
            model, model.tokenizer, cfg.teacher_gap_samples, cfg.seed, cfg.resolution, cfg.dataset_name,
            cfg.caption_column, cfg.image_column,
        )  # fmt: skip
    if cfg.teacher_dtype != "auto":
        model.cast_teacher(getattr(torch, cfg.teacher_dtype))
    from accelerate.utils import gather_object

    start_digests = gather_object([quantizer_digest(model.student)])
    if model.consistency is not None:  # the target network starts as the final (calibrated) student, unsharded
        model.consistency_target = lcd.ConsistencyTarget(model.student, cfg.target_decay)
    sharded, sharding = shard_student(cfg, model)
    if sharded is not None and model.consistency_target is not None:
        model.consistency_target.shard(sharded)  # unit for unit like the student: each rank averages its shards
    ema = None
    if cfg.use_ema:  # after sharding: each rank keeps the EMA of its shards
        ema = EMACallback(model.student, cfg.ema_decay, cfg.ema_device, cfg.ema_use_warmup, cfg.ema_power)
    trainer = QATTrainer(
        model=model, args=cfg, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collate, ema=ema,
        augmentation=augmentation, fsdp=sharded,
    )  # fmt: skip
    if model.consistency_target is not None:
        trainer.add_callback(model.consistency_target)
    if trainer.is_world_process_zero():
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / RECIPE_FILE).write_text(json.dumps(recipe or {}, indent=2))
    return Training(trainer, model, ema, sharded, sharding, eval_ds, start_digests, started)


def run(cfg: QATConfig, recipe: dict | None = None) -> Path:
    """Train and save; returns the output folder."""
    if cfg.float_steps:
        run_float_phase(cfg, recipe)
    training = build_trainer(cfg, recipe)
    result = training.trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    finish(cfg, recipe, training, result)
    return Path(cfg.output_dir)


def run_float_phase(cfg: QATConfig, recipe: dict | None) -> None:
    """`float_steps`: the float consistency phase of a float-then-QAT run, as its own run in
    output_dir/`FLOAT_PHASE_DIR` (checkpoints, final/, export), then `cfg` is pointed at its student
    (`init_student`) for the QAT phase. With `--resume_from_checkpoint latest` a finished float phase is kept and an
    unfinished one resumes from its own last checkpoint; the QAT phase resumes only once it has a checkpoint."""
    from accelerate import PartialState

    out = Path(cfg.output_dir)
    phase_dir = out / FLOAT_PHASE_DIR
    resuming = cfg.resume_from_checkpoint is not None
    if not resuming:
        check_output_dir(cfg)
    if not (resuming and (phase_dir / FINAL_DIR / STUDENT_DIR).is_dir()):
        phase = copy.copy(cfg)
        phase.output_dir, phase.max_steps, phase.float_steps = str(phase_dir), cfg.float_steps, 0
        phase.learning_rate = cfg.float_learning_rate or cfg.learning_rate
        phase.quantization_scheme, phase.qat_teacher, phase.push_openvino = NO_QUANTIZATION, lcd.QAT_TEACHERS[0], False
        resumable = resuming and phase_dir.is_dir() and find_resumable_checkpoint(phase_dir) is not None
        phase.resume_from_checkpoint = "latest" if resumable else None
        phase.overwrite = True  # a new float-phase folder, or an unfinished one started again
        training = build_trainer(phase, recipe)
        finish(phase, recipe, training, training.trainer.train(resume_from_checkpoint=phase.resume_from_checkpoint))
        del training
    PartialState().wait_for_everyone()  # every rank reads the float student the main process saved
    cfg.init_student = str(phase_dir)
    cfg.overwrite = True  # output_dir now holds the float phase
    if resuming and find_resumable_checkpoint(out) is None:
        cfg.resume_from_checkpoint = None  # the QAT phase has not saved yet: it starts from the float student


def finish(cfg: QATConfig, recipe: dict | None, training: Training, result) -> None:
    """After training: the EMA into the student, the final student, training_info.json, the loss plot, the OpenVINO
    export and the Hub push (the main process writes; every rank takes part in gathering a sharded student)."""
    from accelerate.utils import gather_object

    trainer, model, ema, sharded = training.trainer, training.model, training.ema, training.sharded
    out = Path(cfg.output_dir)
    end_digests = gather_object([quantizer_digest(model.student)])  # before EMA: the trained replicas
    if ema is not None:
        ema.copy_to(model.student)  # the exported model is the EMA model
    student = sharded.gathered(model.student) if sharded is not None else model.student  # a collective
    if not trainer.is_world_process_zero():
        return
    final = out / FINAL_DIR
    save_student(student, final / STUDENT_DIR)
    info = training_info(cfg, recipe, trainer, result, time.perf_counter() - training.started, training.start_digests,
                         end_digests, training.sharding, training.eval_dataset is not None, model)  # fmt: skip
    (final / TRAINING_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    (final / CONFIG_FILE).write_text(cfg.to_json_string())
    plot_losses(trainer.state.log_history, out / LOSS_PLOT)
    if cfg.export:
        export_openvino_pipeline(
            resolve_model_path(cfg.pretrained_model_name_or_path),
            student,
            out / OPENVINO_DIR,
            overwrite=True,  # this run's own export; the run already owns output_dir
            recipe=recipe or {},
            training_info=info,
            sample_prompts=[model.sample_prompt],
            resolution=cfg.resolution,
            few_step=lcm.few_step_record(cfg),
        )
    if cfg.push_openvino:
        from ..export.hub import push_to_hub

        push_to_hub(out / OPENVINO_DIR, cfg.hub_model_id, token=cfg.hub_token, private=bool(cfg.hub_private_repo))


def shard_student(cfg: QATConfig, model: QATModel):
    """Under an FSDP accelerate config with several processes, shard the student in place (`fsdp`). Returns
    (`fsdp.ShardedStudent` or None, the per-rank sharding record for training_info or None)."""
    if not fsdp.requested():
        return None, None
    os.environ["ACCELERATE_USE_FSDP"] = "false"  # the sharding is done here: accelerate must not wrap the model
    if cfg.world_size < 2:
        logger.warning("FSDP config with one process: nothing to shard, training unsharded")
        return None, None
    from accelerate.utils import gather_object

    sharded = fsdp.ShardedStudent(model.student, cfg.device)
    return sharded, {**sharded.info, "student_params_local": gather_object([sharded.info["student_params_local"]])}


# --------------------------------------------------------------------------------------------------------------------
# Command line (`ov-sd train`, `python -m ov_sd_trainer.train`, `accelerate launch train.py`)
# --------------------------------------------------------------------------------------------------------------------

PASSES_UNKNOWN_ARGS = True  # the CLI hands every flag to `parse_config` (the QATConfig fields come from the dataclass)


def add_arguments(parser) -> None:
    """Nothing to add: `--recipe` and every QATConfig field are parsed by `parse_config` (`ov-sd train --help`)."""


def main(args, extra: list[str]) -> int:
    cfg, recipe = parse_config(extra)
    out = run(cfg, recipe)
    print(f"training finished: {out}")
    return 0
