"""What `ov-sd eval` adds for few-step students and tiny VAE decoders (used by `fidelity.evaluate_fidelity`).

Few-step variants (an LCM folder, or any `--model` given its own `--steps NAME=N`) run with their own steps,
guidance and scheduler (an LCM folder keeps its `LCMScheduler`; its trained steps and guidance come from
`pipeline_folder.trained_sampling`; any other folder samples with the teacher's scheduler, or with
`--scheduler NAME=KIND`, one of `SCHEDULERS`: the naive few-step baseline is the teacher's own export at 2-8 steps
with DDIM, Euler or DPM-Solver++, the last the best at 2 and 4 steps on the bundled model). What a consistency model
approximates is the teacher's ODE endpoint from the same initial latent at the same guidance, so they are scored
against the teacher sampled with deterministic DDIM without clipping (`ode_scheduler`) at `ODE_STEPS` steps, and
by a Fréchet distance between their image set and the teacher's in the judge's penultimate features
(`JudgeFeatures`, torchmetrics' `FrechetInceptionDistance` with a custom feature extractor), beside the
teacher-vs-teacher distance at other seeds (the noise floor: what two image sets of the same model differ by).

A variant folder holding a tiny decoder (`ov-sd tiny-decoder`) gets its final latents decoded by both decoder IRs
(`decode_both`): PSNR/SSIM of the tiny decode against the full one from the same latents, the judge's accuracy of each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..export.tiny_decoder import DECODER_XML, active_decoder, decoder_dir
from ..lcm import ode_scheduler
from ..pipeline_folder import trained_sampling

# --scheduler NAME=KIND: the few-step samplers a plain (non-LCM) variant can use, on the teacher's noise schedule
SCHEDULERS = ("ddim", "euler", "dpm")
ODE_STEPS = (25, 50)  # the teacher's DDIM steps for the ODE endpoints (the 25 and 50)
FLOOR_SEED_OFFSET = 1000  # the noise floor's teacher images: seeds shifted by this (other initial latents)


def parse_per_variant(specs: list[str], flag: str, cast, names: list[str]) -> tuple[object | None, dict]:
    """`--steps 25 --steps lcm=4`: (the plain value or None, {name: value}); a NAME must be a --model name."""
    plain, per = None, {}
    for spec in specs:
        name, sep, value = spec.rpartition("=")
        try:
            parsed = cast(value)
        except ValueError:
            raise UserError(f"{flag} {spec!r}: give a number or NAME=number") from None
        if not sep:
            plain = parsed
        elif name in names:
            per[name] = parsed
        else:
            raise UserError(f"{flag} {spec!r}: {name!r} is not a --model name (names: {', '.join(names)})")
    return plain, per


def parse_schedulers(specs: list[str], names: list[str]) -> dict[str, str]:
    """`--scheduler naive=euler`: {name: kind}; a NAME must be a --model name and KIND one of `SCHEDULERS`."""
    out = {}
    for spec in specs:
        name, sep, kind = spec.rpartition("=")
        if not sep or kind not in SCHEDULERS:
            raise UserError(f"--scheduler {spec!r}: give NAME=KIND with KIND one of {', '.join(SCHEDULERS)}")
        if name not in names:
            raise UserError(f"--scheduler {spec!r}: {name!r} is not a --model name (names: {', '.join(names)})")
        out[name] = kind
    return out


def few_step_scheduler(kind: str, teacher_config):
    """A diffusers scheduler of `kind` (`SCHEDULERS`) on the teacher's noise schedule: `ddim` is the teacher's ODE
    solver (DDIM without clipping), `euler` `EulerDiscreteScheduler`, `dpm` `DPMSolverMultistepScheduler` (DPM-Solver++
    2M), each with its defaults otherwise (leading spacing for DDIM, as the teacher's config says)."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if kind == "ddim":
        return ode_scheduler(teacher_config)
    return {"euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}[kind].from_config(teacher_config)


def variant_sampling(name: str, path: Path, steps: dict, guidance: dict, default_steps: int,
                     default_guidance: float, schedulers: dict | None = None) -> dict | None:  # fmt: skip
    """A few-step variant's steps, guidance and scheduler: `own_scheduler` (an LCM folder keeps its LCMScheduler)
    or `scheduler` (a `SCHEDULERS` kind, None for the teacher's); None for an ordinary variant (the teacher's
    scheduler, steps and guidance)."""
    schedulers = schedulers or {}
    trained = trained_sampling(path)
    if trained is not None and name in schedulers:
        raise UserError(
            f"--scheduler {name}={schedulers[name]}: {path} is a few-step (latent consistency) folder, which samples "
            "with its own LCMScheduler; give --scheduler to a plain folder (e.g. the teacher's export)"
        )
    if trained is None and name not in steps and name not in guidance and name not in schedulers:
        return None
    trained = trained or {}
    return {
        "steps": steps.get(name, trained.get("steps", default_steps)),
        "guidance_scale": guidance.get(name, trained.get("guidance_scale", default_guidance)),
        "own_scheduler": bool(trained),  # an LCM folder samples with its LCMScheduler, as optimum and GenAI do
        "scheduler": schedulers.get(name),
    }


class JudgeFeatures(torch.nn.Module):
    """The judge's penultimate features (pooled mean and max of its last conv block, what its heads read) of images
    in [0, 1] at the judge's resolution: the feature extractor of `frechet_distance`."""

    def __init__(self, judge):
        super().__init__()
        self.net = judge.net
        self.num_features = self.net.heads[next(iter(self.net.heads))].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net.features(x.float())
        return torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1).double()


@torch.no_grad()
def frechet_distance(judge, images_a, images_b) -> float:
    """Fréchet distance between two PIL image sets in the judge's features (torchmetrics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from .judge import images_to_tensor

    fid = FrechetInceptionDistance(feature=JudgeFeatures(judge).eval(), normalize=True)
    fid.update(images_to_tensor(images_a, judge.net.resolution), real=True)
    fid.update(images_to_tensor(images_b, judge.net.resolution), real=False)
    return float(fid.compute())


def has_tiny_decoder(folder: Path) -> bool:
    try:
        decoder_dir(folder, "tiny")
    except UserError:
        return False
    return True


@torch.no_grad()
def decode_both(folder: Path, latents: torch.Tensor, ov_config: dict) -> dict[str, list]:
    """PIL images of the UNet's final `latents` decoded by the folder's full and tiny decoder IRs, fed as the
    pipelines feed them (latents / scaling_factor + shift_factor) and turned into images as diffusers does."""
    import openvino as ov
    from PIL import Image

    core = ov.Core()
    out = {}
    for which in ("full", "tiny"):
        ir = decoder_dir(folder, which)
        config = json.loads((ir / "config.json").read_text())
        x = (latents.float() / config["scaling_factor"] + float(config.get("shift_factor") or 0)).numpy()
        decoder = core.compile_model(ir / DECODER_XML, "CPU", ov_config)
        images = []
        for z in x:  # one at a time: optimum may have reshaped a decoder to a static batch
            img = np.clip(np.asarray(decoder(z[None])[0])[0] / 2 + 0.5, 0, 1)
            images.append(Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype("uint8")))
        out[which] = images
    return out


def decoder_comparison(folder: Path, latents: torch.Tensor, jobs: list[dict], judge, ov_config: dict):
    """Tiny against full decode of the same latents: (PSNR/SSIM, the judge's accuracy of each, per-image values;
    the images of each decoder)."""
    from .metrics import image_fidelity, images_to_uint8, judge_accuracy

    images = decode_both(folder, latents, ov_config)
    fid = image_fidelity(images_to_uint8(images["full"]), images_to_uint8(images["tiny"]))
    acc = {which: judge_accuracy(judge, images[which], jobs) for which in images}
    return {
        "active": active_decoder(folder),
        "psnr": fid["psnr"],
        "ssim": fid["ssim"],
        "accuracy": {which: a["accuracy"] for which, a in acc.items()},
        "per_image": {
            "psnr": fid["per_image"]["psnr"],
            "ssim": fid["per_image"]["ssim"],
            "correct": {which: a["correct"] for which, a in acc.items()},
        },  # fmt: skip
    }, images
