"""What a training run folder (`output_dir`) holds. Training writes it; export, eval and the CLI read it through here.

    output_dir/
      training_recipe.json     the recipe's own keys (what `--recipe` held plus nothing else)
      checkpoint-N/            a Trainer checkpoint: student/ (NNCF config + state dict), ema.safetensors,
                               config.json, optimizer/scheduler/RNG state; checkpoint_complete.json is written last
      final/                   the trained student with the EMA applied: student/, config.json, training_info.json
      openvino/                the exported OpenVINO pipeline folder (see pipeline_folder)
      loss.png                 task, distillation and total loss against the step
      float-phase/             a consistency run with float_steps: the float phase's own run folder (same layout)

A checkpoint without `checkpoint_complete.json` was interrupted while being written and is never resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from .pipeline_folder import RECIPE_FILE

FINAL_DIR = "final"
OPENVINO_DIR = "openvino"
STUDENT_DIR = "student"  # in checkpoint-N/ and final/: the quantized student (compress.quantize.save_quantized)
CONFIG_FILE = "config.json"  # in checkpoint-N/ and final/: the QATConfig as JSON
TRAINING_INFO_FILE = "training_info.json"  # in final/: runtime, steps, quantizer digests, log history
EMA_FILE = "ema.safetensors"  # in checkpoint-N/: the EMA shadow (final/ has it applied)
COMPLETE_MARKER = "checkpoint_complete.json"
LOSS_PLOT = "loss.png"
FLOAT_PHASE_DIR = "float-phase"  # a consistency run with float_steps: the float phase's own run folder
HANDOVER_DIR = ".calibrated-student"  # multi-process: the main process's calibrated student for the other ranks
CHECKPOINT_RE = re.compile(r"checkpoint-\d+")

__all__ = [
    "RECIPE_FILE",
    "FINAL_DIR",
    "OPENVINO_DIR",
    "STUDENT_DIR",
    "CONFIG_FILE",
    "TRAINING_INFO_FILE",
    "EMA_FILE",
    "COMPLETE_MARKER",
    "LOSS_PLOT",
    "HANDOVER_DIR",
    "FLOAT_PHASE_DIR",
    "find_resumable_checkpoint",
    "mark_complete",
    "is_complete",
    "is_checkpoint",
    "load_ema",
    "float_student_dir",
]


def is_complete(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def is_checkpoint(folder: str | Path) -> bool:
    """A folder export can load a student from: checkpoint-N/ or final/ (both hold config.json and student/)."""
    return (Path(folder) / CONFIG_FILE).is_file()


def load_ema(checkpoint: str | Path) -> dict | None:
    """The EMA shadow a checkpoint-N folder holds apart (parameter name -> whole tensor, as `train.ema` saves it), or
    None where there is none (final/ has it applied already; a run without EMA)."""
    path = Path(checkpoint) / EMA_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))


def mark_complete(checkpoint: str | Path, global_step: int) -> None:
    """Write the completion marker atomically (by rename), after everything else in the checkpoint."""
    folder = Path(checkpoint)
    tmp = folder / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps({"global_step": global_step}))
    os.replace(tmp, folder / COMPLETE_MARKER)


def find_resumable_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint-N in output_dir that was written completely (has the marker)."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if CHECKPOINT_RE.fullmatch(p.name)]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        if is_complete(folder):
            return folder
        logging.getLogger(__name__).warning("skipping %s: incomplete (interrupted while saving)", folder)
    return None


FLOAT_STUDENT_FILE = "unet.safetensors"  # a float (not quantized) student's weights in STUDENT_DIR


def save_student(student, directory) -> None:
    """The student to `directory`: NNCF config + state dict (`quantize.save_quantized`), or a float consistency
    student's weights (`FLOAT_STUDENT_FILE`)."""
    from .compress import quantize

    if quantize.is_quantized(student):
        quantize.save_quantized(student, directory)
        return
    from safetensors.torch import save_model

    Path(directory).mkdir(parents=True, exist_ok=True)
    save_model(student, str(Path(directory) / FLOAT_STUDENT_FILE))


def float_student_dir(path: str | Path) -> Path:
    """The folder holding a float consistency student's weights (`FLOAT_STUDENT_FILE`) in `path`: a run folder (its
    final/), a final/ or checkpoint-N/ folder, or the student/ folder itself. One-line error when there is none."""
    from .errors import UserError

    path = Path(path).expanduser()
    for candidate in (path, path / STUDENT_DIR, path / FINAL_DIR / STUDENT_DIR):
        if (candidate / FLOAT_STUDENT_FILE).is_file():
            return candidate
    if (path / STUDENT_DIR).is_dir() or (path / FINAL_DIR / STUDENT_DIR).is_dir():
        raise UserError(f"{str(path)!r} holds a quantized student; pass a float consistency run "
                        "(trained with quantization_scheme none)")  # fmt: skip
    raise UserError(f"{str(path)!r} holds no float consistency student ({STUDENT_DIR}/{FLOAT_STUDENT_FILE}); pass the "
                    "output_dir of a run trained with objective consistency and quantization_scheme none")  # fmt: skip


def load_student(fp32_unet, directory, inplace: bool = False):
    """The student `save_student` wrote, rebuilt on `fp32_unet` (an FP32 UNet of its architecture; copied unless
    `inplace`)."""
    from .compress import quantize

    directory = Path(directory)
    if not (directory / FLOAT_STUDENT_FILE).is_file():
        return quantize.load_quantized(fp32_unet, directory, inplace=inplace)
    import copy

    from safetensors.torch import load_model

    model = fp32_unet if inplace else copy.deepcopy(fp32_unet)
    load_model(model, str(directory / FLOAT_STUDENT_FILE), device=str(next(model.parameters()).device))
    return model
