"""`ov-sd train-decoder`: distil a tiny conv-only VAE decoder (TAESD's architecture) from a pipeline's VAE decoder.

    ov-sd train-decoder --recipe reference-tiny-decoder --output_dir outputs/ref-tiny-decoder

The student is diffusers' `DecoderTiny` (the decoder of `AutoencoderTiny`, TAESD's architecture: Conv, ReLU, nearest
Upsample, a tanh clamp of its input; no attention, no GroupNorm, so it quantizes well), sized for the pipeline: the
VAE's latent channels in, one 2x upsampling stage per VAE factor doubling (3 for SD's factor 8: TAESD's layout,
1.22 M parameters at the default width 64). Like TAESD it takes the *scaled* latents, the UNet's own space
(`vae latents x scaling_factor`); the export puts the `/ scaling_factor` of the pipelines back in front of it.
By default (`decoder_global_context`) a `tiny_decoder.GlobalContext` block follows each residual block: each image's
channel means through two 1x1 convolutions, added back (whole-image statistics without attention or GroupNorm;
measured better on sampled latents, docs/tiny-decoder.md); `--decoder_global_context false` is TAESD's architecture.

The teacher is the pipeline's frozen VAE decoder. Inputs: latents of the dataset's images, drawn from the frozen VAE
encoder's posterior (a fresh draw each step, seeded by the step, so a resumed run draws the same), and with
`sampling_endpoints N` also the final latents of N teacher pipeline samplings of the dataset's captions (what the
decoder meets at inference), or with `endpoint_model` those of an exported pipeline of the model (a few-step
student's: the latents the decoder will serve). Loss (`DecoderDistillation.forward`): pixel MSE against the teacher's image, plus
`perceptual_weight` x a feature distance in the frozen VAE encoder's features (its down blocks' activations,
channel-normalised as LPIPS does: offline, any model has them), plus `adversarial_weight` x a non-saturating GAN
term from a small patch discriminator trained in the same backward pass (its own loss on detached images; the
student's term sees it through detached weights). Which of these the recipes use was measured: docs/tiny-decoder.md.

It is a `transformers.Trainer` (`DecoderTrainer`): Trainer's optimizer, schedule, checkpoints and exact resume; an
EMA of the student (`ema.EMACallback`); held-out evaluation: PSNR of the student's images against the teacher's and a
sharpness ratio (Laplacian energy, student / teacher; 1 = as sharp) on latents of held-out images (`eval_psnr`), and
with `held_out_endpoints N` on N sampling endpoints of held-out captions at other seeds
(`eval_endpoint_psnr`). Sampled latents are larger than image latents, and image-latent PSNR overstates what a
decoder does on generated images (docs/tiny-decoder.md), so the endpoint figure is the one to watch. The output folder:

    output_dir/checkpoint-N/      Trainer checkpoints: student + discriminator weights, EMA, optimizer state
    output_dir/final/             written atomically: tiny_decoder/ (config.json + model.safetensors, EMA applied),
                                  held_out_latents.safetensors (image latents and held-out endpoints: calibration and
                                  checks at export), training_info.json
    output_dir/loss.png           the losses and the held-out PSNR against the step

`export.tiny_decoder` puts `final/` into an OpenVINO pipeline folder as its `vae_decoder`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from ..assets import REFERENCE, resolve_model_path
from ..errors import UserError
from ..outputs import atomic_output_dir
from ..run_folder import COMPLETE_MARKER, EMA_FILE, FINAL_DIR, LOSS_PLOT, find_resumable_checkpoint, mark_complete
from ..tiny_decoder import (
    DECODER_DIR,
    DEFAULT_BLOCKS,
    DEFAULT_GLOBAL_CONTEXT,
    DEFAULT_WIDTH,
    HELD_OUT_FILE,
    WEIGHTS_FILE,
    TinyDecoder,
    decoder_config,
    same_latent_space,
)
from .ema import EMACallback
from .report import plot_losses

logger = logging.getLogger(__name__)

DISCRIMINATOR_FILE = "discriminator.safetensors"  # in checkpoint-N/
TRAINING_INFO_FILE = "training_info.json"
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes" / "decoder"
NOISE_STRIDE = 1_000_003  # per-step seeds of the posterior draws: seed x this + micro-batch index
ENDPOINT_BATCH = 8  # prompts per teacher sampling call
HELD_OUT_SEED_OFFSET = 1_000_000  # held-out endpoints' seeds: seed + this + batch start


# --------------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (3 convs, 70k parameters at width 64): one logit per ~16 px patch."""

    def __init__(self, channels: int = 3, width: int = DEFAULT_WIDTH):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width * 2, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width * 2, 1, 3, 1, 1),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)


def encoder_features(encoder, images: torch.Tensor) -> list[torch.Tensor]:
    """Activations of a diffusers VAE `Encoder`'s input conv and down blocks (before its attention mid block)."""
    h = encoder.conv_in(images)
    out = [h]
    for block in encoder.down_blocks:
        h = block(h)
        out.append(h)
    return out


def feature_distance(encoder, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """LPIPS' recipe in the frozen VAE encoder's features: unit-normalise each position's channel vector, then the
    mean squared difference per layer, summed over layers."""
    total = student.new_zeros(())
    with torch.no_grad():
        target = encoder_features(encoder, teacher)
    for a, b in zip(encoder_features(encoder, student), target, strict=True):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-8)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-8)
        total = total + (a - b).pow(2).sum(1).mean()
    return total


def laplacian_energy(images: torch.Tensor) -> torch.Tensor:
    """Per image: mean squared response of a 3x3 Laplacian (high-frequency energy)."""
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=images.device, dtype=images.dtype)
    c = images.shape[1]
    resp = nn.functional.conv2d(images, k.expand(c, 1, 3, 3), groups=c)
    return resp.pow(2).flatten(1).mean(1)


class DecoderDistillation(nn.Module):
    """The training objective: frozen VAE (teacher decoder, encoder for inputs and features), student, discriminator.

    `forward(mean, std)` draws latents from the posterior (std 0: a fixed latent, e.g. a sampling endpoint), decodes
    them with both decoders and returns the loss dict."""

    def __init__(self, vae, student: TinyDecoder, pixel_weight: float = 1.0, perceptual_weight: float = 0.0,
                 adversarial_weight: float = 0.0):  # fmt: skip
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.student = student
        self.pixel_weight, self.perceptual_weight, self.adversarial_weight = (
            pixel_weight, perceptual_weight, adversarial_weight,
        )  # fmt: skip
        self.discriminator = PatchDiscriminator(student.config["out_channels"]) if adversarial_weight else None
        self.scaling_factor = student.config["scaling_factor"]
        self.shift_factor = student.config["shift_factor"]
        self.noise_seed = 0

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen, always
        return self

    def teacher_decode(self, scaled: torch.Tensor) -> torch.Tensor:
        """What the pipelines do: `latents / scaling_factor + shift_factor`, then the VAE decoder."""
        return self.vae.decode(scaled / self.scaling_factor + self.shift_factor, return_dict=False)[0]

    def forward(self, mean: torch.Tensor, std: torch.Tensor) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.noise_seed)
        noise = torch.randn(mean.shape, generator=g).to(mean.device)
        latents = mean + std * noise  # scaled space (the UNet's)
        with torch.no_grad():
            target = self.teacher_decode(latents).clamp(-1, 1)
        image = self.student(latents)
        pixel = nn.functional.mse_loss(image, target)
        out = {"pixel_loss": pixel}
        loss = self.pixel_weight * pixel
        if self.perceptual_weight:
            out["perceptual_loss"] = feature_distance(self.vae.encoder, image, target)
            loss = loss + self.perceptual_weight * out["perceptual_loss"]
        if self.discriminator is not None:
            # The student's term through detached discriminator weights; the discriminator's own term on detached
            # images: one backward trains both, each on its own objective.
            frozen = {n: p.detach() for n, p in self.discriminator.named_parameters()}
            fake_logits = torch.func.functional_call(self.discriminator, frozen, (image,))
            out["adversarial_loss"] = nn.functional.softplus(-fake_logits).mean()
            d_real = self.discriminator(target)
            d_fake = self.discriminator(image.detach())
            out["discriminator_loss"] = (nn.functional.softplus(-d_real) + nn.functional.softplus(d_fake)).mean()
            loss = loss + self.adversarial_weight * out["adversarial_loss"] + out["discriminator_loss"]
        out["loss"] = loss
        return out


# --------------------------------------------------------------------------------------------------------------------
# Data: posterior moments of the dataset's images, teacher sampling endpoints, held-out latents
# --------------------------------------------------------------------------------------------------------------------


class LatentSet(torch.utils.data.Dataset):
    """Rows {mean, std} of scaled latents (std 0 for fixed latents)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean, std

    def __len__(self):
        return len(self.mean)

    def __getitem__(self, i):
        return {"mean": self.mean[i], "std": self.std[i]}


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@torch.no_grad()
def encode_images(vae, images, resolution: int, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre-cropped images -> (mean, std) of the VAE posterior, in scaled latent space."""
    from torchvision.transforms import functional as TF

    sf, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0
    means, stds = [], []
    images = list(images)
    for i in range(0, len(images), batch):
        px = torch.stack(
            [TF.to_tensor(TF.center_crop(TF.resize(im.convert("RGB"), resolution), resolution)) * 2 - 1
             for im in images[i : i + batch]]
        )  # fmt: skip
        dist = vae.encode(px.to(vae.device, vae.dtype)).latent_dist
        means.append(((dist.mean - shift) * sf).float().cpu())
        stds.append((dist.std * sf).float().cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def sampling_endpoints(pipe, captions: list[str], steps: int, guidance_scale: float, resolution: int, seed: int,
                       batch: int = ENDPOINT_BATCH, desc: str = "sampling endpoints") -> torch.Tensor:  # fmt: skip
    """Final latents (scaled, before the VAE) of the teacher pipeline sampling `captions`, seeded per batch; one
    progress bar over the samples (the pipeline's own per-call bars are silenced)."""
    from tqdm.auto import tqdm

    from .unet_inputs import quiet_progress

    out = []
    restore = quiet_progress(pipe)
    try:
        with tqdm(total=len(captions), desc=desc, leave=False) as bar:
            for i in range(0, len(captions), batch):
                g = torch.Generator().manual_seed(seed + i)
                latents = pipe(captions[i : i + batch], num_inference_steps=steps, guidance_scale=guidance_scale,
                               height=resolution, width=resolution, generator=g, output_type="latent").images  # fmt: skip
                out.append(torch.as_tensor(latents).float().cpu())  # OpenVINO pipelines give numpy
                bar.update(len(latents))
    finally:
        restore()
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DecoderConfig(TrainingArguments):
    pretrained_model_name_or_path: str = field(
        default=REFERENCE, metadata={"help": "diffusers SD pipeline (folder, Hub id, or 'reference'): its VAE teaches"}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the pipeline"})
    dataset_name: str = field(
        default="synthetic", metadata={"help": "'synthetic', 'synthetic:N', a local imagefolder, or a Hub dataset id"}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config name"})
    image_column: str = field(default="image", metadata={"help": "dataset column holding the images"})
    caption_column: str = field(default="text", metadata={"help": "dataset column holding the captions"})
    max_train_samples: int | None = field(default=None, metadata={"help": "truncate the dataset to N rows"})
    synthetic_size: int = field(default=1000, metadata={"help": "rows of the synthetic dataset"})
    resolution: int | None = field(default=None, metadata={"help": "image side in pixels; default: the pipeline's"})
    held_out_samples: int = field(
        default=32,
        metadata={"help": "held-out images for the PSNR / sharpness evaluation (fresh synthetic ones, else the "
                  "dataset's last N rows, which training then leaves out)"},
    )  # fmt: skip
    sampling_endpoints: int = field(
        default=0,
        metadata={"help": "add the final latents of N samplings of the dataset's captions to the inputs (the "
                  "teacher's, or endpoint_model's)"},
    )  # fmt: skip
    held_out_endpoints: int = field(
        default=16,
        metadata={"help": "also evaluate on the final latents of N samplings of held-out captions at other seeds "
                  "(the teacher's, or endpoint_model's: what the decoder meets at inference; 0 = image latents only)"},
    )  # fmt: skip
    endpoint_model: str | None = field(
        default=None,
        metadata={"help": "an exported OpenVINO pipeline folder of this model (e.g. a few-step student's) whose "
                  "sampling endpoints replace the teacher's, at its trained steps and guidance: the decoder learns "
                  "the latents of the pipeline it will serve"},
    )  # fmt: skip
    endpoint_steps: int = field(default=20, metadata={"help": "sampling steps of each teacher endpoint"})
    endpoint_guidance_scale: float = field(default=7.5, metadata={"help": "guidance scale of the teacher endpoints"})
    decoder_width: int = field(default=DEFAULT_WIDTH, metadata={"help": "channels of the tiny decoder (TAESD: 64)"})
    decoder_blocks: int = field(
        default=DEFAULT_BLOCKS, metadata={"help": "residual conv blocks per upsampling stage (TAESD: 3)"}
    )
    decoder_global_context: bool = field(
        default=DEFAULT_GLOBAL_CONTEXT,
        metadata={"help": "a global-context block (per-image channel means -> 1x1 convs, added back) after each "
                  "residual block: whole-image statistics without attention or GroupNorm (false: TAESD's "
                  "architecture)"},
    )  # fmt: skip
    pixel_weight: float = field(default=1.0, metadata={"help": "weight of the pixel MSE to the teacher's image"})
    perceptual_weight: float = field(
        default=0.0, metadata={"help": "weight of the feature distance in the frozen VAE encoder's features"}
    )
    adversarial_weight: float = field(
        default=0.0, metadata={"help": "weight of the patch discriminator's term on the student (0 = no GAN)"}
    )
    use_ema: bool = field(default=True, metadata={"help": "keep an EMA of the student (exported)"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay ceiling"})
    overwrite: bool = field(default=False, metadata={"help": "allow a non-empty output_dir (resume is always allowed)"})
    # Trainer defaults TAESD's author gives (Adam, lr 3e-4, batch 16)
    learning_rate: float = field(default=3e-4, metadata={"help": "Adam learning rate (TAESD: 3e-4)"})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "batch size per device (TAESD: 16)"})

    def __post_init__(self):
        self.remove_unused_columns = False
        super().__post_init__()
        checks = [
            (self.held_out_samples >= 1, f"held_out_samples={self.held_out_samples}: must be >= 1"),
            (self.sampling_endpoints >= 0, f"sampling_endpoints={self.sampling_endpoints}: must be >= 0"),
            (self.held_out_endpoints >= 0, f"held_out_endpoints={self.held_out_endpoints}: must be >= 0"),
            (self.endpoint_steps >= 1, f"endpoint_steps={self.endpoint_steps}: must be >= 1"),
            (self.decoder_width >= 1, f"decoder_width={self.decoder_width}: must be >= 1"),
            (self.decoder_blocks >= 0, f"decoder_blocks={self.decoder_blocks}: must be >= 0"),
            (min(self.pixel_weight, self.perceptual_weight, self.adversarial_weight) >= 0,
             "pixel_weight, perceptual_weight and adversarial_weight must be >= 0"),
            (self.pixel_weight + self.perceptual_weight > 0,
             "pixel_weight and perceptual_weight are both 0: nothing ties the student to the teacher; set one > 0"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay={self.ema_decay}: must be in [0, 1)"),
            (self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
             f"resolution={self.resolution}: must be a multiple of 8"),
            (self.max_train_samples is None or self.max_train_samples >= 1,
             f"max_train_samples={self.max_train_samples}: must be >= 1 or unset"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.json"))}


def parse_decoder_config(argv: list[str]) -> tuple[DecoderConfig, dict]:
    """`[--recipe NAME_OR_FILE] [--field value ...]` -> (DecoderConfig, the recipe's keys), with `config.parse_config`
    (flags override the recipe; unknown keys and wrong types are one-line errors). A shipped decoder recipe's name is
    resolved here: `config` only knows the UNet recipes."""
    from .config import parse_config

    argv = list(argv)
    for i, a in enumerate(argv):
        value = argv[i + 1] if a == "--recipe" and i + 1 < len(argv) else a.split("=", 1)[1] if a.startswith(
            "--recipe=") else None  # fmt: skip
        name = value[: -len(".json")] if value and value.endswith(".json") else value
        if value and not Path(value).expanduser().is_file() and Path(name).name in shipped_recipes():
            path = str(shipped_recipes()[Path(name).name])
            argv[i : i + (2 if a == "--recipe" else 1)] = ["--recipe", path]
            break
    return parse_config(argv, DecoderConfig)


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------


class DecoderTrainer(Trainer):
    """Trainer for `DecoderDistillation`: per-step posterior seeds, separate loss logging, held-out PSNR /
    sharpness evaluation (with the EMA) on `eval_dataset` (a `LatentSet` of held-out latents), checkpoints of the student and discriminator only (the VAE is frozen)."""

    LOSSES = ("pixel_loss", "perceptual_loss", "adversarial_loss", "discriminator_loss")

    def __init__(self, *args, ema: EMACallback | None = None, held_out: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema = ema
        self.held_out = held_out or {}  # metric prefix -> fixed latents, evaluated beside eval_dataset's ("")
        if ema is not None:
            self.add_callback(ema)
        self._metrics: dict[str, list[float]] = {}
        self._micro = (-1, 0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step, micro = self._micro
        micro = micro + 1 if step == self.state.global_step else 0
        self._micro = (self.state.global_step, micro)
        index = self.state.global_step * self.args.gradient_accumulation_steps + micro
        self.accelerator.unwrap_model(model).noise_seed = self.args.seed * NOISE_STRIDE + index
        out = model(**inputs)
        for key in self.LOSSES:
            if key in out:
                self._metrics.setdefault(key, []).append(out[key].item())
        return (out["loss"], out) if return_outputs else out["loss"]

    def log(self, logs, start_time=None):
        if self._metrics and "loss" in logs:
            logs.update({k: round(sum(v) / len(v), 6) for k, v in self._metrics.items()})
            self._metrics.clear()
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        objective = self.accelerator.unwrap_model(self.model)
        with self.ema.applied(objective.student) if self.ema is not None else _nullcontext():
            sets = {**self.held_out, "": (eval_dataset or self.eval_dataset).mean}
            metrics = held_out_report(objective, sets)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            mark_complete(folder, self.state.global_step)

    def _save(self, output_dir=None, state_dict=None):
        from safetensors.torch import save_file

        output_dir = Path(output_dir or self.args.output_dir)
        objective = self.accelerator.unwrap_model(self.model)
        objective.student.save(output_dir / DECODER_DIR)
        if objective.discriminator is not None:
            state = objective.discriminator.state_dict()
            save_file({k: v.contiguous() for k, v in state.items()}, str(output_dir / DISCRIMINATOR_FILE))
        if self.ema is not None:
            self.ema.save(output_dir)
        (output_dir / "training_args.json").write_text(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from safetensors.torch import load_file

        src = Path(resume_from_checkpoint)
        objective = self.accelerator.unwrap_model(model or self.model)
        objective.student.load_state_dict(load_file(str(src / DECODER_DIR / WEIGHTS_FILE)))
        if objective.discriminator is not None:
            objective.discriminator.load_state_dict(load_file(str(src / DISCRIMINATOR_FILE)))
        if self.ema is not None and (src / EMA_FILE).is_file():
            self.ema.load(src)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def held_out_metrics(objective: DecoderDistillation, latents: torch.Tensor, batch: int = 16) -> dict[str, float]:
    """PSNR (pooled MSE, images in [0, 1]) of the student's images against the teacher's, and the sharpness ratio
    (Laplacian energy of the student's images / the teacher's)."""
    was = objective.student.training
    objective.student.eval()
    device = next(objective.student.parameters()).device
    se = n = e_student = e_teacher = 0.0
    try:
        for i in range(0, len(latents), batch):
            z = latents[i : i + batch].to(device)
            t = (objective.teacher_decode(z).clamp(-1, 1) + 1) / 2
            s = (objective.student(z).clamp(-1, 1) + 1) / 2
            se += (s - t).pow(2).sum().item()
            n += t.numel()
            e_student += laplacian_energy(s).sum().item()
            e_teacher += laplacian_energy(t).sum().item()
    finally:
        objective.student.train(was)
    return {"psnr": -10 * math.log10(max(se / n, 1e-12)), "sharpness": e_student / max(e_teacher, 1e-12)}


def held_out_report(objective: DecoderDistillation, sets: dict[str, torch.Tensor | None]) -> dict[str, float]:
    """`held_out_metrics` of each held-out set, keys prefixed by the set's name (image latents: "", teacher sampling
    endpoints: "endpoint_"); a None set is left out."""
    return {f"{prefix}{k}": v for prefix, latents in sets.items() if latents is not None
            for k, v in held_out_metrics(objective, latents).items()}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------


def build(cfg: DecoderConfig):
    """(objective, train set, held-out latents, pipeline) for a config."""
    from ..pipeline_folder import load_pipeline
    from .data import check_captions, drop_unreadable_images, load_captioned_dataset
    from .teacher_gap import heldout_rows

    path = resolve_model_path(cfg.pretrained_model_name_or_path)
    pipe = load_pipeline(path, revision=cfg.revision)
    vae = pipe.vae.to(cfg.device)
    if type(vae).__name__ != "AutoencoderKL":
        raise UserError(f"{path!r} has a {type(vae).__name__}; train-decoder distils an AutoencoderKL's decoder")
    factor = pipe.vae_scale_factor
    resolution = cfg.resolution or int(pipe.unet.config.sample_size) * factor
    if resolution % factor:
        raise UserError(f"resolution={resolution} is not divisible by the VAE factor {factor} of {path}")
    sampling = cfg.sampling_endpoints or cfg.held_out_endpoints
    if sampling:  # before the slow part: a wrong endpoint_model is a one-line error now
        sampler, steps, guidance, batch = endpoint_sampler(cfg, pipe, resolution)
        if sampler is pipe:  # the teacher samples on the training device too
            pipe.to(cfg.device)
    ds = load_captioned_dataset(cfg.dataset_name, image_column=cfg.image_column, caption_column=cfg.caption_column,
                                max_samples=cfg.max_train_samples, synthetic_size=cfg.synthetic_size,
                                synthetic_resolution=resolution, seed=cfg.seed,
                                config_name=cfg.dataset_config_name)  # fmt: skip
    ds, skipped = drop_unreadable_images(ds, cfg.image_column)
    held = heldout_rows(cfg.held_out_samples, cfg.seed, resolution, cfg.dataset_name, cfg.caption_column,
                        cfg.image_column)  # fmt: skip
    if not cfg.dataset_name.startswith("synthetic"):  # held out = the last rows: leave them out of training
        if len(ds) <= cfg.held_out_samples:
            raise UserError(f"the dataset has {len(ds)} rows, not more than held_out_samples={cfg.held_out_samples}")
        ds = ds.select(range(len(ds) - cfg.held_out_samples))
    t0 = time.perf_counter()
    mean, std = encode_images(vae, ds[cfg.image_column], resolution)
    held_out, _ = encode_images(vae, held[cfg.image_column], resolution)  # posterior means: fixed
    held_out_ends = None
    if sampling:
        check_captions(ds, cfg.caption_column)

        def endpoints(captions, n, seed, desc="sampling endpoints"):
            captions = [captions[i % len(captions)] for i in range(n)]
            return sampling_endpoints(sampler, captions, steps, guidance, resolution, seed, batch, desc)

        if cfg.sampling_endpoints:
            ends = endpoints(list(ds[cfg.caption_column]), cfg.sampling_endpoints, cfg.seed)
            mean, std = torch.cat([mean, ends]), torch.cat([std, torch.zeros_like(ends)])
        if cfg.held_out_endpoints:  # held-out captions, seeds past every training batch's
            held_out_ends = endpoints(list(held[cfg.caption_column]), cfg.held_out_endpoints,
                                      cfg.seed + HELD_OUT_SEED_OFFSET, "held-out endpoints")  # fmt: skip
        pipe.unet.to("cpu")  # only the VAE is needed from here on
        pipe.text_encoder.to("cpu")
    logger.info("encoded %d training latents in %.1f s", len(mean), time.perf_counter() - t0)
    config = decoder_config(vae.config, cfg.decoder_width, cfg.decoder_blocks, cfg.decoder_global_context)
    student = TinyDecoder(config).to(cfg.device)
    objective = DecoderDistillation(vae, student, cfg.pixel_weight, cfg.perceptual_weight, cfg.adversarial_weight)
    info = {"resolution": resolution, "train_latents": len(mean), "dataset_images": len(ds), "skipped": skipped,
            "sampling_endpoints": cfg.sampling_endpoints, "endpoint_model": cfg.endpoint_model,
            "held_out": len(held_out),
            "held_out_endpoints": 0 if held_out_ends is None else len(held_out_ends),
            "student_parameters": sum(p.numel() for p in student.parameters())}  # fmt: skip
    return objective, LatentSet(mean, std), {"": held_out, "endpoint_": held_out_ends}, info


def endpoint_sampler(cfg: DecoderConfig, pipe, resolution: int):
    """(pipeline, steps, guidance scale, batch) that draws the sampling endpoints: the teacher pipeline at
    `endpoint_steps` / `endpoint_guidance_scale`, or `endpoint_model`'s OpenVINO pipeline at the steps and guidance
    it was trained for (`pipeline_folder.trained_sampling`; a folder without a record: the endpoint_* ones), one
    prompt per call (its shapes are static)."""
    if not cfg.endpoint_model:
        return pipe, cfg.endpoint_steps, cfg.endpoint_guidance_scale, ENDPOINT_BATCH
    from ..pipeline_folder import check_openvino_folder, load_ov_pipeline, trained_sampling

    folder = check_openvino_folder(cfg.endpoint_model, "--endpoint_model")
    theirs = json.loads((folder / "vae_decoder" / "config.json").read_text())
    if not same_latent_space(decoder_config(theirs), decoder_config(pipe.vae.config)):
        raise UserError(
            f"--endpoint_model {cfg.endpoint_model!r} has another VAE than {cfg.pretrained_model_name_or_path!r} "
            "(latent channels, factor, scaling or shift differ); pass a folder exported from this model"
        )
    sampling = trained_sampling(folder) or {}
    steps = int(sampling.get("steps", cfg.endpoint_steps))
    guidance = float(sampling.get("guidance_scale", cfg.endpoint_guidance_scale))
    sampler = load_ov_pipeline(folder, resolution, resolution, batch_size=1, guidance_scale=guidance)
    logger.info("sampling endpoints from %s: %d steps, guidance %.1f", folder, steps, guidance)
    return sampler, steps, guidance, 1


def _check_output(cfg: DecoderConfig) -> None:
    out = Path(cfg.output_dir)
    if cfg.resume_from_checkpoint is None and out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(
            f"output_dir {str(out)!r} exists and is not empty; pass --overwrite true to reuse it "
            "or --resume_from_checkpoint latest to continue"
        )
    if cfg.resume_from_checkpoint == "latest":
        last = find_resumable_checkpoint(out) if out.is_dir() else None
        if last is None:
            raise UserError(f"--resume_from_checkpoint latest: no complete checkpoint-N folder in {str(out)!r}")
        cfg.resume_from_checkpoint = str(last)
    elif cfg.resume_from_checkpoint is not None and not (Path(cfg.resume_from_checkpoint) / COMPLETE_MARKER).is_file():
        raise UserError(f"resume_from_checkpoint {cfg.resume_from_checkpoint!r} is not a complete checkpoint-N folder")


def run(cfg: DecoderConfig, recipe: dict | None = None) -> Path:
    """Train; write output_dir/final (atomically) and the loss plot. Returns output_dir."""
    _check_output(cfg)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    objective, train_set, held_out_sets, info = build(cfg)
    held_out = held_out_sets[""]
    untrained = held_out_report(objective, held_out_sets)
    ema = EMACallback(objective.student, cfg.ema_decay) if cfg.use_ema else None
    trainer = DecoderTrainer(model=objective, args=cfg, train_dataset=train_set, data_collator=collate, ema=ema,
                             eval_dataset=LatentSet(held_out, torch.zeros_like(held_out)),
                             held_out={k: v for k, v in held_out_sets.items() if k})  # fmt: skip
    result = trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    if ema is not None:
        ema.copy_to(objective.student)
    trained = held_out_report(objective, held_out_sets)
    out = Path(cfg.output_dir)
    info.update(
        base_model=cfg.pretrained_model_name_or_path, recipe=recipe or {}, global_step=trainer.state.global_step,
        train_runtime_s=result.metrics.get("train_runtime"), total_runtime_s=round(time.perf_counter() - t0, 1),
        held_out_untrained=untrained, held_out_trained=trained, log_history=trainer.state.log_history,
        config=json.loads(cfg.to_json_string()),
    )  # fmt: skip
    if trainer.is_world_process_zero():
        from safetensors.torch import save_file

        with atomic_output_dir(out / FINAL_DIR, overwrite=True) as tmp:
            objective.student.cpu().save(tmp / DECODER_DIR)
            held_out_file = {"latents": held_out.contiguous()}
            if held_out_sets["endpoint_"] is not None:
                held_out_file["endpoints"] = held_out_sets["endpoint_"].contiguous()
            save_file(held_out_file, str(tmp / HELD_OUT_FILE))
            (tmp / TRAINING_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        plot_losses(trainer.state.log_history, out / LOSS_PLOT, [(k, k) for k in ("loss", *DecoderTrainer.LOSSES)])
    for prefix, what in (("", "image latents"), ("endpoint_", "sampling endpoints")):
        if f"{prefix}psnr" in trained:
            logger.info("held-out %s, PSNR vs the VAE decoder: %.2f dB untrained, %.2f dB trained", what,
                        untrained[f"{prefix}psnr"], trained[f"{prefix}psnr"])  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------

PASSES_UNKNOWN_ARGS = True  # every DecoderConfig field is a flag (HfArgumentParser, as `ov-sd train`)


def add_arguments(parser) -> None:
    """Nothing to add: `--recipe` and every DecoderConfig field are parsed by `parse_decoder_config`."""


def main(args, extra: list[str]) -> int:
    cfg, recipe = parse_decoder_config(extra)
    out = run(cfg, recipe)
    print(f"tiny decoder trained: {out / FINAL_DIR / DECODER_DIR}")
    return 0
