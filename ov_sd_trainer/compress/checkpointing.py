"""Gradient checkpointing through NNCF's hooks.

diffusers' own checkpointing breaks on an NNCF-quantized UNet ("A different number of tensors was saved during the
original forward and recomputation"): NNCF applies its quantizers through a `TorchFunctionMode` that is active only
inside the wrapped model's `forward`, and the recomputation runs outside it. `nncf_checkpoint` re-enters that mode,
positioned as it was, for the recomputation; outputs and gradients are then bit-identical to training without
checkpointing (tested in tests/compress/test_quantize.py).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from ..errors import UserError
from .quantize import unwrap_model


def _active_hook_mode():
    """The innermost NNCF FunctionHookMode on torch's function-mode stack, or None."""
    from nncf.torch.function_hook.hook_executor_mode import FunctionHookMode

    for mode in reversed(torch.overrides._get_current_function_mode_stack()):
        if isinstance(mode, FunctionHookMode):
            return mode
    return None


class _RecomputeInHookMode:
    """Recompute context: re-enters NNCF's FunctionHookMode for the same model and hook storage, positioned
    where the original forward was when the checkpoint was taken (module call stack and op-call counters;
    NNCF names each hooked op by module path + call counter, so both decide which hooks fire)."""

    def __init__(self, mode) -> None:
        self.model = mode.model
        self.hook_storage = mode.hook_storage
        self.module_call_stack = list(mode.module_call_stack)
        self.op_calls = dict(mode.op_calls)
        self.enabled = mode.enabled
        self._mode = None

    def __enter__(self):
        from nncf.torch.function_hook.hook_executor_mode import FunctionHookMode

        mode = FunctionHookMode(model=self.model, hook_storage=self.hook_storage)
        mode.__enter__()
        mode.module_call_stack = list(self.module_call_stack)
        mode.op_calls = defaultdict(int, self.op_calls)
        mode.enabled = self.enabled
        self._mode = mode
        return mode

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(exc_type, exc_val, exc_tb)


def nncf_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`torch.utils.checkpoint.checkpoint` (non-reentrant) whose recomputation runs NNCF's hooks as the original
    forward did. Without an active NNCF hook mode (an FP32 UNet) it is the ordinary non-reentrant checkpoint.
    Module-level (not a closure) so that deep copies of a model (EMA, teacher) stay correct."""
    from torch.utils.checkpoint import checkpoint, noop_context_fn

    mode = _active_hook_mode()
    if mode is None:
        context_fn = noop_context_fn
    else:
        recompute = _RecomputeInHookMode(mode)

        def context_fn():
            return contextlib.nullcontext(), recompute

    return checkpoint(function, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def enable_gradient_checkpointing(unet: torch.nn.Module) -> torch.nn.Module:
    """Turn on diffusers' gradient checkpointing with `nncf_checkpoint`; works for quantized and FP32 UNets."""
    model = unwrap_model(unet)
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise UserError(f"{type(model).__name__} does not support gradient checkpointing")
    model.enable_gradient_checkpointing(gradient_checkpointing_func=nncf_checkpoint)
    return unet


def disable_gradient_checkpointing(unet: torch.nn.Module) -> torch.nn.Module:
    """Turn diffusers' gradient checkpointing off again."""
    model = unwrap_model(unet)
    if getattr(model, "_supports_gradient_checkpointing", False):
        model.disable_gradient_checkpointing()
    return unet
