"""Quantization-aware training of a Stable Diffusion UNet for OpenVINO: `ov-sd train` as a script.

accelerate launch train.py --recipe recipes/reference-int8.json [--field value ...]
python train.py --recipe reference-int8 --max_steps 10
"""

import sys

from ov_sd_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
