"""What a tiny VAE decoder is: its architecture (TAESD's, diffusers' `DecoderTiny`, plus `GlobalContext` blocks), its
config for a given VAE, and where a `ov-sd train-decoder` output keeps it. Training (`train.decoder`) writes these
folders; export (`export.tiny_decoder`), eval and bench read them through here, so neither stage imports the other.

    output_dir/final/tiny_decoder/         config.json (the config below) + model.safetensors (EMA applied)
    output_dir/final/held_out_latents.safetensors   scaled latents of held-out images ("latents") and, where the run
                                                    sampled them, held-out sampling endpoints ("endpoints")
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .run_folder import FINAL_DIR

DECODER_DIR = "tiny_decoder"  # in final/: the student, EMA applied
WEIGHTS_FILE = "model.safetensors"
HELD_OUT_FILE = "held_out_latents.safetensors"  # in final/: held-out scaled latents (images; sampling endpoints)
FORMAT = "ov-sd-trainer/tiny-decoder"
DEFAULT_WIDTH = 64  # TAESD's channel width
DEFAULT_BLOCKS = 3  # TAESD's AutoencoderTinyBlocks per upsampling stage
DEFAULT_GLOBAL_CONTEXT = True  # TAESD has none; with them, +1.6 dB on sampled latents (docs/tiny-decoder.md)


def decoder_config(vae_config, width: int = DEFAULT_WIDTH, blocks: int = DEFAULT_BLOCKS,
                   global_context: bool = DEFAULT_GLOBAL_CONTEXT) -> dict:  # fmt: skip
    """The tiny decoder's config for a VAE: its latent channels, one upsampling stage per factor doubling, the
    latent scale (scaling / shift factor) the export puts in front of it, and whether a `GlobalContext` follows each
    residual block."""
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    stages = int(math.log2(factor))
    return {
        "format": FORMAT,
        "latent_channels": int(vae_config["latent_channels"]),
        "out_channels": int(vae_config.get("out_channels", 3)),
        "block_out_channels": [width] * (stages + 1),
        "num_blocks": [blocks] * stages + [1],  # TAESD: (3, 3, 3, 1)
        "vae_scale_factor": factor,
        "scaling_factor": float(vae_config["scaling_factor"]),
        "shift_factor": float(vae_config.get("shift_factor") or 0.0),
        "global_context": bool(global_context),
    }


def latent_space(config: dict) -> tuple:
    """What a decoder's input must match, from a tiny decoder config (`decoder_config`): latent channels, VAE factor,
    scaling and shift factor."""
    return (config["latent_channels"], config["vae_scale_factor"], config["scaling_factor"], config["shift_factor"])


def same_latent_space(a: dict, b: dict) -> bool:
    """Two tiny decoder configs (`decoder_config`) decode the same latents: `latent_space` equal, the float factors
    to a relative 1e-6 (one rule for the export's and train-decoder's checks)."""
    return all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(latent_space(a), latent_space(b), strict=True))


class GlobalContext(nn.Module):
    """x + W2 relu(W1 mean(x)): each image's channel means, through two 1x1 convolutions, added back everywhere.

    The full VAE decoder leans on whole-image statistics (its GroupNorms and mid-block attention; docs/tiny-decoder.md
    measures how much), which TAESD's conv-only decoder can only approximate through its receptive field. This gives
    it one global path made of int8-friendly operations (ReduceMean, Conv, ReLU, Add): no attention, no GroupNorm.
    W2 starts at zero, so an untrained block is the identity and the decoder starts as TAESD's."""

    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 2 or 1, 1)
        self.expand = nn.Conv2d(channels // 2 or 1, channels, 1)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.expand(torch.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True))))


class TinyDecoder(nn.Module):
    """diffusers' `DecoderTiny`: scaled latents (the UNet's space) -> image in [-1, 1]; with `global_context`, a
    `GlobalContext` after each of its residual blocks."""

    def __init__(self, config: dict):
        super().__init__()
        from diffusers.models.autoencoders.vae import DecoderTiny

        self.config = dict(config)
        self.decoder = DecoderTiny(
            in_channels=config["latent_channels"],
            out_channels=config["out_channels"],
            num_blocks=tuple(config["num_blocks"]),
            block_out_channels=tuple(config["block_out_channels"]),
            upsampling_scaling_factor=2,
            act_fn="relu",
            upsample_fn="nearest",
        )
        if config.get("global_context"):
            from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock

            layers = []
            for layer in self.decoder.layers:
                layers.append(layer)
                if isinstance(layer, AutoencoderTinyBlock):
                    layers.append(GlobalContext(layer.conv[0].out_channels))
            self.decoder.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TinyDecoder:
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(
                f"{str(folder)!r} holds no tiny decoder (config.json: {e}); pass a train-decoder output"
            ) from None
        if config.get("format") != FORMAT:
            raise UserError(f"{str(folder)!r}: config.json is not a tiny decoder's (format {config.get('format')!r})")
        model = cls(config)
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return model.eval()


def find_decoder_folder(path: str | Path) -> Path:
    """The tiny decoder folder inside a train-decoder output (run folder, final/, or the decoder folder itself)."""
    path = Path(path).expanduser()
    for candidate in (path, path / DECODER_DIR, path / FINAL_DIR / DECODER_DIR):
        if (candidate / "config.json").is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise UserError(f"{str(path)!r} holds no trained tiny decoder; pass a `ov-sd train-decoder` output_dir")
