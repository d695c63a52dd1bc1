"""Train the prompt-fidelity judge (`ov-sd make-judge`) and measure it on held-out images (`ov-sd judge`).

    ov-sd make-judge --output ov_sd_trainer/assets/judge   # a few minutes on CPU
    ov-sd judge                                            # held-out accuracy of the committed judge

The network (`judge.JudgeNet`: four conv blocks, global pooling, three linear heads) is trained on images from
`synthetic` (drawn once, augmented afresh every step). Augmentations make it robust to what a diffusion model
generates rather than to the clean drawings only: Gaussian blur, a down/up-sampling blur (like a VAE decode),
Gaussian noise, slight colour jitter (brightness, contrast, per-channel shifts) and small random shifts/scalings.
`evaluate` measures per-attribute accuracy on fresh synthetic images drawn from a seed never used in training
(clean and augmented).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..assets import synthetic
from ..errors import UserError
from .judge import ATTRIBUTES, LABELS, Judge, JudgeNet, images_to_tensor, load_judge, score

DEFAULT_EVAL_SEED = 987_654  # never used for training (training uses --seed, default 0)


def draw_images(num: int, seed: int, resolution: int = 64) -> tuple[list, list[dict]]:
    rows = synthetic.sample_attributes(num, seed)
    images = [
        synthetic.draw_shape(r["shape"], r["color"], r["background"], resolution, r["size"], r["center"]) for r in rows
    ]
    return images, [{a: r[a] for a in ATTRIBUTES} for r in rows]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(2.5 * sigma)))
    k = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Degrade a batch (N, 3, H, W) in [0, 1] like a generated image: shift/scale, blur, jitter, noise."""
    n, _, h, w = x.shape
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    # small random shifts (up to ~6% of the side) and scalings (+-8%)
    scale = 1 + (u(n) - 0.5) * 0.16
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = (u(n, 2) - 0.5) * 0.25
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # blur: Gaussian on a random half, down/up-sampling (VAE-decode-like softness) on a random third
    sel = u(n) < 0.5
    if sel.any():
        x[sel] = _gaussian_blur(x[sel], float(0.4 + 1.0 * u(1)))
    sel = u(n) < 0.33
    if sel.any():
        f = int(2 + (u(1) < 0.5).item() * 2)
        small = F.interpolate(x[sel], scale_factor=1 / f, mode="area")
        x[sel] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    # slight colour jitter: contrast, brightness, per-channel shift
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + (u(n, 1, 1, 1) - 0.5) * 0.3) + mean
    x = x + (u(n, 1, 1, 1) - 0.5) * 0.16 + (u(n, 3, 1, 1) - 0.5) * 0.1
    # noise
    x = x + torch.randn(x.shape, generator=g) * (u(n, 1, 1, 1) * 0.06)
    return x.clamp(0, 1)


def _targets(attrs: list[dict]) -> dict[str, torch.Tensor]:
    return {a: torch.tensor([LABELS[a].index(r[a]) for r in attrs]) for a in ATTRIBUTES}


def train_judge(
    output: str | Path,
    seed: int = 0,
    num_images: int = 8000,
    steps: int = 800,
    batch_size: int = 64,
    lr: float = 3e-3,
    channels: tuple[int, ...] = (16, 32, 64, 64),
    threads: int = 1,
) -> dict:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    images, attrs = draw_images(num_images, seed)
    x_all = images_to_tensor(images)
    y_all = _targets(attrs)
    net = JudgeNet(channels)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    log = []
    net.train()
    bar = tqdm(range(steps), desc="judge", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(x_all), (batch_size,), generator=g)
        x = augment(x_all[idx].clone(), g)
        out = net(x)
        losses = {a: F.cross_entropy(out[a], y_all[a][idx]) for a in ATTRIBUTES}
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.append(
                dict(step=step, loss=round(loss.item(), 5), **{a: round(v.item(), 5) for a, v in losses.items()})
            )
    net.eval()
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out_dir / "model.safetensors"))
    config = dict(
        channels=list(channels),
        resolution=64,
        labels=LABELS,
        train=dict(
            command="ov-sd make-judge " + " ".join(sys.argv[2:]),
            seed=seed,
            num_images=num_images,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            time_s=round(time.perf_counter() - t0, 1),
            final_loss=log[-1]["loss"],
        ),
    )
    judge = Judge(net, config)
    config["eval"] = evaluate(judge, seed=DEFAULT_EVAL_SEED)
    (out_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (out_dir / "training_log.json").write_text(json.dumps(log) + "\n")
    return config


def evaluate(judge: Judge, num_images: int = 2000, seed: int = DEFAULT_EVAL_SEED) -> dict:
    """Accuracy on fresh images from `seed` (clean drawings and augmented copies)."""
    images, attrs = draw_images(num_images, seed)
    clean = score(judge.predict(images), attrs)
    g = torch.Generator().manual_seed(seed)
    x = augment(images_to_tensor(images), g)
    with torch.no_grad():
        out = judge.net(x)
    preds = [{a: LABELS[a][int(out[a][i].argmax())] for a in ATTRIBUTES} for i in range(len(images))]
    return dict(seed=seed, clean=clean, augmented=score(preds, attrs))


def _fmt(result: dict) -> str:
    return " ".join(f"{a}={result[a]:.2%}" for a in (*ATTRIBUTES, "all")) + f" (n={result['n']})"


def add_make_arguments(t) -> None:
    t.add_argument("--output", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--num-images", type=int, default=8000)
    t.add_argument("--steps", type=int, default=800)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--threads", type=int, default=1)


def make_main(args) -> int:
    """`ov-sd make-judge`."""
    cfg = train_judge(
        args.output, args.seed, args.num_images, args.steps, args.batch_size, args.lr, threads=args.threads
    )
    print(f"saved judge to {args.output} in {cfg['train']['time_s']} s")
    print("held-out clean:    ", _fmt(cfg["eval"]["clean"]))
    print("held-out augmented:", _fmt(cfg["eval"]["augmented"]))
    return 0


def add_arguments(e) -> None:
    e.add_argument("--judge", default=None, help="judge folder (default: the committed one)")
    e.add_argument("--num-images", type=int, default=2000)
    e.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED)


def main(args) -> int:
    """`ov-sd judge`: per-attribute accuracy on fresh held-out synthetic images."""
    judge = load_judge(args.judge)
    if args.seed == judge.config["train"]["seed"]:
        raise UserError(f"--seed {args.seed} is the judge's training seed; pick a held-out seed")
    t0 = time.perf_counter()
    result = evaluate(judge, args.num_images, args.seed)
    print(f"judge held-out accuracy (seed {args.seed}, {time.perf_counter() - t0:.1f} s)")
    print("| images | shape | color | background | all |\n|---|---|---|---|---|")
    for name in ("clean", "augmented"):
        r = result[name]
        print(f"| {name} | {r['shape']:.2%} | {r['color']:.2%} | {r['background']:.2%} | {r['all']:.2%} |")
    return 0
