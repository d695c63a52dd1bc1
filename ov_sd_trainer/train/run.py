"""`ov-sd train`: setup (pipeline, data, calibration, student/teacher) -> train -> save -> export.

    ov-sd train --recipe reference-int8 --output_dir outputs/reference-int8
    accelerate launch -m ov_sd_trainer.train --recipe sd15-pokemon-int8 --output_dir outputs/pokemon
    accelerate launch --config_file ov_sd_trainer/recipes/accelerate/fsdp-full-shard.yaml -m ov_sd_trainer.train ...

`run(config)` is the whole job; each stage is a function so tests can drive them alone. What the output folder
holds is `run_folder`'s contract.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from .. import families
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
    HANDOVER_DIR,
    LOSS_PLOT,
    OPENVINO_DIR,
    RECIPE_FILE,
    STUDENT_DIR,
    TRAINING_INFO_FILE,
    find_resumable_checkpoint,
    is_complete,
)
from . import fsdp
from .config import QATConfig, parse_config
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
from .rollouts import RolloutPrompts, make_rollout, rollout_gap_set
from .teacher_gap import build_teacher_gap_set
from .trainer import QATTrainer
from .unet_inputs import collect_calibration_inputs, collect_trajectory_inputs

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
    calls = trajectory_calls(cfg, pipe, train_ds)
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


def trajectory_calls(cfg: QATConfig, pipe, train_ds) -> list[dict] | None:
    """With `calibration_source: trajectories`, the teacher's `num_calibration_samples` UNet calls sampling the
    training captions (else None). Deterministic, so every rank of a multi-process run collects the same calls."""
    if cfg.calibration_source != "trajectories":
        return None
    captions = list(train_ds.with_format(None)[cfg.caption_column])
    return collect_trajectory_inputs(pipe, captions, cfg.num_calibration_samples, cfg.resolution, cfg.seed, steps=cfg.calibration_steps,
                                     guidance_scale=cfg.calibration_guidance_scale)  # fmt: skip


def calibrate_once(cfg: QATConfig, model: QATModel, fp32_student, train_ds, device, calls=None):
    """NNCF calibration on the main process only; the other ranks load its result.

    So every rank starts from the same quantizer ranges, and a multi-process run pays for
    calibration once. The hand-over folder is removed once all ranks have loaded it.
    `fp32_student`: the FP32 UNet to quantize, left unchanged (the teacher itself, or with token
    merging a merged copy of it); the other ranks load the saved student onto their own such UNet,
    so that NNCF's op names (and hence the quantizers) match."""
    import shutil

    from accelerate import PartialState

    state = PartialState()
    handover = Path(cfg.output_dir) / HANDOVER_DIR
    if state.num_processes == 1:
        return _calibrate(cfg, model, fp32_student, train_ds, device, calls)
    with state.main_process_first():
        if state.is_main_process:
            student = _calibrate(cfg, model, fp32_student, train_ds, device, calls)
            quantize.save_quantized(student, handover)
        else:
            student = quantize.load_quantized(fp32_student, handover).to(device)
    state.wait_for_everyone()
    if state.is_main_process:
        shutil.rmtree(handover, ignore_errors=True)
    return student


DRAW_SEED_STRIDE = 1000  # calibration draw k samples its inputs from seed + k x this
SELECTION_SEED_OFFSET = 10_000  # the draws' held-out rollouts: captions and seeds apart from the teacher-gap set's


def _calibrate(cfg: QATConfig, model: QATModel, fp32_student, train_ds, device, calls=None):
    """One calibration, or with `calibration_draws` N > 1 the best of N on held-out rollouts: each draw's student
    samples `teacher_gap_samples` held-out captions from held-out seeds, and the one whose decoded images are closest
    to the teacher's (PSNR, pooled) is kept. The scores go to `model.calibration_scores` (training_info.json)."""
    if cfg.calibration_draws == 1:
        return _calibrate_draw(cfg, model, fp32_student, train_ds, device, calls, cfg.seed)
    rollout = make_rollout(model.pipeline, cfg.resolution, cfg.calibration_steps)
    held_out = rollout_gap_set(
        model.tokenizer, cfg.teacher_gap_samples, cfg.seed + SELECTION_SEED_OFFSET, cfg.resolution, cfg.dataset_name,
        cfg.caption_column, cfg.image_column,
    )  # fmt: skip
    best, scores = None, []
    for k in range(cfg.calibration_draws):
        seed = cfg.seed + k * DRAW_SEED_STRIDE
        draw_calls = calls
        if k and cfg.calibration_source == "trajectories":
            draw_calls = collect_trajectory_inputs(
                model.pipeline, list(train_ds.with_format(None)[cfg.caption_column]), cfg.num_calibration_samples,
                cfg.resolution, seed, steps=cfg.calibration_steps, guidance_scale=cfg.calibration_guidance_scale,
            )  # fmt: skip
        student = _calibrate_draw(cfg, model, fp32_student, train_ds, device, draw_calls, seed)
        psnr = rollout_psnr(rollout, model, student, held_out, device)
        logger.info("calibration draw %d (seed %d): held-out rollout PSNR %.3f dB", k, seed, psnr)
        scores.append({"draw": k, "seed": seed, "rollout_psnr": psnr})
        if best is None or psnr > best[0]:
            best = (psnr, student)
        del student
    chosen = max(scores, key=lambda s: s["rollout_psnr"])
    model.calibration_scores = {"draws": scores, "chosen": chosen["draw"], "held_out": len(held_out)}
    return best[1]


@torch.no_grad()
def rollout_psnr(rollout, model: QATModel, student, held_out: RolloutPrompts, device, batch: int = 8) -> float:
    """PSNR (pooled over `held_out`) of `student`'s decoded rollouts against the teacher's."""
    placeholder, model.student = model.student, student.eval()
    try:
        sums = 0.0
        for i in range(0, len(held_out), batch):
            rows = collate([held_out[j] for j in range(i, min(i + batch, len(held_out)))])
            out = rollout.gap(model, rows["prompt_ids"].to(device), rows["noise_seed"])
            sums += out["rollout_image_mse"].item() * len(rows["prompt_ids"])
    finally:
        model.student = placeholder
    return -10 * math.log10(max(sums / len(held_out), 1e-12))


def _calibrate_draw(cfg: QATConfig, model: QATModel, fp32_student, train_ds, device, calls, seed: int):
    if cfg.calibration_source == "trajectories":
        calib = calls[: cfg.num_calibration_samples]
    else:
        calib = collect_calibration_inputs(model, train_ds, cfg.num_calibration_samples, seed, device)
    t0 = time.perf_counter()
    student = quantize.quantize_unet(
        fp32_student,
        calib,
        preset=cfg.quantization_preset,
        overflow_fix=cfg.overflow_fix,
        ignored_scope=cfg.ignored_scope,
        scheme=cfg.quantization_scheme,
    )
    logger.info("NNCF quantization of the student took %.1f s", time.perf_counter() - t0)
    return student


def quantizer_digest(student) -> str:
    """sha256 of the quantizer parameters: equal digests mean identical quantizers on every rank."""
    import hashlib

    h = hashlib.sha256()
    for _, p in quantize.quantizer_parameters(student):  # sharded: gathered one at a time (a collective)
        h.update(fsdp.full(p.detach()).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _noise_scheduler(path: str, revision: str | None):
    """The training scheduler: DDPM with the pipeline's noise schedule and prediction type."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)


def run(cfg: QATConfig, recipe: dict | None = None) -> Path:
    """Train and save; returns the output folder."""
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
    cfg.remove_unused_columns = False  # the transform needs the raw image and caption columns
    if cfg.push_openvino and not cfg.export:
        raise UserError("push_to_hub needs export=true: the OpenVINO folder is what gets uploaded")
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model, train_ds, augmentation = build(cfg)
    eval_ds = None
    evaluates = cfg.eval_strategy != "no" or cfg.eval_on_start  # eval_on_start alone: the calibrated student's gap
    if evaluates:
        eval_ds = build_teacher_gap_set(
            model, model.tokenizer, cfg.teacher_gap_samples, cfg.seed, cfg.resolution, cfg.dataset_name,
            cfg.caption_column, cfg.image_column,
        )  # fmt: skip
    if cfg.teacher_dtype != "auto":
        model.cast_teacher(getattr(torch, cfg.teacher_dtype))
    from accelerate.utils import gather_object

    start_digests = gather_object([quantizer_digest(model.student)])
    sharded, sharding = shard_student(cfg, model)
    ema = None
    if cfg.use_ema:  # after sharding: each rank keeps the EMA of its shards
        ema = EMACallback(model.student, cfg.ema_decay, cfg.ema_device, cfg.ema_use_warmup, cfg.ema_power)
    trainer = QATTrainer(
        model=model, args=cfg, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collate, ema=ema,
        augmentation=augmentation, fsdp=sharded,
    )  # fmt: skip
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        (out / RECIPE_FILE).write_text(json.dumps(recipe or {}, indent=2))
    result = trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    end_digests = gather_object([quantizer_digest(model.student)])  # before EMA: the trained replicas
    if ema is not None:
        ema.copy_to(model.student)  # the exported model is the EMA model
    student = sharded.gathered(model.student) if sharded is not None else model.student  # a collective
    if trainer.is_world_process_zero():
        final = out / FINAL_DIR
        quantize.save_quantized(student, final / STUDENT_DIR)
        info = {
            "base_model": cfg.pretrained_model_name_or_path,
            "resolved_model_path": resolve_model_path(cfg.pretrained_model_name_or_path),
            "recipe": recipe or {},
            "train_runtime_s": result.metrics.get("train_runtime"),
            "total_runtime_s": time.perf_counter() - t0,
            "global_step": trainer.state.global_step,
            "world_size": cfg.world_size,
            "quantizer_digests_at_start": start_digests,  # one per rank
            "quantizer_digests_at_end": end_digests,
            "sharding": sharding,  # FSDP: what each rank held of the student; None when it is replicated
            "teacher_gap": teacher_gap_history(trainer.state.log_history),
            "teacher_gap_samples": cfg.teacher_gap_samples if eval_ds is not None else None,
            "calibration_draws": getattr(model, "calibration_scores", None),
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "best_metric": trainer.state.best_metric,
            "log_history": trainer.state.log_history,
        }
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
            )
        if cfg.push_openvino:
            from ..export.hub import push_to_hub

            push_to_hub(out / OPENVINO_DIR, cfg.hub_model_id, token=cfg.hub_token, private=bool(cfg.hub_private_repo))
    return out


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


def teacher_gap_history(log_history: list[dict]) -> list[dict]:
    """(step, eval_teacher_mse, eval_task_loss) of every teacher-gap evaluation of a run."""
    keys = QATTrainer.EVAL_METRICS
    return [
        {"step": h["step"], **{k: h.get(f"eval_{k}") for k in keys}}
        for h in log_history
        if any(f"eval_{k}" in h for k in keys)
    ]


def plot_losses(log_history: list[dict], path: Path) -> Path | None:
    """Task, distillation and total loss against the step (matplotlib, headless)."""
    rows = [h for h in log_history if "loss" in h]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [h["step"] for h in rows]
    for key, label in (("loss", "total"), ("task_loss", "task (vs target)"), ("distillation_loss", "distillation")):
        if all(key in h for h in rows):
            ax.plot(steps, [h[key] for h in rows], label=label)
    points = [(g["step"], g["teacher_mse"]) for g in teacher_gap_history(log_history) if g["teacher_mse"] is not None]
    if points:
        ax.plot(*zip(*points, strict=True), "o-", label="held-out student vs teacher")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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
