"""Fully sharded student (torch FSDP2 `fully_shard`) for `accelerate launch --config_file .../fsdp-full-shard.yaml`.

Only the student is sharded: its weights, quantizer ranges, gradients, optimizer state and EMA each live 1/N on
each of the N ranks (and a consistency run's target network, an average of the student, is sharded the same way,
unit for unit, so that its update is a shard-local lerp). The frozen teacher, VAE and text encoders stay whole on every rank (they take no gradients
and are also called outside the student's forward). accelerate's own FSDP route would shard the whole `QATModel`
instead, and on the CPU it is not taken at all (accelerate only turns FSDP on for GPU-like devices; on the CPU
the run silently became DDP), so the sharding is done here and accelerate is told not to:
`ACCELERATE_USE_FSDP` is cleared before the Trainer builds its Accelerator, and `QATTrainer` trains the model
without DDP around it.

FSDP1 (`fsdp_version: 1`) cannot wrap an NNCF model: its flat parameters need one dtype per group and NNCF keeps
int32 parameters (bit widths) beside the float ones ("Must flatten tensors with uniform dtype but got torch.float32
and torch.int32"). FSDP2 shards each parameter on its own and has no such limit.

What it honours of the accelerate config (`fsdp_config`): `fsdp_version` (2), `fsdp_reshard_after_forward`
(FULL_SHARD / true, SHARD_GRAD_OP / false) and `fsdp_transformer_layer_cls_to_wrap` (default
ResnetBlock2D,BasicTransformerBlock: one all-gather unit per block, plus the rest of the UNet and NNCF's quantizer
parameters in the root unit). Parameter offload and FSDP activation checkpointing are refused
(`gradient_checkpointing: true` is the project's own).
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from torch import nn

from ..errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")


def requested() -> bool:
    """True under `accelerate launch` with `distributed_type: FSDP` (accelerate exports ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _settings() -> tuple[bool, tuple[str, ...]]:
    env = os.environ
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise UserError(
            f"fsdp_version {version}: use fsdp_version 2 (FSDP1 cannot flatten NNCF's int32 quantizer parameters "
            "together with the float weights); see ov_sd_trainer/recipes/accelerate/fsdp-full-shard.yaml"
        )
    for key in ("FSDP_OFFLOAD_PARAMS", "FSDP_ACTIVATION_CHECKPOINTING"):
        if env.get(key, "false").lower() == "true":
            raise UserError(f"{key.lower()} is not supported for the student; use gradient_checkpointing: true")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").upper() not in ("FALSE", "SHARD_GRAD_OP", "NO_RESHARD")
    names = tuple(n.strip() for n in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip())
    return reshard, names or DEFAULT_BLOCKS


def _fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(module: nn.Module) -> bool:
    return bool(_fsdp_modules(module))


def reshard(module: nn.Module) -> None:
    """Put every FSDP unit of `module` back in its sharded state: FSDP2 leaves the root unit gathered after a
    forward without backward (an evaluation), and then `named_parameters` would return the gathered tensors."""
    for m in _fsdp_modules(module):
        m.reshard()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter (a view: writing to it writes the parameter); `t` if not sharded."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def shard_of(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of `whole`, shaped like `param`'s local shard (`whole` itself if `param` is not sharded)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return whole
    # src_data_rank=None: every rank cuts its own shard from its own copy, no communication
    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements, src_data_rank=None).to_local()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every rank must call it); `t` if not sharded."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class ShardedStudent:
    """Shards a student in place and gathers it back for checkpoints and the export.

    The main process keeps an unsharded copy in CPU RAM (`template`) into which `gathered` loads the full state,
    so that NNCF's config and the saving/export code see an ordinary quantized UNet."""

    def __init__(self, student: nn.Module, device: torch.device):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        reshard_after_forward, names = _settings()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.template = None
        if self.rank == 0:  # copied on the CPU: no second student on the accelerator, even briefly
            device_before = next(student.parameters()).device
            self.template = copy.deepcopy(student.to("cpu"))
            student.to(device_before)
        self.mesh = init_device_mesh(torch.device(device).type, (self.world_size,))
        self.reshard_after_forward, self.names = reshard_after_forward, names
        units = self.shard(student)
        params = list(student.parameters())
        self.info = {
            "strategy": "FSDP2 fully_shard of the student" + ("" if reshard_after_forward else " (SHARD_GRAD_OP)"),
            "units": units,
            "student_params": sum(p.numel() for p in params),
            "student_params_local": sum(local(p).numel() for p in params),  # this rank's
        }
        logger.info("FSDP: rank %d holds %d of the student's %d parameters (%d units)", self.rank,
                    self.info["student_params_local"], self.info["student_params"], self.info["units"])  # fmt: skip

    def shard(self, module: nn.Module) -> int:
        """Shard `module` (the student, or a copy of it such as a consistency run's target network) in place, unit by
        unit as the student is: its shards then line up with the student's. Returns the number of units."""
        from torch.distributed.fsdp import fully_shard

        blocks = [m for m in module.modules() if type(m).__name__ in self.names]
        if not blocks:
            raise UserError(f"fsdp_transformer_layer_cls_to_wrap {','.join(self.names)}: no such module in the UNet")
        for m in blocks:
            fully_shard(m, mesh=self.mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(module, mesh=self.mesh, reshard_after_forward=self.reshard_after_forward)
        return len(blocks) + 1

    def full_state_dict(self, student: nn.Module) -> dict[str, torch.Tensor]:
        """The student's whole state on the main process (CPU), {} elsewhere; a collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        reshard(student)
        return get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def gathered(self, student: nn.Module) -> nn.Module | None:
        """An unsharded quantized UNet equal to `student` (or to another module sharded by `shard`, such as the target
        network) on the main process (None elsewhere); a collective. It is the one `template`: the next call
        overwrites it."""
        state = self.full_state_dict(student)
        if self.template is None:
            return None
        self.template.load_state_dict(state, strict=True)
        return self.template

    @staticmethod
    @torch.no_grad()
    def load_from(student: nn.Module, plain: nn.Module) -> None:
        """Copy an unsharded quantized UNet (built by every rank, e.g. `quantize.load_quantized` of a checkpoint)
        into the sharded student: each rank keeps its shards.

        Tensor by tensor, not through `load_state_dict` (nor torch.distributed.checkpoint's `set_model_state_dict`):
        NNCF's quantizers re-read their bit width (`_num_bits.item()`) in a load hook, which fails on a rank whose
        shard of that one-element parameter is empty, and the alias names of shared quantizer tensors in a state
        dict are left as plain tensors by `set_model_state_dict` ("got mixed torch.Tensor and DTensor")."""
        reshard(student)
        source = dict(plain.named_parameters())
        source.update(plain.named_buffers())
        target = dict(student.named_parameters())
        target.update(student.named_buffers())
        if set(source) != set(target):
            raise RuntimeError(f"student mismatch: missing {sorted(set(target) - set(source))[:3]}, "
                               f"unexpected {sorted(set(source) - set(target))[:3]}")  # fmt: skip
        for name, t in target.items():
            dst = local(t)
            dst.copy_(shard_of(source[name].detach(), t).to(dst.device, dst.dtype))
