"""Prompt-fidelity judge: a tiny CNN that reads shape, colour and background off a synthetic image.

The committed weights live in `ov_sd_trainer/assets/judge/` (`model.safetensors` + `config.json`); `load_judge()`
loads them, `Judge.predict` reads images, `score()` compares predictions with the expected attributes. How it is
trained and checked on held-out images: `judge_training.py` (`ov-sd make-judge`, `ov-sd judge`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..assets import judge_path, synthetic
from ..errors import UserError

ATTRIBUTES = ("shape", "color", "background")
LABELS = {"shape": list(synthetic.SHAPES), "color": list(synthetic.COLORS), "background": list(synthetic.BACKGROUNDS)}


class JudgeNet(nn.Module):
    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 64), resolution: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({a: nn.Linear(2 * c_in, len(LABELS[a])) for a in ATTRIBUTES})
        self.resolution = resolution

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        pooled = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)
        return {a: head(pooled) for a, head in self.heads.items()}


def images_to_tensor(images, resolution: int = 64) -> torch.Tensor:
    """PIL images (any size) -> float tensor (N, 3, R, R) in [0, 1]."""
    from PIL import Image

    arrays = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(im))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


class Judge:
    """Wraps the trained `JudgeNet`; `predict(images)` -> [{"shape": .., "color": .., "background": ..}]."""

    def __init__(self, net: JudgeNet, config: dict):
        self.net = net.eval()
        self.config = config

    @torch.no_grad()
    def logits(self, images, batch_size: int = 256) -> dict[str, torch.Tensor]:
        outs: dict[str, list[torch.Tensor]] = {a: [] for a in ATTRIBUTES}
        for i in range(0, len(images), batch_size):
            x = images_to_tensor(images[i : i + batch_size], self.net.resolution)
            for a, v in self.net(x).items():
                outs[a].append(v)
        return {a: torch.cat(v) for a, v in outs.items()}

    def predict(self, images) -> list[dict]:
        if not len(images):
            return []
        idx = {a: v.argmax(1).tolist() for a, v in self.logits(list(images)).items()}
        return [{a: LABELS[a][idx[a][i]] for a in ATTRIBUTES} for i in range(len(images))]


def load_judge(path: str | Path | None = None) -> Judge:
    from safetensors.torch import load_file

    path = Path(path) if path is not None else judge_path()
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise UserError(f"{path} is not a judge folder (needs config.json and model.safetensors)")
    config = json.loads((path / "config.json").read_text())
    for a in ATTRIBUTES:
        if config["labels"][a] != LABELS[a]:
            raise UserError(f"judge at {path} was trained for other {a} labels: {config['labels'][a]}")
    net = JudgeNet(tuple(config["channels"]), config["resolution"])
    net.load_state_dict(load_file(str(path / "model.safetensors")))
    return Judge(net, config)


def score(predictions: list[dict], expected: list[dict]) -> dict:
    """Per-attribute accuracy of predictions against expected attributes, plus `all` (all three right)."""
    if len(predictions) != len(expected):
        raise ValueError(f"{len(predictions)} predictions for {len(expected)} expected rows")
    n = len(expected)
    if n == 0:
        return {**{a: float("nan") for a in ATTRIBUTES}, "all": float("nan"), "n": 0}
    result: dict = {a: sum(p[a] == e[a] for p, e in zip(predictions, expected)) / n for a in ATTRIBUTES}
    result["all"] = sum(all(p[a] == e[a] for a in ATTRIBUTES) for p, e in zip(predictions, expected)) / n
    result["n"] = n
    return result


def accuracy_by_value(jobs: list[dict], preds: list[dict]) -> dict:
    """Accuracy of each attribute split by its expected value (which shapes/colours fail)."""
    out: dict = {}
    for a in ATTRIBUTES:
        counts: dict[str, list[int]] = {}
        for j, p in zip(jobs, preds):
            c = counts.setdefault(j[a], [0, 0])
            c[0] += p[a] == j[a]
            c[1] += 1
        out[a] = {v: round(ok / n, 4) for v, (ok, n) in counts.items()}
    return out
