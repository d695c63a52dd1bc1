"""EMA of the student's trainable parameters, kept in CPU RAM, as a `TrainerCallback`.

With a sharded student (`fsdp.ShardedStudent`) each rank keeps the EMA of its own shards; `full_state` gathers
them for a checkpoint and `load` cuts a saved (whole) EMA back into this rank's shards.

The decay follows diffusers' `EMAModel.get_decay` exactly (warm-up `(1+s)/(10+s)` or the power
law, capped at `decay`). The 2023 reference workflow re-assigned `decay` every step, which made
its "EMA" a two-step average; here the decay only depends on the step count.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from ..run_folder import EMA_FILE
from . import fsdp


def ema_decay(step: int, decay: float, use_warmup: bool = False, power: float = 2 / 3, inv_gamma: float = 1.0,
              update_after_step: int = 0, min_decay: float = 0.0) -> float:  # fmt: skip
    """Decay for optimization step `step` (1-based), identical to diffusers' `EMAModel.get_decay`."""
    s = max(0, step - update_after_step - 1)
    if s <= 0:
        return 0.0
    value = 1 - (1 + s / inv_gamma) ** -power if use_warmup else (1 + s) / (10 + s)
    return max(min(value, decay), min_decay)


@torch.no_grad()
def copy_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], whole: bool = True):
    """Write `tensors` into `module`'s parameters: whole tensors (a file's), or with `whole=False` this rank's shards
    (an EMA's shadow) when `module` is sharded."""
    fsdp.reshard(module)
    params = dict(module.named_parameters())
    for name, s in tensors.items():
        p = params[name]
        if whole:
            s = fsdp.shard_of(s, p)
        target = fsdp.local(p)
        target.copy_(s.to(target.device, target.dtype))


class EMACallback(TrainerCallback):
    """fp32 shadow copies of `module`'s trainable parameters on `device` (default CPU).

    `on_step_end` runs after every optimizer step: shadow -= (1 - decay) * (shadow - param)."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.9999, device: str = "cpu", use_warmup: bool = False,
                 power: float = 2 / 3):  # fmt: skip
        self.module = module
        self.decay, self.device, self.use_warmup, self.power = decay, torch.device(device), use_warmup, power
        self.optimization_step = 0
        self.shadow: dict[str, torch.Tensor] = {
            n: fsdp.local(p).detach().to(self.device, torch.float32, copy=True) for n, p in self._params()
        }

    def _params(self):
        fsdp.reshard(self.module)  # sharded: the shards, never the gathered tensors of a forward
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def step(self):
        self.optimization_step += 1
        decay = ema_decay(self.optimization_step, self.decay, self.use_warmup, self.power)
        params = self._params()
        names = list(self.shadow)
        for name, (pname, p) in zip(names, params, strict=True):
            assert name == pname, f"EMA parameter order changed: {name} != {pname}"
            s = self.shadow[name]
            s.sub_((1 - decay) * (s - fsdp.local(p).detach().to(self.device, torch.float32)))

    def on_step_end(self, args, state, control, **kwargs):
        self.step()
        return control

    @contextlib.contextmanager
    def applied(self, module: torch.nn.Module | None = None):
        """Within the block the module holds the EMA weights; its own come back after (diffusers' store/copy_to/
        restore around validation)."""
        module = module or self.module
        names = set(self.shadow)
        fsdp.reshard(module)
        backup = {n: fsdp.local(p).detach().clone() for n, p in module.named_parameters() if n in names}
        self.copy_to(module)
        try:
            yield module
        finally:
            copy_into(module, backup, whole=False)

    def copy_to(self, module: torch.nn.Module | None = None):
        """Write the EMA weights into the module (the student by default)."""
        copy_into(module or self.module, self.shadow, whole=False)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole EMA tensors (on `device`); with a sharded module a collective that every rank must call."""
        from torch.distributed.tensor import DTensor

        params = dict(self._params())
        out = {}
        for name, s in self.shadow.items():
            p = params[name]
            if isinstance(p, DTensor):
                s = DTensor.from_local(s.to(p.device), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                       stride=p.stride()).full_tensor().to(self.device)  # fmt: skip
            out[name] = s
        return out

    def save(self, directory: str | Path, tensors: dict[str, torch.Tensor] | None = None):
        """Write the EMA (`tensors`: a `full_state` already gathered; by default the shadow of an unsharded module)."""
        tensors = self.shadow if tensors is None else tensors
        meta = {"optimization_step": str(self.optimization_step), "decay": str(self.decay)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(directory) / EMA_FILE), metadata=meta)

    def load(self, directory: str | Path):
        from safetensors import safe_open

        path = Path(directory) / EMA_FILE
        tensors = load_file(str(path), device=str(self.device))
        if set(tensors) != set(self.shadow):
            raise ValueError(f"{path} does not match the student's trainable parameters")
        params = dict(self._params())
        self.shadow = {k: fsdp.shard_of(tensors[k], params[k]).to(self.device, copy=True) for k in self.shadow}
        with safe_open(str(path), "pt") as f:
            self.optimization_step = int(f.metadata()["optimization_step"])
