"""How much a VAE decoder relies on whole-image operations: the decoder against itself with its mid-block attention
removed, or with each GroupNorm given fixed statistics (pooled over the image latents) instead of each image's own.

    python benchmarks/vae_global_ops.py --held-out RUN/final/held_out_latents.safetensors [--model reference]

The latents are a `ov-sd train-decoder` run's held-out sets (`latents`: image latents; `endpoints`: sampling
endpoints), in the UNet's scaled space. PSNR of the pooled MSE, as training reports it (`train.decoder`). PyTorch,
no training. A conv-only tiny decoder has neither operation, so it must learn their effect from examples."""

import argparse

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from ov_sd_trainer.assets import resolve_model_path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--held-out", required=True)
    p.add_argument("--model", default="reference")
    args = p.parse_args()
    vae = AutoencoderKL.from_pretrained(resolve_model_path(args.model), subfolder="vae").eval()
    sets = load_file(args.held_out)

    def decode(z):
        with torch.no_grad():
            return (vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2

    def psnr(a, b):
        return (10 * torch.log10(1 / ((a - b) ** 2).mean())).item()

    full = {k: decode(z) for k, z in sets.items()}
    rows = {}
    attention = vae.decoder.mid_block.attentions[0]
    attention.forward = lambda hidden, *a, **k: hidden  # only the residual path
    rows["attention block removed"] = {k: psnr(decode(z), full[k]) for k, z in sets.items()}
    del attention.forward

    norms = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    pooled = {}

    def collect(m, inputs, _):
        g = inputs[0].reshape(inputs[0].shape[0], m.num_groups, -1)
        pooled[m] = (g.mean(dim=(0, 2)), g.var(dim=2).mean(0) + g.mean(2).var(0))  # over images and positions

    hooks = [m.register_forward_hook(collect) for m in norms]
    decode(sets["latents"])
    for h in hooks:
        h.remove()

    def fixed(m):
        mean, var = pooled[m]

        def forward(x):
            g = x.reshape(x.shape[0], m.num_groups, -1)
            y = ((g - mean[None, :, None]) / torch.sqrt(var[None, :, None] + m.eps)).reshape(x.shape)
            shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
            return y * m.weight.reshape(shape) + m.bias.reshape(shape)

        return forward

    for m in norms:
        m.forward = fixed(m)
    rows["GroupNorm with pooled statistics"] = {k: psnr(decode(z), full[k]) for k, z in sets.items()}
    print("| full decoder with | " + " | ".join(sets) + " |")
    print("|---|" + "---|" * len(sets))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.2f} dB" for k in sets) + " |")


if __name__ == "__main__":
    main()
