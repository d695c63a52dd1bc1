"""`QATTrainer`: a `transformers.Trainer` for distillation-aided quantization-aware UNet training of a `QATModel`.

The Trainer is customised only through its hooks (`compute_loss`, `log`, `_save`, `_save_checkpoint`,
`_load_from_checkpoint`, `get_decay_parameter_names`), as TRL's trainers do. Checkpoints hold what the run-folder
contract (`run_folder`) says: the student as NNCF config + state dict, the EMA, and a completion marker written last.

With a sharded student (`fsdp.ShardedStudent`, under an FSDP accelerate config) the model is trained without DDP
around it (`_wrap_model`), and checkpoints gather the student, its EMA and the optimizer state to whole tensors on
every save (`save_model`, `_save_optimizer_and_scheduler`), so a checkpoint is the same files either way.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..compress import quantize
from ..run_folder import CONFIG_FILE, EMA_FILE, STUDENT_DIR, load_student, mark_complete, save_student
from . import fsdp as fsdp_utils
from .ema import EMACallback

OPTIMIZER_FILE, SCHEDULER_FILE = "optimizer.pt", "scheduler.pt"  # transformers' names


class _NoDDP(nn.Module):
    """What the Trainer trains when the student is sharded: the `QATModel`, but not `model` itself, so that the
    Trainer skips `accelerator.prepare(model)` (which would wrap it in DDP, and refuses sharded parameters)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class _EpochToAugmentation(TrainerCallback):
    """Tells the data augmentation which epoch it is (its random draws are seeded by epoch and row)."""

    def __init__(self, augmentation):
        self.augmentation = augmentation

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.augmentation.epoch = math.floor((state.epoch or 0) + 1e-6)


class QATTrainer(Trainer):
    """Trainer for `QATModel`: separate loss logging, quantizer-aware weight decay, NNCF checkpoints, EMA."""

    def __init__(self, *args, ema: EMACallback | None = None, augmentation=None,
                 fsdp: fsdp_utils.ShardedStudent | None = None, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.ema = ema
        self.fsdp = fsdp
        if ema is not None:
            self.add_callback(ema)
        if augmentation is not None:
            self.add_callback(_EpochToAugmentation(augmentation))
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._eval_sums: dict[str, float] = defaultdict(float)  # teacher-gap metrics x items, this evaluation
        self._micro = (-1, 0)  # (global step, micro-batch within it)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`Trainer.train`, except for a checkpoint already at `max_steps` (a run cut off after its last save, e.g.
        during the export): transformers' loop checks the step count only after a step, so it would train one step
        more. Such a run is finished: its checkpoint (or its best one, with `load_best_model_at_end`) is loaded and
        no step is taken."""
        if resume_from_checkpoint and self.args.max_steps > 0:
            from transformers.trainer import TRAINER_STATE_NAME
            from transformers.trainer_callback import TrainerState
            from transformers.trainer_utils import TrainOutput

            state = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / TRAINER_STATE_NAME))
            if state.global_step >= self.args.max_steps:
                best = state.best_model_checkpoint if self.args.load_best_model_at_end else None
                self._load_from_checkpoint(best if best and Path(best).is_dir() else resume_from_checkpoint)
                self.state = state
                return TrainOutput(state.global_step, 0.0, {"train_runtime": 0.0})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # --- loss ------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step, micro = self._micro
        micro = micro + 1 if step == self.state.global_step else 0
        self._micro = (self.state.global_step, micro)
        index = (self.state.global_step * self.args.gradient_accumulation_steps + micro) * self.args.world_size
        self._qat(model).set_noise_seed(self.args.seed, 0, index + self.args.process_index)
        out = model(**inputs)  # images (pixel_values, input_ids)
        for key in ("task_loss", "distillation_loss", "consistency_loss"):
            if key in out:
                self._metrics[key].append(out[key].item())
        return (out["loss"], out) if return_outputs else out["loss"]

    def _qat(self, model=None) -> nn.Module:
        """The `QATModel` inside whatever the Trainer wraps it in."""
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        return model.module if isinstance(model, _NoDDP) else model

    def _wrap_model(self, model, training=True, dataloader=None):
        if self.fsdp is not None:  # FSDP already shards the student: no DDP (nor anything else) around it
            return _NoDDP(self._qat(model)) if training else self._qat(model)
        return super()._wrap_model(model, training, dataloader)

    def log(self, logs, start_time=None):
        # Averages of the separate losses since the last log, then cleared (TRL's pattern).
        if self._metrics and "loss" in logs:
            for key, values in self._metrics.items():
                logs[key] = round(sum(values) / len(values), 6)
            self._metrics.clear()
        super().log(logs, start_time)

    # --- teacher-gap evaluation (Trainer's own loop: eval_strategy / eval_steps) --------------------------------
    EVAL_METRICS = ("teacher_mse", "task_loss")  # what a held-out batch reports
    FEW_STEP_METRICS = ("few_step_psnr", "few_step_mse")  # what a consistency run's evaluation reports

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """One teacher-gap batch (`teacher_mse`, and `task_loss` where the true target is known); each metric is
        summed over items for `evaluation_loop`."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            out = model(**inputs, evaluate=True)
        n = len(next(iter(inputs.values())))
        for key in self.EVAL_METRICS:
            if key in out:
                self._eval_sums[key] += out[key].item() * n
                self._eval_sums[f"n_{key}"] += n
        return out["loss"].detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):  # fmt: skip
        """Evaluate what gets exported: with an EMA, its weights are swapped in for the evaluation (as diffusers'
        examples validate), so `load_best_model_at_end` keeps the best exported model."""
        student = self._qat().student
        self._eval_sums.clear()
        with self.ema.applied(student) if self.ema is not None else contextlib.nullcontext():
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        keys = [k for m in self.EVAL_METRICS for k in (m, f"n_{m}")]
        sums = torch.tensor([self._eval_sums[k] for k in keys], dtype=torch.float64)
        sums = self.accelerator.reduce(sums.to(self.accelerator.device), reduction="sum").cpu()
        for i, metric in enumerate(self.EVAL_METRICS):
            if sums[2 * i + 1] > 0:
                output.metrics[f"{metric_key_prefix}_{metric}"] = float(sums[2 * i] / sums[2 * i + 1])
        return output

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """A consistency run's evaluation: the student's (EMA applied) few-step samples of the held-out prompts
        against the teacher's ODE endpoints (`consistency.few_step_gap`): `eval_few_step_psnr` (dB, decoded images)
        and `eval_few_step_mse` (latents). Deterministic, so every rank of a multi-process run computes the same."""
        qat = self._qat()
        if getattr(qat, "gap_set", None) is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        from .consistency import few_step_gap

        steps, num_ddim = qat.few_step
        with self.ema.applied(qat.student) if self.ema is not None else contextlib.nullcontext():
            gap = few_step_gap(qat.student, qat.pipeline, qat.gap_set, steps, num_ddim)
        metrics = {
            f"{metric_key_prefix}_few_step_psnr": gap["psnr"],
            f"{metric_key_prefix}_few_step_mse": gap["latent_mse"],
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _load_best_model(self):
        """The best checkpoint by `metric_for_best_model` (e.g. teacher_mse): student and EMA, as a resume loads them."""
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    # --- optimizer -------------------------------------------------------------------------
    def get_decay_parameter_names(self, model):
        """No weight decay on quantizer parameters (scales / ranges), biases or norms."""
        names = set(super().get_decay_parameter_names(model))
        student = self._qat(model).student
        quantizer_ids = {id(p) for _, p in quantize.quantizer_parameters(student)}
        return [n for n, p in model.named_parameters() if n in names and id(p) not in quantizer_ids]

    # --- checkpoints -----------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint, then a completion marker written last (atomically, by rename).

        A run killed while a checkpoint is being written leaves a folder without the marker, which
        `run_folder.find_resumable_checkpoint` skips: an incomplete checkpoint is never loaded."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            mark_complete(folder, self.state.global_step)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if self.fsdp is None:
            return super().save_model(output_dir, _internal_call)
        # every rank takes part in gathering the shards; the main process writes
        student = self.fsdp.gathered(self._qat().student)
        ema = self.ema.full_state() if self.ema is not None else None
        if self.args.should_save:
            self._save(output_dir, student=student, ema=ema, target=False)
        target = self._qat().consistency_target
        if target is not None:  # gathered into the same template, after the student is written
            net = self.fsdp.gathered(target.net)
            if self.args.should_save:
                target.save(output_dir or self.args.output_dir, net)

    def _save(self, output_dir: str | None = None, state_dict=None, student=None, ema=None, target=True):
        """A checkpoint that restores the quantized student exactly: NNCF config + state dict (and the EMA, and a
        consistency run's target network unless `target` is False: a sharded one is written by `save_model`)."""
        output_dir = Path(output_dir or self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        save_student(student if student is not None else self._qat().student, output_dir / STUDENT_DIR)
        if self.ema is not None:
            self.ema.save(output_dir, ema)
        if target and self._qat().consistency_target is not None:
            self._qat().consistency_target.save(output_dir)
        (output_dir / CONFIG_FILE).write_text(self.args.to_json_string())

    def _save_optimizer_and_scheduler(self, output_dir: str):
        if self.fsdp is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self._qat(), self.optimizer, options=options)  # a collective
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_FILE))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        if self.fsdp is None or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(os.path.join(checkpoint, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self._qat(), self.optimizer, state, options=StateDictOptions(full_state_dict=True))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_FILE), weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self._qat(model)
        src = Path(resume_from_checkpoint)
        # Rebuild from the saved NNCF config on the teacher (a copy), then take its exact state.
        loaded = load_student(model.fp32_student_base(), src / STUDENT_DIR)
        if self.fsdp is not None:
            self.fsdp.load_from(model.student, loaded)  # each rank keeps its shards
        else:
            model.student.load_state_dict(loaded.state_dict())
        if model.consistency_target is not None:
            model.consistency_target.load(src, scratch=loaded)  # (sharded: through `loaded`, overwritten)
        del loaded
        if self.ema is not None and (src / EMA_FILE).is_file():
            self.ema.load(src)
