"""Test-wide settings: offline, one intra-op thread.

Tiny models gain nothing from a second thread, and on a 2-core machine with any other load an
OpenMP team of 2 spin-waits: a small conv measured 32 ms with 2 threads vs 1.1 ms with 1."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the CLI / accelerate subprocesses

import torch  # noqa: E402

torch.set_num_threads(1)
