"""Latent consistency distillation (LCD): a few-step student of the user's own UNet, with the guidance distilled in.

Luo et al. 2023, "Latent Consistency Models", Algorithm 1 (LCD), as diffusers'
`examples/consistency_distillation/train_lcm_distill_sd_wds.py` implements it. Per training batch:

1. draw a solver index n and its timestep t_{n+k} on a skipped schedule of the teacher's timesteps (`DDIMSolver`:
   `num_ddim_timesteps` of them, k = T / num_ddim_timesteps apart), noise the latents to z_{t_{n+k}};
2. draw a guidance w in [w_min, w_max] (classifier-free guidance scale w + 1) and embed it (`time_cond_proj_dim`);
3. the frozen teacher, with CFG at w, takes one DDIM step z_{t_{n+k}} -> z_{t_n} (no clipping);
4. the student's consistency function f(z_{t_{n+k}}, w, c, t_{n+k}) is pulled towards the target network's
   f(z_{t_n}, w, c, t_n), where f(x, t) = c_skip(t) x + c_out(t) x0(x, t) (`boundary_scalings`: f is the identity at
   t = 0) and the target network is an EMA of the student (`ConsistencyTarget`);
5. the loss is a pseudo-Huber or L2 distance.

The student is the teacher's UNet plus the guidance embedding (`make_student_unet`); it samples with diffusers'
`LCMScheduler`, as optimum-intel and OpenVINO GenAI will. `few_step_gap` scores it against the teacher's ODE
endpoint from the same initial latents.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from .. import families
from ..errors import UserError
from ..lcm import (
    NUM_DDIM_TIMESTEPS,
    TIMESTEP_SCALING,
    lcm_scheduler,
    ode_scheduler,
)
from . import fsdp
from .unet_inputs import GUIDANCE

# Guidance w drawn per sample (CFG scale w + 1): `families.LCM_W_MIN` / `LCM_W_MAX`, the diffusers script's 5 and 15.
W_MIN, W_MAX = families.LCM_W_MIN, families.LCM_W_MAX
LOSS_TYPES = ("huber", "l2")
DEFAULT_LOSS_TYPE = "huber"
HUBER_C = 0.001  # pseudo-Huber's c (the diffusers script's)
# Boundary-condition scalings: LCMScheduler's own constants (its `timestep_scaling` default and fixed sigma_data),
# so that the student samples with the scalings it was trained with.
SIGMA_DATA = 0.5
TARGET_DECAY = 0.95  # EMA decay of the target network (the diffusers script's --ema_decay)
TARGET_FILE = "consistency_target.safetensors"  # the target network's state in a checkpoint
# What a consistency student learns from (`qat_teacher`): the pipeline's teacher through the consistency loss, or the
# outputs of the float consistency student it was initialised from (`init_student`; QAT of a float student).
QAT_TEACHERS = ("model", "init_student")
# Held-out few-step gap: the student's steps, the teacher's ODE endpoint (DDIM steps) and the guidance scale.
GAP_STEPS = 4
GAP_TEACHER_STEPS = 25
GAP_GUIDANCE = GUIDANCE


# --------------------------------------------------------------------------------------------------------------------
# The student
# --------------------------------------------------------------------------------------------------------------------


def guidance_extra(w: torch.Tensor, dim: int) -> dict:
    """The student's extra UNet input for guidance w [B] (CFG scale w + 1): {`timestep_cond`: [B, dim]}."""
    return {families.TIMESTEP_COND: families.guidance_embedding(w, dim)}


def empty_prompt_states(tokenizer, text_encoder) -> torch.Tensor:
    """The empty prompt's text states [1,77,D] (float32): the unconditional half of the teacher's CFG."""
    from .data import tokenize

    device = next(text_encoder.parameters()).device
    with torch.no_grad():
        return text_encoder(tokenize(tokenizer, [""]).to(device), return_dict=False)[0].float()


# --------------------------------------------------------------------------------------------------------------------
# Solver pieces
# --------------------------------------------------------------------------------------------------------------------


def _per_sample(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [T] gathered at index [B] -> [B,1,1,1], broadcastable over latents."""
    return values.to(index.device)[index].reshape(-1, 1, 1, 1)


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = TIMESTEP_SCALING, sigma_data: float = SIGMA_DATA):
    """LCM's c_skip(t), c_out(t) [B] for timesteps t [B] (`LCMScheduler.get_scalings_for_boundary_condition_discrete`):
    c_skip(0) = 1, c_out(0) = 0, so the consistency function is the identity at t = 0."""
    scaled = timestep_scaling * t.float()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def predicted_original(output, t, sample, prediction_type: str, alphas_cumprod):
    """x0 [B,C,h,w] from a UNet output at timesteps t [B] on `sample` (epsilon / v_prediction / sample)."""
    a = _per_sample(alphas_cumprod, t).sqrt()
    s = (1 - _per_sample(alphas_cumprod, t)).sqrt()
    if prediction_type == "epsilon":
        return (sample - s * output) / a
    if prediction_type == "v_prediction":
        return a * sample - s * output
    if prediction_type == "sample":
        return output
    raise UserError(f"unknown prediction_type {prediction_type!r}; supported: epsilon, v_prediction, sample")


def predicted_noise(output, t, sample, prediction_type: str, alphas_cumprod):
    """The noise [B,C,h,w] a UNet output at timesteps t [B] implies on `sample` (the DDIM step needs it)."""
    a = _per_sample(alphas_cumprod, t).sqrt()
    s = (1 - _per_sample(alphas_cumprod, t)).sqrt()
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return a * output + s * sample
    if prediction_type == "sample":
        return (sample - a * output) / s
    raise UserError(f"unknown prediction_type {prediction_type!r}; supported: epsilon, v_prediction, sample")


class DDIMSolver:
    """Deterministic DDIM (eta 0, no clipping) over a skipped schedule of the teacher's `alphas_cumprod` [T].

    `timesteps` [N]: k - 1, 2k - 1, ..., T - 1 with k = T // N (index n is t_{n+k} in Algorithm 1's notation); a step
    from index n lands on timestep `timesteps[n] - k` (0 for n = 0), whose alpha_cumprod is `alphas_prev[n]`. One step
    equals `DDIMScheduler` (trailing spacing, N steps, `set_alpha_to_one=False`, `clip_sample=False`)."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int = NUM_DDIM_TIMESTEPS):
        T = len(alphas_cumprod)
        if not 1 <= num_ddim_timesteps <= T:
            raise UserError(f"num_ddim_timesteps must be in 1..{T}, got {num_ddim_timesteps}")
        self.skip = T // num_ddim_timesteps
        self.alphas_cumprod = alphas_cumprod.float()
        self.timesteps = torch.arange(1, num_ddim_timesteps + 1) * self.skip - 1
        self.alphas_prev = torch.cat([self.alphas_cumprod[:1], self.alphas_cumprod[self.timesteps[:-1]]])

    def __len__(self) -> int:
        return len(self.timesteps)

    def previous_timesteps(self, index: torch.Tensor) -> torch.Tensor:
        """t_n [B] (long) of solver indices [B]: the timestep one step lands on."""
        return (self.timesteps.to(index.device)[index] - self.skip).clamp(min=0)

    def step(self, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """z_{t_n} [B,C,h,w] from the predicted x0 and noise at solver indices [B]."""
        a_prev = _per_sample(self.alphas_prev, index)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * noise


# --------------------------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------------------------


def consistency_distance(pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float = HUBER_C):
    """Mean pseudo-Huber sqrt(d^2 + c^2) - c (`huber`) or squared error (`l2`) between two [B,C,h,w] tensors."""
    if loss_type == "l2":
        return F.mse_loss(pred, target)
    if loss_type == "huber":
        return (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c).mean()
    raise UserError(f"unknown consistency loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


class ConsistencyObjective:
    """LCD's loss on a batch of latents (Algorithm 1), over the teacher's noise schedule (`noise_scheduler`: its
    `alphas_cumprod`, `add_noise` and `prediction_type`).

    Called with `nets`, any object holding `student` (trainable; a float UNet from `make_student_unet` or its
    NNCF-quantized copy), `teacher` (frozen FP32 UNet), `consistency_target` (a `ConsistencyTarget`) and
    `unet(net, sample, timestep, states, extra)` (`QATModel.unet`: dtype casting and a family's extra inputs)."""

    def __init__(self, noise_scheduler, num_ddim_timesteps: int = NUM_DDIM_TIMESTEPS, w_min: float = W_MIN,
                 w_max: float = W_MAX, loss_type: str = DEFAULT_LOSS_TYPE, huber_c: float = HUBER_C,
                 timestep_scaling: float = TIMESTEP_SCALING):  # fmt: skip
        if loss_type not in LOSS_TYPES:
            raise UserError(f"unknown consistency loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        if not 0 <= w_min <= w_max:
            raise UserError(f"the guidance range needs 0 <= w_min <= w_max, got [{w_min}, {w_max}]")
        self.noise_scheduler = noise_scheduler
        self.prediction_type = noise_scheduler.config.prediction_type
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.float()
        self.solver = DDIMSolver(self.alphas_cumprod, num_ddim_timesteps)
        self.w_min, self.w_max = w_min, w_max
        self.loss_type, self.huber_c, self.timestep_scaling = loss_type, huber_c, timestep_scaling
        # `qat_teacher: init_student`: the frozen float consistency student the quantized one copies (kept here, not
        # on the QATModel, so that neither DDP nor the optimizer sees it); None: the consistency loss
        self.init_teacher: torch.nn.Module | None = None

    def consistency_function(self, output, t, sample):
        """f(sample, t) = c_skip(t) sample + c_out(t) x0 [B,C,h,w] of a student / target UNet output at t [B]."""
        c_skip, c_out = boundary_scalings(t, self.timestep_scaling)
        x0 = predicted_original(output, t, sample, self.prediction_type, self.alphas_cumprod)
        return c_skip.reshape(-1, 1, 1, 1) * sample + c_out.reshape(-1, 1, 1, 1) * x0

    def draw(self, latents: torch.Tensor, generator: torch.Generator):
        """The batch's random draws, all from `generator` in this order: solver index [B], noise [B,C,h,w], w [B]."""
        b, g = len(latents), generator
        index = torch.randint(0, len(self.solver), (b,), generator=g, device=g.device).to(latents.device)
        noise = torch.randn(latents.shape, generator=g, device=g.device, dtype=torch.float32).to(latents.device)
        u = torch.rand(b, generator=g, device=g.device).to(latents.device)
        return index, noise, self.w_min + (self.w_max - self.w_min) * u

    @torch.no_grad()
    def teacher_step(self, nets, sample, t, index, cond, uncond, w):
        """The teacher's guided DDIM step z_{t_{n+k}} -> z_{t_n} [B,C,h,w]: x0 and noise each guided as
        cond + w (cond - uncond) (LCM's CFG form: scale w + 1), one UNet call on the [cond, uncond] batch."""
        b, x2, t2 = len(sample), torch.cat([sample, sample]), torch.cat([t, t])
        out = nets.unet(nets.teacher, x2, t2, torch.cat([cond, uncond])).float()
        x0 = predicted_original(out, t2, x2, self.prediction_type, self.alphas_cumprod)
        eps = predicted_noise(out, t2, x2, self.prediction_type, self.alphas_cumprod)
        w = w.reshape(-1, 1, 1, 1)
        x0 = x0[:b] + w * (x0[:b] - x0[b:])
        eps = eps[:b] + w * (eps[:b] - eps[b:])
        return self.solver.step(x0, eps, index)

    def __call__(self, nets, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                 generator: torch.Generator) -> dict:  # fmt: skip
        """latents [B,4,h,w] (scaled VAE latents), cond [B,77,D] (the captions' text states), uncond [1 or B,77,D]
        (the empty prompt's) -> {"loss": the consistency loss (with grad into the student only), "consistency_loss":
        the same, detached}. With an `init_teacher`, the loss is the MSE between the student's and the init
        teacher's outputs at the same consistency training states ({"loss", "distillation_loss"})."""
        latents = latents.float()
        index, noise, w = self.draw(latents, generator)
        start = self.solver.timesteps.to(latents.device)[index]  # t_{n+k}
        end = self.solver.previous_timesteps(index)  # t_n
        noisy = self.noise_scheduler.add_noise(latents, noise, start)
        extra = guidance_extra(w, nets.student.config.time_cond_proj_dim)
        uncond = uncond.expand(len(latents), -1, -1)

        out = nets.unet(nets.student, noisy, start, cond, extra).float()
        if self.init_teacher is not None:
            with torch.no_grad():
                reference = nets.unet(self.init_teacher, noisy, start, cond, extra).float()
            loss = F.mse_loss(out, reference)
            return {"loss": loss, "distillation_loss": loss.detach()}
        pred = self.consistency_function(out, start, noisy)
        x_prev = self.teacher_step(nets, noisy, start, index, cond, uncond, w)
        with torch.no_grad():
            target_out = nets.unet(nets.consistency_target.net, x_prev, end, cond, extra).float()
            target = self.consistency_function(target_out, end, x_prev)
        loss = consistency_distance(pred, target, self.loss_type, self.huber_c)
        return {"loss": loss, "consistency_loss": loss.detach()}


# --------------------------------------------------------------------------------------------------------------------
# The target network
# --------------------------------------------------------------------------------------------------------------------


class ConsistencyTarget(TrainerCallback):
    """The target network θ⁻: a copy of the student (NNCF-quantized students included: their quantizer ranges are
    averaged too) updated after every optimizer step (`on_step_end`) as θ⁻ <- decay θ⁻ + (1 - decay) θ.

    It runs a forward every training step, so it lives on the training device (`on_train_begin` moves it there),
    unlike the CPU-RAM EMA of `ema.EMACallback`; frozen (no grad) and in eval mode. Under FSDP it is sharded like
    the student (`shard`), so each rank averages its own shards. `save` / `load` (`TARGET_FILE`) restore it exactly
    on resume."""

    def __init__(self, student: torch.nn.Module, decay: float = TARGET_DECAY):
        if not 0 <= decay < 1:
            raise UserError(f"the target network's EMA decay must be in [0, 1), got {decay}")
        self.student, self.decay = student, decay
        self.net = copy.deepcopy(student).requires_grad_(False).eval()
        self.sharded = False
        self._whole = self._pairs()  # (also checks that the copy lines up)

    def shard(self, sharder: fsdp.ShardedStudent) -> None:
        """Shard the target network as `sharder` sharded the student (call after the student is sharded)."""
        sharder.shard(self.net)
        self.sharded = True
        self._whole = None
        self._pairs()

    def _pairs(self):
        """(student, target) local tensors to average: floating-point parameters only (NNCF keeps integer state,
        bit widths and signedness, in Parameters too); the shards when sharded, never a forward's gathered copy."""
        fsdp.reshard(self.student)
        fsdp.reshard(self.net)
        pairs = list(zip(self.student.named_parameters(), self.net.named_parameters(), strict=True))
        if any(n != m for (n, _), (m, _) in pairs):
            raise RuntimeError("the target network's parameters do not line up with the student's")
        return [(fsdp.local(p), fsdp.local(q)) for (_, p), (_, q) in pairs if p.is_floating_point()]

    @torch.no_grad()
    def step(self):
        # whole: the same tensors every step; sharded: the local shards, looked up after resharding (a forward may
        # have left the unsharded copies registered)
        for p, q in self._whole or self._pairs():
            q.lerp_(p.detach().to(q.dtype), 1 - self.decay)

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.sharded:  # (sharded: already on the student's device, unit for unit)
            self.net.to(next(self.student.parameters()).device)

    def on_step_end(self, args, state, control, **kwargs):
        self.step()
        return control

    def save(self, directory, net: torch.nn.Module | None = None):
        """Write the target network (or `net`: its gathered copy when sharded) to `directory`/`TARGET_FILE`
        (safetensors' `save_model`: an NNCF model may hold one tensor under several names)."""
        from pathlib import Path

        from safetensors.torch import save_model

        save_model(self.net if net is None else net, str(Path(directory) / TARGET_FILE),
                   metadata={"decay": str(self.decay)})  # fmt: skip

    def load(self, directory, scratch: torch.nn.Module | None = None):
        """Restore the target network from `directory`/`TARGET_FILE`. Sharded, the whole file is loaded into
        `scratch` (an unsharded student of the same architecture, overwritten) and each rank keeps its shards."""
        from pathlib import Path

        from safetensors.torch import load_model

        path = str(Path(directory) / TARGET_FILE)
        if not self.sharded:
            load_model(self.net, path, device=str(next(self.net.parameters()).device))
            return
        if scratch is None:
            raise ValueError("a sharded target network loads through an unsharded scratch copy of the student")
        load_model(scratch, path, device="cpu")
        fsdp.ShardedStudent.load_from(self.net, scratch)


# --------------------------------------------------------------------------------------------------------------------
# Held-out few-step gap
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class GapSet:
    """Fixed held-out prompts and initial latents with the teacher's ODE endpoints for them: cond [N,77,D],
    uncond [1,77,D], noise [N,4,h,w], teacher_latents [N,4,h,w] (deterministic DDIM, `teacher_steps`, CFG at
    `guidance_scale`), teacher_images [N,3,H,W] in [0, 1]."""

    cond: torch.Tensor
    uncond: torch.Tensor
    noise: torch.Tensor
    teacher_latents: torch.Tensor
    teacher_images: torch.Tensor
    guidance_scale: float
    seed: int


def _guided(unet, net, x, t, cond, uncond, guidance_scale):
    n = len(x)
    out = unet(net, torch.cat([x, x]), t.reshape(1).expand(2 * n), torch.cat([uncond.expand(n, -1, -1), cond]))
    u, c = out.float().chunk(2)
    return u + guidance_scale * (c - u)


@torch.no_grad()
def build_gap_set(pipe, prompts: list[str], seed: int, guidance_scale: float = GAP_GUIDANCE,
                  teacher_steps: int = GAP_TEACHER_STEPS, resolution: int | None = None) -> GapSet:  # fmt: skip
    """The held-out set of `prompts` for `pipe` (the teacher's diffusers SD pipeline: its UNet is the teacher):
    initial latents from `torch.Generator().manual_seed(seed)`, the teacher's `teacher_steps`-step DDIM endpoints."""
    from .data import tokenize
    from .losses import QATModel
    from .rollouts import decode, to_unit

    device = pipe.unet.device
    cond = pipe.text_encoder(tokenize(pipe.tokenizer, prompts).to(device), return_dict=False)[0].float()
    uncond = empty_prompt_states(pipe.tokenizer, pipe.text_encoder)
    side = (resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor) // pipe.vae_scale_factor
    shape = (len(prompts), pipe.unet.config.in_channels, side, side)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    scheduler = ode_scheduler(pipe.scheduler.config)
    scheduler.set_timesteps(teacher_steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = _guided(QATModel.unet, pipe.unet, scheduler.scale_model_input(x, t), t, cond, uncond, guidance_scale)
        x = scheduler.step(eps, t, x, return_dict=False)[0]
    images = to_unit(decode(pipe.vae, x))
    return GapSet(cond, uncond, noise, x, images, guidance_scale, seed)


@torch.no_grad()
def few_step_sample(student, scheduler_config, cond, noise, guidance_scale: float, steps: int, seed: int,
                    num_ddim_timesteps: int = NUM_DDIM_TIMESTEPS) -> torch.Tensor:  # fmt: skip
    """The student's `steps`-step `LCMScheduler` sample [N,4,h,w] from `noise` at CFG scale `guidance_scale` (embedded
    as w = guidance_scale - 1, as `LatentConsistencyModelPipeline` does); the noise LCM injects between steps comes
    from `torch.Generator().manual_seed(seed)`."""
    from .losses import QATModel

    scheduler = lcm_scheduler(scheduler_config, num_ddim_timesteps)
    scheduler.set_timesteps(steps)
    w = torch.full((len(noise),), guidance_scale - 1, device=noise.device)
    extra = guidance_extra(w, student.config.time_cond_proj_dim)
    g = torch.Generator().manual_seed(seed)
    x, denoised = noise * scheduler.init_noise_sigma, noise
    for t in scheduler.timesteps:
        out = QATModel.unet(student, x, t.reshape(1).expand(len(x)), cond, extra).float()
        x, denoised = scheduler.step(out, t, x, generator=g, return_dict=False)
        x = x.to(noise.device)
    return denoised


@torch.no_grad()
def few_step_gap(student, pipe, gap_set: GapSet, steps: int = GAP_STEPS,
                 num_ddim_timesteps: int = NUM_DDIM_TIMESTEPS) -> dict[str, float]:  # fmt: skip
    """The student's `steps`-step samples of `gap_set` against the teacher's ODE endpoints: `latent_mse` and
    `psnr` (dB, decoded images in [0, 1], pooled over the set). `pipe`: the teacher's pipeline (its VAE, scheduler)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    from .rollouts import decode, to_unit

    was_training = student.training
    student.eval()
    try:
        x = few_step_sample(student, pipe.scheduler.config, gap_set.cond, gap_set.noise, gap_set.guidance_scale,
                            steps, gap_set.seed, num_ddim_timesteps)  # fmt: skip
    finally:
        student.train(was_training)
    images = to_unit(decode(pipe.vae, x))
    return {
        "latent_mse": F.mse_loss(x, gap_set.teacher_latents).item(),
        "psnr": peak_signal_noise_ratio(images, gap_set.teacher_images, data_range=1.0).item(),
    }
