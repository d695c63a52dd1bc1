"""`BenchSettings`: how `ov-sd bench` measures. Every default is defined here, once (the CLI reads them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ...compress.tome_config import MODES as TOME_MODES
from ...compress.tome_config import TomeConfig
from ...compress.tome_config import validate as validate_tome
from ...errors import UserError

# The random-weight architectures `--arch` builds (`assets.builders`), and what each changes in the defaults.
# Both are slow on 2 cores: fewer repeats than for a small model, and the 50-step image is composed from its measured
# parts only (a direct 50-step call per variant would take minutes each). sd15 (~3-13 s per UNet step) runs at the
# model's size, 512 px. sdxl runs at 512 px too, not at its native 1024: one UNet call of the real SDXL base
# architecture (2.57 B parameters, PyTorch FP32, UNet batch 2, 1 thread) took 48-52 s at 512 px on the 2-core
# machine (load average 2.3-4.8 from other jobs); 1024 px has 4x the tokens and 16x the attention scores, ~4.5x the
# time per call (~3.5 min at 1 thread), so with 13 variants of ~6 UNet calls each, the VAE decodes, and the export,
# PTQ calibration and QAT graphs before them, a 1024 px bench takes many hours; at 512 px about 1-1.5 h. SDXL has no
# attention at full resolution: its ToMe variant merges at downsampling 2, its highest attention level. Memory, at
# any size: the FP32 UNet is 10.3 GB (10.9 GiB peak RSS for that call); the optimum export and the QAT graphs
# hold two copies of it for a while (estimated > 20 GB): run it where ~32 GB are free.
ARCHS = ("sd15", "sdxl")
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd15": {"steps_pipeline": 2, "repeats": 3, "pipeline_repeats": 1, "measure_image": False, "few_step": True},
    "sdxl": {"steps_pipeline": 2, "repeats": 3, "pipeline_repeats": 1, "measure_image": False, "height": 512,
             "width": 512, "tome_max_downsample": 2},
}  # fmt: skip
ARCH_HELP = {
    "sd15": "SD 1.5 architecture with random weights (speed only), 512 px",
    "sdxl": "SDXL base architecture with random weights (speed only), 512 px by default, not its native 1024: a "
    "1024 px UNet step is ~4.5x slower (~2 min+ on 2 cores), hours for a full bench; --height/--width 1024 for it",
}


@dataclass
class BenchSettings:
    height: int | None = None  # default: the model's native size (--arch: ARCH_DEFAULTS, 512 for sd15 and sdxl)
    width: int | None = None
    batch_size: int = 2  # UNet batch: with classifier-free guidance, batch_size // 2 images per pipeline call
    steps_pipeline: int = 3  # K: denoising steps of each full-pipeline run
    repeats: int = 5  # N: timed calls of each part (UNet step, text encoder, VAE decode; medians reported)
    pipeline_repeats: int = 2  # timed full-pipeline runs (median reported)
    warmup: int = 1  # untimed calls first, for each timed part (first inference allocates and tunes)
    warmup_s: float = 0.5  # ... and untimed calls until this many seconds have passed (small models: ~10 slow calls)
    image_steps: int = 50  # the image whose latency is composed: text encoder + its UNet calls + VAE decode
    measure_image: bool = True  # also time one image_steps pipeline call directly (checks the composition)
    # the few-step int8 student's rows and the tiny VAE decoder (`fewstep`; needs the diffusers pipeline)
    few_step: bool = False
    threads: int | None = None  # torch threads and OpenVINO INFERENCE_NUM_THREADS; None: the libraries' choice
    static_shapes: bool = True
    ov_config: dict[str, str] = field(default_factory=dict)  # extra OpenVINO properties for every OV variant
    profile: bool = False
    seed: int = 0
    prompt: str = "a red circle on a blue background"
    guidance_scale: float = 7.5
    ptq_samples: int = 4  # UNet calls recorded for the PTQ peers when bench builds them (speed does not depend on it)
    ptq_steps: int = 4
    tome_ratio: float = 0.4  # qat-int8-tome under --arch: `tome.apply_tome` arguments (the published 0.4)
    tome_max_downsample: int = 1  # --arch sdxl: 2 (ARCH_DEFAULTS; SDXL has no attention at full resolution)
    tome_mode: str = "tome"
    tome_merge_mlp: bool = False

    def tome_kwargs(self) -> dict[str, Any]:
        return {
            "ratio": self.tome_ratio,
            "max_downsample": self.tome_max_downsample,
            "mode": self.tome_mode,
            "merge_mlp": self.tome_merge_mlp,
        }

    def check(self) -> None:
        """One-line errors naming the flag, before any slow work."""
        for name in ("batch_size", "steps_pipeline", "repeats", "pipeline_repeats", "image_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.warmup < 0:
            raise UserError(f"--warmup must be >= 0, got {self.warmup}")
        if self.warmup_s < 0:
            raise UserError(f"--warmup-s must be >= 0, got {self.warmup_s}")
        if self.batch_size % 2:
            raise UserError(f"--batch-size {self.batch_size}: must be even (the UNet batch with CFG is 2 x images)")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise UserError(f"--{name} {value}: must be a positive multiple of 8")
        if self.tome_ratio <= 0:
            raise UserError(f"--tome-ratio {self.tome_ratio}: must be > 0 (qat-int8-tome merges tokens)")
        if self.tome_mode not in TOME_MODES:
            raise UserError(f"--tome-mode {self.tome_mode!r}: use one of {', '.join(TOME_MODES)}")
        # the other bounds, checked where token merging defines them, with errors that name the flags
        values = dataclasses.asdict(TomeConfig()) | self.tome_kwargs()
        validate_tome(values, key=lambda name: "--tome-" + name.replace("_", "-"))


def image_size(settings: BenchSettings, arch: str | None, native: int) -> tuple[int, int]:
    """(height, width) a run measures at: the flags, else the arch's default (`ARCH_DEFAULTS`), else the model's
    native size `native`."""
    defaults = ARCH_DEFAULTS.get(arch or "", {})
    return (settings.height or defaults.get("height") or native, settings.width or defaults.get("width") or native)


def parse_ov_config(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"--ov-config {item!r}: expected KEY=VALUE, e.g. PERFORMANCE_HINT=LATENCY")
        out[key.strip()] = value.strip()
    return out
