"""Guidance distillation on the bundled model: a batch-1 student of the teacher's classifier-free guidance, sampled
with DPM-Solver++ in few steps. An experiment beside the consistency objective, not a product objective.

    python benchmarks/guidance_distillation.py --output outputs/guidance-student [--steps 2000] [--lr 1e-4]

The student is `lcm.make_student_unet`'s (the teacher plus LCM's zero-initialised guidance embedding,
`time_cond_proj_dim`). Each step draws a batch of the synthetic set's VAE latents (posterior means), a timestep
uniformly in [0, 1000) and noise, and pulls the student's noise prediction at guidance w towards the frozen
teacher's guided one, eps_c + w (eps_c - eps_u), by MSE (stage one of Meng et al. 2023, "On Distillation of Guided
Diffusion Models", at one w). AdamW, constant learning rate, no EMA, one process.

It writes `OUTPUT/diffusers` (the reference pipeline with the student's UNet and a `DPMSolverMultistepScheduler`
from the teacher's scheduler config) and `OUTPUT/openvino` (optimum-intel's export of it). A `StableDiffusionPipeline`
whose UNet has `time_cond_proj_dim` skips classifier-free guidance and embeds guidance_scale - 1 instead, in diffusers
and in optimum-intel alike, so each step is one UNet call at batch 1:

    ov-sd eval --reference reference --model gd=OUTPUT/openvino --steps gd=4 --scheduler gd=dpm ...

OpenVINO GenAI has no DPM-Solver scheduler, so it cannot run this folder as written. docs/few-step.md has the
measurements."""

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="folder for diffusers/, openvino/, training.json")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--w", type=float, default=6.5, help="distilled guidance w (CFG scale w + 1)")
    p.add_argument("--dataset-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    a = p.parse_args()

    from ov_sd_trainer import logs
    from ov_sd_trainer.errors import UserError
    from ov_sd_trainer.outputs import atomic_output_dir, check_output_dir

    try:
        check_output_dir(a.output, a.overwrite)  # before the training, not after it
    except UserError as e:
        sys.exit(f"error: {e}")

    logs.configure()  # the ov-sd commands' quiet output (before the libraries are imported)

    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from optimum.intel import OVDiffusionPipeline

    from ov_sd_trainer import families
    from ov_sd_trainer.assets import reference_model_path, synthetic
    from ov_sd_trainer.assets.reference_training import encode_posteriors
    from ov_sd_trainer.lcm import make_student_unet
    from ov_sd_trainer.train.consistency import empty_prompt_states
    from ov_sd_trainer.train.data import tokenize

    torch.manual_seed(a.seed)
    pipe = StableDiffusionPipeline.from_pretrained(str(reference_model_path()), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    teacher = pipe.unet.eval().requires_grad_(False)
    student = make_student_unet(teacher).train()
    ds = synthetic.make_synthetic_dataset(a.dataset_size, a.seed, pipe.unet.config.sample_size * pipe.vae_scale_factor)
    with torch.no_grad():
        images = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in ds["image"]])
        latents = encode_posteriors(pipe.vae, images, batch_size=200)[0] * pipe.vae.config.scaling_factor
        ids = tokenize(pipe.tokenizer, ds["text"])
        cond_all = torch.cat([pipe.text_encoder(ids[i : i + 200])[0] for i in range(0, len(ids), 200)])
        uncond = empty_prompt_states(pipe.tokenizer, pipe.text_encoder)

    sched = pipe.scheduler
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(a.seed)
    w_embed = families.guidance_embedding(torch.full((a.batch,), a.w), student.config.time_cond_proj_dim)
    losses, start = [], time.time()
    bar = tqdm(range(a.steps), desc="guidance distillation", unit="step")
    for _ in bar:
        idx = torch.randint(0, len(latents), (a.batch,), generator=g)
        x0, c = latents[idx], cond_all[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (a.batch,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        with torch.no_grad():
            eps_c, eps_u = teacher(torch.cat([xt, xt]), torch.cat([t, t]),
                                   torch.cat([c, uncond.expand(a.batch, -1, -1)])).sample.chunk(2)  # fmt: skip
            target = eps_c + a.w * (eps_c - eps_u)
        loss = F.mse_loss(student(xt, t, c, timestep_cond=w_embed).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")

    student.eval()
    gd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=student,
                                 scheduler=DPMSolverMultistepScheduler.from_config(sched.config),
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    every = max(1, a.steps // 20)
    with atomic_output_dir(a.output, a.overwrite) as tmp:
        gd.save_pretrained(tmp / "diffusers")
        # optimum-intel's export, as `export.openvino.export_openvino_pipeline` makes it
        OVDiffusionPipeline.from_pretrained(tmp / "diffusers", export=True, compile=False).save_pretrained(
            tmp / "openvino"
        )
        (tmp / "training.json").write_text(json.dumps({
            **vars(a), "seconds": round(time.time() - start, 1), "threads": torch.get_num_threads(),
            f"loss_every_{every}_steps": [round(float(np.mean(losses[i:i + every])), 5)
                                          for i in range(0, len(losses), every)],
        }, indent=1))  # fmt: skip
    print(
        f"wrote {a.output}: diffusers/, openvino/ (sample with DPM-Solver++ at guidance {a.w + 1:g}, one UNet call a step)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
