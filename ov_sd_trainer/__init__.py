"""ov-sd-trainer: quantization-aware training of Stable Diffusion UNets for fast OpenVINO CPU inference."""

__version__ = "0.1.0"
