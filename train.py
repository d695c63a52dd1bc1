"""Quantization-aware training of a Stable Diffusion UNet for OpenVINO.

accelerate launch train.py --recipe recipes/reference-int8.json [--field value ...]
python train.py --recipe recipes/reference-int8.json --max_steps 10
"""

import sys


def main(argv=None) -> int:
    from ov_sd_trainer.errors import UserError

    try:
        from ov_sd_trainer.config import parse_config
        from ov_sd_trainer.training import run

        cfg, recipe = parse_config(argv)
        out = run(cfg, recipe)
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    print(f"training finished: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
