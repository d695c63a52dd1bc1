"""`QATConfig`: every knob of UNet quantization-aware training, as `TrainingArguments` fields, and the recipes.

Recipes (`--recipe NAME` for a shipped one, `--recipe FILE.json` for your own) hold these field names; their values
become parser defaults and command-line flags override them, as TRL's `TrlParser` does. Unknown keys and wrong types
are one-line errors that name the key. The shipped recipes are package data in `ov_sd_trainer/recipes/`.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from .. import lcm
from ..assets import REFERENCE
from ..compress.kernels import MODES as KERNEL_MODES
from ..compress.quantize import DEFAULT_OVERFLOW_FIX, DEFAULT_PRESET, DEFAULT_SCHEME, OVERFLOW_FIX, PRESETS, SCHEMES
from ..compress.tome_config import MAX_RATIO, TomeConfig
from ..errors import UserError
from . import consistency as lcd
from .unet_inputs import DEFAULT_STEPS as CALIBRATION_STEPS
from .unet_inputs import GUIDANCE as CALIBRATION_GUIDANCE
from .unet_inputs import SOURCES as CALIBRATION_SOURCES

TEACHER_DTYPES = ("auto", "float32", "bfloat16")  # auto: the pipeline's dtype

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
OBJECTIVES = ("distillation", "consistency")  # docs/training.md, docs/few-step.md
NO_QUANTIZATION = "none"  # quantization_scheme of a float consistency student (the PTQ peers' start)
QUANTIZE_KERNELS = KERNEL_MODES  # auto | extension | reference (compress.kernels)


@dataclass
class QATConfig(TrainingArguments):
    # --- model -------------------------------------------------------------------------------
    pretrained_model_name_or_path: str = field(
        default=REFERENCE,
        metadata={"help": "diffusers SD pipeline: local folder, Hub id, or 'reference' for the bundled model"},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the pipeline"})
    # --- data --------------------------------------------------------------------------------
    dataset_name: str = field(
        default="synthetic",
        metadata={"help": "'synthetic', 'synthetic:N', a local imagefolder, or a Hub dataset id"},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config name"})
    image_column: str = field(default="image", metadata={"help": "dataset column holding the images"})
    caption_column: str = field(default="text", metadata={"help": "dataset column holding the captions"})
    max_train_samples: int | None = field(default=None, metadata={"help": "truncate the dataset to N rows"})
    synthetic_size: int = field(default=1000, metadata={"help": "rows of the synthetic dataset"})
    resolution: int = field(default=64, metadata={"help": "training image side in pixels (512 for SD 1.5)"})
    center_crop: bool = field(default=False, metadata={"help": "centre crop instead of random crop"})
    random_flip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    # --- quantization ------------------------------------------------------------------------
    quantization_scheme: str = field(
        default=DEFAULT_SCHEME,
        metadata={
            "help": f"{' | '.join(SCHEMES)}: full = int8 weights and activations everywhere; hybrid = optimum-intel's "
            "scheme: linear layers int8 weights only (float inputs), full int8 elsewhere"
        },
    )
    quantization_preset: str = field(
        default=DEFAULT_PRESET, metadata={"help": f"NNCF preset: {' | '.join(PRESETS)} (mixed: asymmetric activations)"}
    )
    num_calibration_samples: int = field(
        default=300, metadata={"help": "UNet inputs (calls) used to initialise the quantizer ranges"}
    )
    calibration_source: str = field(
        default="trajectories",  # measured: halves the calibrated student's one-step error (docs/fidelity.md)
        metadata={
            "help": f"{' | '.join(CALIBRATION_SOURCES)}: trajectories = the FP32 pipeline's own UNet calls sampling "
            "the training captions (as optimum's PTQ); training = noisy training images at random timesteps"
        },
    )
    calibration_steps: int = field(
        default=CALIBRATION_STEPS,
        metadata={"help": "denoising steps of each teacher trajectory (calibration and distillation inputs)"},
    )
    calibration_draws: int = field(
        default=1,
        metadata={
            "help": "calibrate N times, each on another draw of calibration inputs (seed + k x 1000), and keep the "
            "student whose held-out rollout images are closest to the teacher's (PSNR over teacher_gap_samples "
            "trajectories of captions and seeds no evaluation uses); 1 = one calibration"
        },
    )
    calibration_guidance_scale: float = field(
        default=CALIBRATION_GUIDANCE,
        metadata={"help": "guidance scale of the teacher trajectories (<= 1: no CFG batch, as SD-Turbo samples)"},
    )
    overflow_fix: str = field(
        default=DEFAULT_OVERFLOW_FIX,  # why: see compress.quantize.DEFAULT_OVERFLOW_FIX
        metadata={"help": f"NNCF overflow fix: {' | '.join(OVERFLOW_FIX)} (enable: 7-bit weights, exact on any CPU)"},
    )
    ignored_scope: list[str] | None = field(
        default=None, metadata={"help": "regex patterns of node names NNCF must not quantize"}
    )
    quantize_kernels: str = field(
        default="auto",
        metadata={
            "help": "auto | extension | reference: NNCF's fake-quantize kernels on CUDA. auto = the compiled CUDA "
            "extension when it builds (needs nvcc), else NNCF's pure-torch reference functions with a warning"
        },
    )
    tune_quantizers_only: bool = field(
        default=False, metadata={"help": "train only the quantizer parameters (scales), keep weights frozen"}
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "auto | float32 | bfloat16: dtype of the frozen FP32 teacher UNet (bfloat16 halves its memory, "
            "e.g. for SDXL on a 24 GB GPU; its outputs are cast back to float32). auto = the pipeline's dtype"
        },
    )
    # --- losses ------------------------------------------------------------------------------
    distillation_weight: float = field(
        default=1.0, metadata={"help": "weight of MSE(student, FP32 teacher), the training loss"}
    )
    task_weight: float = field(
        default=0.0,  # measured: the task loss pulls the student away from its teacher (docs/fidelity.md)
        metadata={
            "help": "weight of the task loss (MSE to the true target) added to the distillation loss; 0 = pure "
            "distillation (the task loss is still logged)"
        },
    )
    teacher_gap_samples: int = field(
        default=32,
        metadata={"help": "held-out UNet inputs of the teacher-gap evaluation (used when eval_strategy is not 'no')"},
    )
    prediction_type: str | None = field(
        default=None, metadata={"help": "epsilon | v_prediction | sample; default: the scheduler's"}
    )
    snr_gamma: float | None = field(default=None, metadata={"help": "Min-SNR loss weighting gamma (5.0 is common)"})
    noise_offset: float = field(default=0.0, metadata={"help": "noise offset (0 = off)"})
    # --- objective ----------------------------------------------------------------------------
    objective: str = field(
        default=OBJECTIVES[0],
        metadata={
            "help": f"{' | '.join(OBJECTIVES)}: distillation = the student copies the FP32 teacher's noise prediction "
            "(same steps); consistency = latent consistency distillation (LCM): a few-step student with the guidance "
            "distilled in (docs/few-step.md)"
        },
    )
    time_cond_proj_dim: int = field(
        default=lcm.TIME_COND_PROJ_DIM, metadata={"help": "consistency: width of the student's guidance embedding"}
    )
    num_ddim_timesteps: int = field(
        default=lcm.NUM_DDIM_TIMESTEPS,
        metadata={"help": "consistency: DDIM solver steps over the teacher's schedule (skipping step T / N)"},
    )
    w_min: float = field(default=lcd.W_MIN, metadata={"help": "consistency: lowest guidance w drawn (CFG scale w+1)"})
    w_max: float = field(default=lcd.W_MAX, metadata={"help": "consistency: highest guidance w drawn"})
    consistency_loss_type: str = field(
        default=lcd.DEFAULT_LOSS_TYPE, metadata={"help": f"consistency: {' | '.join(lcd.LOSS_TYPES)}"}
    )
    huber_c: float = field(default=lcd.HUBER_C, metadata={"help": "consistency: pseudo-Huber c"})
    target_decay: float = field(
        default=lcd.TARGET_DECAY, metadata={"help": "consistency: EMA decay of the target network"}
    )
    few_step_steps: int = field(
        default=lcd.GAP_STEPS,
        metadata={
            "help": "consistency: the student's sampling steps: its calibration trajectories, the held-out eval and "
            "the exported folder's default"
        },
    )
    few_step_guidance_scale: float = field(
        default=lcd.GAP_GUIDANCE,
        metadata={"help": "consistency: the guidance scale of calibration, eval and the exported folder's default"},
    )
    init_student: str | None = field(
        default=None,
        metadata={
            "help": "consistency: start the student from a float consistency run (its output_dir, final/ or "
            "checkpoint-N/) instead of the teacher; with quantization_scheme full or hybrid this is the "
            "float-then-QAT order (docs/few-step.md)"
        },
    )
    float_steps: int = field(
        default=0,
        metadata={
            "help": "consistency with a quantized scheme: first train this many steps in float (into "
            "output_dir/float-phase/, exported there too), then max_steps of QAT from that student (init_student): "
            "the float-then-QAT order in one run"
        },
    )
    float_learning_rate: float | None = field(
        default=None,
        metadata={"help": "consistency with float_steps: the float phase's learning rate (default: learning_rate)"},
    )
    qat_teacher: str = field(
        default=lcd.QAT_TEACHERS[0],
        metadata={
            "help": f"consistency: {' | '.join(lcd.QAT_TEACHERS)}: what the student learns from. model = the "
            "consistency loss against the pipeline's teacher; init_student = the outputs of the float init_student "
            "(QAT of a float consistency student with it as the teacher)"
        },
    )
    # --- EMA ---------------------------------------------------------------------------------
    use_ema: bool = field(default=True, metadata={"help": "keep an EMA of the student's trainable parameters"})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay ceiling"})
    ema_device: str = field(default="cpu", metadata={"help": "where the EMA shadow lives (cpu keeps GPU free)"})
    ema_use_warmup: bool = field(default=False, metadata={"help": "diffusers' power-law EMA warm-up"})
    ema_power: float = field(default=2 / 3, metadata={"help": "power of the EMA warm-up"})
    # --- token merging -----------------------------------------------------------------------
    tome_ratio: float = field(
        default=0.0, metadata={"help": f"token merging ratio on the student (0 = off, <= {MAX_RATIO})"}
    )
    tome_mode: str = field(
        default="tome",
        metadata={"help": "tome: merge similar tokens (ToMe for SD) | todo: downsample self-attention keys/values"},
    )
    tome_max_downsample: int = field(
        default=1, metadata={"help": "merge at the UNet levels downsampled at most this much (1, 2, 4, 8)"}
    )
    tome_sx: int = field(default=2, metadata={"help": "token merging stride in x (one dst token per sy x sx cell)"})
    tome_sy: int = field(default=2, metadata={"help": "token merging stride in y"})
    tome_merge_attn: bool = field(default=True, metadata={"help": "merge tokens for self-attention"})
    tome_merge_crossattn: bool = field(default=False, metadata={"help": "merge tokens for cross-attention"})
    tome_merge_mlp: bool = field(default=False, metadata={"help": "merge tokens for the feed-forward layers"})
    # --- optimizer ---------------------------------------------------------------------------
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes 8-bit AdamW (same as optim=adamw_8bit)"})
    # --- output ------------------------------------------------------------------------------
    overwrite: bool = field(default=False, metadata={"help": "allow a non-empty output_dir (resume is always allowed)"})
    export: bool = field(
        default=True, metadata={"help": "export the OpenVINO pipeline to output_dir/openvino at the end"}
    )

    def __post_init__(self):
        if self.use_8bit_adam:
            self.optim = "adamw_bnb_8bit"
        # Trainer would push torch checkpoints; we push the exported OpenVINO folder ourselves.
        self.push_openvino = bool(self.push_to_hub)
        self.push_to_hub = False
        super().__post_init__()
        if self.fp16 and self.device.type == "cpu":  # accelerate enables fp16 autocast on GPUs only: fp32 otherwise
            raise UserError(
                "fp16=true needs a GPU (on the CPU it is ignored and training runs in fp32); use --bf16 true"
            )
        if self.push_openvino and not self.hub_model_id:
            raise UserError("push_to_hub needs hub_model_id (user/name)")
        if self.quantization_preset not in PRESETS:
            raise UserError(f"quantization_preset={self.quantization_preset!r}: use one of {PRESETS}")
        if self.overflow_fix not in OVERFLOW_FIX:
            raise UserError(f"overflow_fix={self.overflow_fix!r}: use one of {OVERFLOW_FIX}")
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"prediction_type={self.prediction_type!r}: use one of {PREDICTION_TYPES} or leave unset")
        TomeConfig.from_training_config(self)  # every tome_* field, with errors that name them
        if self.calibration_source not in CALIBRATION_SOURCES:
            raise UserError(f"calibration_source={self.calibration_source!r}: use one of {CALIBRATION_SOURCES}")
        if self.calibration_steps < 1:
            raise UserError(f"calibration_steps={self.calibration_steps}: must be >= 1")
        if self.calibration_draws < 1:
            raise UserError(f"calibration_draws={self.calibration_draws}: must be >= 1")
        if self.num_calibration_samples < 1:
            raise UserError(f"num_calibration_samples={self.num_calibration_samples}: must be >= 1")
        if self.resolution < 8 or self.resolution % 8:
            raise UserError(f"resolution={self.resolution}: must be a multiple of 8 (the VAE factor of SD)")
        if self.objective not in OBJECTIVES:
            raise UserError(f"objective={self.objective!r}: use one of {OBJECTIVES}")
        schemes = SCHEMES + ((NO_QUANTIZATION,) if self.objective == "consistency" else ())
        if self.quantization_scheme not in schemes:
            raise UserError(f"quantization_scheme={self.quantization_scheme!r}: use one of {schemes}")
        self._check_consistency()
        if self.distillation_weight < 0 or self.task_weight < 0:
            raise UserError(
                f"distillation_weight={self.distillation_weight}, task_weight={self.task_weight}: must be >= 0"
            )
        if self.distillation_weight == 0 and self.task_weight == 0:
            raise UserError("distillation_weight and task_weight are both 0: nothing to train on; set one > 0")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise UserError(f"teacher_dtype={self.teacher_dtype!r}: use one of {TEACHER_DTYPES}")
        if self.quantize_kernels not in QUANTIZE_KERNELS:
            raise UserError(f"quantize_kernels={self.quantize_kernels!r}: use one of {QUANTIZE_KERNELS}")
        if self.teacher_gap_samples < 1:
            raise UserError(f"teacher_gap_samples={self.teacher_gap_samples}: must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay={self.ema_decay}: must be in [0, 1)")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UserError(f"snr_gamma={self.snr_gamma}: must be > 0 or unset")
        if self.max_steps == 0 or self.max_steps < -1:  # transformers would silently train num_train_epochs instead
            raise UserError(f"max_steps={self.max_steps}: must be >= 1, or -1 to train num_train_epochs epochs")
        if self.output_dir is not None and Path(self.output_dir).expanduser().is_file():
            raise UserError(f"output_dir {self.output_dir!r} is a file; pass a folder (new or empty) for the run")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise UserError(f"max_train_samples={self.max_train_samples}: must be >= 1 or unset")

    def _check_consistency(self):
        """The consistency fields: one-line errors that name the field."""
        if self.time_cond_proj_dim < 1:
            raise UserError(f"time_cond_proj_dim={self.time_cond_proj_dim}: must be >= 1")
        if self.num_ddim_timesteps < 1:
            raise UserError(f"num_ddim_timesteps={self.num_ddim_timesteps}: must be >= 1")
        if not 0 <= self.w_min <= self.w_max:
            raise UserError(f"w_min={self.w_min}, w_max={self.w_max}: need 0 <= w_min <= w_max")
        if self.consistency_loss_type not in lcd.LOSS_TYPES:
            raise UserError(f"consistency_loss_type={self.consistency_loss_type!r}: use one of {lcd.LOSS_TYPES}")
        if self.huber_c <= 0:
            raise UserError(f"huber_c={self.huber_c}: must be > 0")
        if not 0 <= self.target_decay < 1:
            raise UserError(f"target_decay={self.target_decay}: must be in [0, 1)")
        if self.few_step_steps < 1:
            raise UserError(f"few_step_steps={self.few_step_steps}: must be >= 1")
        if self.few_step_guidance_scale < 1:
            raise UserError(f"few_step_guidance_scale={self.few_step_guidance_scale}: must be >= 1 (w = scale - 1)")
        if self.qat_teacher not in lcd.QAT_TEACHERS:
            raise UserError(f"qat_teacher={self.qat_teacher!r}: use one of {lcd.QAT_TEACHERS}")
        if self.float_steps < 0:
            raise UserError(f"float_steps={self.float_steps}: must be >= 0")
        if self.float_learning_rate is not None and self.float_learning_rate <= 0:
            raise UserError(f"float_learning_rate={self.float_learning_rate}: must be > 0 or unset")
        if self.objective != "consistency":
            if self.init_student is not None or self.float_steps:
                raise UserError("init_student and float_steps start a consistency student; set objective consistency "
                                "or drop them")  # fmt: skip
            return
        if self.float_steps and (self.init_student is not None or not self.quantized):
            raise UserError(
                f"float_steps={self.float_steps} trains the float phase before QAT: it needs quantization_scheme full "
                "or hybrid and no init_student"
            )
        if self.qat_teacher == "init_student" and ((self.init_student is None and not self.float_steps)
                                                   or not self.quantized):  # fmt: skip
            raise UserError(
                "qat_teacher=init_student quantizes a float consistency student with it as the teacher: pass "
                "init_student (a float consistency run) or float_steps, and quantization_scheme full or hybrid"
            )
        if self.calibration_source != "trajectories":
            raise UserError(
                f"calibration_source={self.calibration_source!r}: a consistency student calibrates on its own "
                "few-step sampling (trajectories)"
            )
        if self.calibration_draws != 1:
            raise UserError(f"calibration_draws={self.calibration_draws}: a consistency run calibrates once; set 1")
        if self.task_weight:
            raise UserError(f"task_weight={self.task_weight}: the consistency loss is the only loss; set 0")

    @property
    def quantized(self) -> bool:
        """Whether the student is quantized (QAT), i.e. not a float consistency student."""
        return self.quantization_scheme != NO_QUANTIZATION


# ---------------------------------------------------------------------------------------------
# Recipes


def _accepts(tp, value) -> bool:
    """Whether a JSON value fits a dataclass field annotation (as HfArgumentParser would parse it)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (typing.Any,)
        return isinstance(value, list) and all(_accepts(inner, v) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, str):  # str enums (IntervalStrategy, ...)
        return isinstance(value, str)
    return True  # types we do not know how to check are left to __post_init__


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"  # shipped recipes (package data)


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of every recipe shipped with the package (`reference-int8`, `sd15-pokemon-int8`, ...)."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.json"))}


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path, else a shipped recipe's name (with or without `.json` or a `recipes/`
    prefix, so the checkout's `recipes/NAME.json` also works from anywhere once installed)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = shipped_recipes()
    name = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    if name in shipped and (path.parent == Path(".") or path.parent.name == "recipes"):
        return shipped[name]
    raise UserError(
        f"recipe {str(name_or_path)!r} not found; pass a JSON file or a shipped recipe name ({', '.join(shipped)})"
    )


def load_recipe(path: str | Path, config_cls=QATConfig) -> dict:
    """Read a JSON recipe (a path or a shipped name) and check every key is a field of `config_cls` with a value of
    its type."""
    path = resolve_recipe(path)
    try:
        recipe = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"recipe {str(path)!r} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(recipe, dict):
        raise UserError(f"recipe {str(path)!r} must hold a JSON object of config fields")
    hints = typing.get_type_hints(config_cls)
    known = {f.name for f in fields(config_cls) if f.init}
    for key, value in recipe.items():
        if key not in known:
            close = [k for k in known if k.replace("_", "") == key.replace("_", "").lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"recipe {path.name}: unknown key {key!r}{hint}; keys are QATConfig field names")
        if not _accepts(hints[key], value):
            raise UserError(
                f"recipe {path.name}: key {key!r} has value {value!r} of type {type(value).__name__}, "
                f"expected {_type_name(hints[key])}"
            )
    return recipe


class _Parser(HfArgumentParser):
    def error(self, message):  # one-line errors instead of argparse's usage dump
        raise UserError(f"{message}; see `ov-sd train --help`")


def _pop_recipe(argv: list[str]) -> str | None:
    """Remove `--recipe X` / `--recipe=X` from argv and return X (the last one wins, as for any flag)."""
    found = None
    i = 0
    while i < len(argv):
        if argv[i] == "--recipe":
            if i + 1 >= len(argv):
                raise UserError("--recipe needs a shipped recipe name or a path to a JSON file")
            found = argv[i + 1]
            del argv[i : i + 2]
        elif argv[i].startswith("--recipe="):
            found = argv[i].split("=", 1)[1]
            del argv[i]
        else:
            i += 1
    return found


def make_parser(config_cls=QATConfig) -> HfArgumentParser:
    parser = _Parser(config_cls, prog="ov-sd train", description="QAT of a Stable Diffusion UNet (NNCF, distillation)")
    parser.allow_abbrev = False  # `--learning_rat` must be an error, not silently --learning_rate
    parser.add_argument(
        "--recipe",
        help=f"a shipped recipe ({', '.join(shipped_recipes())}) or a JSON file of config fields; flags override it",
    )
    return parser


def parse_config(argv: list[str] | None = None, config_cls=QATConfig) -> tuple:
    """Parse `[--recipe NAME_OR_FILE] [--field value ...]` into a config. Flags override the recipe.

    Returns (config, recipe_dict) where recipe_dict holds the recipe's own keys (or {})."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_path = _pop_recipe(argv)
    recipe = load_recipe(recipe_path, config_cls) if recipe_path else {}
    parser = make_parser(config_cls)
    parser.set_defaults(**recipe)
    try:
        cfg, *_, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as e:  # TrainingArguments' own checks (incompatible options, bad strategies, ...)
        raise UserError(" ".join(line.strip() for line in str(e).strip().splitlines())) from None
    if remaining:
        raise UserError(f"unrecognized arguments: {' '.join(remaining)}; see `ov-sd train --help`")
    return cfg, recipe
