"""The teacher's own few-step samplers on the bundled model: DDIM (no clipping), Euler and DPM-Solver++ 2M at leading
and trailing timestep spacing, 2 and 4 steps, classifier-free guidance, scored by the judge. Prints a table.

    python benchmarks/naive_samplers.py [--subset 66] [--seeds 2] [--threads 1]

PyTorch FP32, diffusers' `StableDiffusionPipeline` of the reference model with each scheduler `from_config` of the
teacher's (`timestep_spacing` set), from `ov-sd eval`'s initial latents for the same prompts and seeds. `ov-sd eval
--scheduler NAME=ddim|euler|dpm` runs the leading-spacing column through OpenVINO; docs/few-step.md has the results."""

import argparse


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subset", type=int, default=66, help="evenly spaced prompts of the 132")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, nargs="+", default=[2, 4])
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    from ov_sd_trainer import logs

    logs.configure()

    import torch
    from diffusers import StableDiffusionPipeline
    from tqdm import tqdm

    from ov_sd_trainer.assets import reference_model_path
    from ov_sd_trainer.eval.fewstep import SCHEDULERS, few_step_scheduler
    from ov_sd_trainer.eval.generate import initial_latents
    from ov_sd_trainer.eval.judge import load_judge
    from ov_sd_trainer.eval.metrics import judge_accuracy
    from ov_sd_trainer.eval.prompts import jobs_for

    torch.set_num_threads(a.threads)
    pipe = StableDiffusionPipeline.from_pretrained(str(reference_model_path()), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    side = pipe.unet.config.sample_size
    judge, jobs = load_judge(), jobs_for(a.subset, a.seeds)
    latents = initial_latents(jobs, (pipe.unet.config.in_channels, side, side))
    teacher_config = dict(pipe.scheduler.config)
    rows = [(k, sp, n) for k in SCHEDULERS for sp in ("leading", "trailing") for n in a.steps]
    results = {}
    for kind, spacing, n in tqdm(rows, desc="samplers"):
        # `ov-sd eval --scheduler`'s own samplers (DDIM without clipping), at the spacing of this column
        pipe.scheduler = few_step_scheduler(kind, {**teacher_config, "timestep_spacing": spacing})
        images = []
        for i in range(0, len(jobs), 33):
            images += pipe([j["prompt"] for j in jobs[i : i + 33]], num_inference_steps=n,
                           guidance_scale=a.guidance_scale, latents=latents[i : i + 33].clone(),
                           height=side * pipe.vae_scale_factor, width=side * pipe.vae_scale_factor).images  # fmt: skip
        pipe.scheduler.set_timesteps(n)
        results[kind, spacing, n] = (judge_accuracy(judge, images, jobs)["accuracy"]["all"],
                                     [int(t) for t in pipe.scheduler.timesteps])  # fmt: skip
    print(f"\nall-three accuracy, {len(jobs)} images, guidance {a.guidance_scale:g} (timesteps in brackets)\n")
    cols = [(sp, n) for sp in ("leading", "trailing") for n in a.steps]
    print("| sampler | " + " | ".join(f"{sp}, {n} steps" for sp, n in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for kind in SCHEDULERS:
        cells = [f"{results[kind, sp, n][0]:.1%} {results[kind, sp, n][1]}" for sp, n in cols]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
