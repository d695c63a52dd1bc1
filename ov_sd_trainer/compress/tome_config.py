"""Token merging settings (`TomeConfig`), apart from the patch itself so that the training config can check them
without importing torch or diffusers. The merge lives in `tome`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

MODES = ("tome", "todo")
MAX_RATIO = 0.75
TRAINING_PREFIX = "tome_"  # QATConfig field names: tome_ratio, tome_sx, ...


@dataclass(frozen=True)
class TomeConfig:
    """Token merging settings (the arguments of `apply_tome`).

    ratio: fraction of the tokens merged away at each patched block (0 to 0.75; 0 = off). "tome" needs
      ratio <= 1 - 1/(sx*sy) (the src set's share of the grid).
    max_downsample: patch the levels whose downsampling factor is at most this (1, 2, 4 or 8).
    sx, sy: the dst stride ("tome": one dst token per sy x sx cell) or the key/value pooling window ("todo").
    merge_attn / merge_crossattn / merge_mlp: which sub-layers see merged tokens ("tome" only).
    mode: "tome" (token merging) or "todo" (key/value downsampling in self-attention).
    """

    ratio: float = 0.4
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    mode: str = "tome"

    def __post_init__(self):
        validate(dataclasses.asdict(self), lambda name: name)

    @property
    def active(self) -> bool:
        return self.ratio > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_training_config(cls, cfg: Any) -> TomeConfig:
        """From a `QATConfig` or its JSON dict (`tome_ratio`, `tome_max_downsample`, ...); absent keys: defaults.
        Errors name the config fields (`tome_sx=0: ...`)."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d: getattr(cfg, k, d)
        values = {f.name: get(TRAINING_PREFIX + f.name, f.default) for f in dataclasses.fields(cls)}
        validate(values, lambda name: TRAINING_PREFIX + name)
        return cls(**values)


def validate(v: dict[str, Any], key: Callable[[str], str] = lambda name: name) -> None:
    """Validate TomeConfig values; `key` names a field in the message (`ratio` for apply_tome, `tome_ratio` for
    the training config)."""
    ratio = v["ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        raise UserError(f"{key('ratio')}={ratio!r}: must be a number between 0 and {MAX_RATIO}")
    if not 0.0 <= ratio <= MAX_RATIO:
        raise UserError(f"{key('ratio')}={ratio}: must be between 0 and {MAX_RATIO}")
    if v["mode"] not in MODES:
        raise UserError(f"{key('mode')}={v['mode']!r}: use one of {', '.join(MODES)}")
    for name in ("max_downsample", "sx", "sy"):
        if isinstance(v[name], bool) or not isinstance(v[name], int) or v[name] < 1:
            raise UserError(f"{key(name)}={v[name]!r}: must be a positive integer")
    if v["max_downsample"] & (v["max_downsample"] - 1):
        raise UserError(f"{key('max_downsample')}={v['max_downsample']}: must be a power of two (1, 2, 4 or 8)")
    cell = v["sx"] * v["sy"]
    if cell < 2:
        raise UserError(f"{key('sx')}={v['sx']}, {key('sy')}={v['sy']}: the cell must hold at least 2 tokens")
    if v["mode"] == "tome" and ratio > 1 - 1 / cell + 1e-9:
        raise UserError(
            f"{key('ratio')}={ratio} with {key('sx')}={v['sx']}, {key('sy')}={v['sy']}: at most {1 - 1 / cell:g} of "
            f"the tokens are sources that can merge; lower the ratio or raise sx/sy"
        )
    merges = [v["merge_attn"], v["merge_crossattn"], v["merge_mlp"]]
    if not all(isinstance(b, bool) for b in merges):
        raise UserError(f"{key('merge_attn')}/{key('merge_crossattn')}/{key('merge_mlp')} must be true or false")
    if v["mode"] == "tome" and ratio > 0 and not any(merges):
        raise UserError(
            f"{key('merge_attn')}, {key('merge_crossattn')} and {key('merge_mlp')} are all off; nothing would be merged"
        )
