"""Token merging for diffusers Stable Diffusion UNets that exports to OpenVINO and trains under NNCF QAT.

Two modes, both applied to the `BasicTransformerBlock`s of the UNet levels whose downsampling factor is at most
`max_downsample` (1: the highest-resolution level only, 5 of SD 1.5's 16 blocks; 2: 10 of 16):

* ``"tome"``: ToMe for SD (Bolya & Hoffman 2023, https://arxiv.org/abs/2303.17604), the algorithm of `tomesd`
  with ``use_rand=False``. Each sy x sx cell of the token grid gives its top-left token to the destination set
  (dst), the rest are sources (src); the ``floor(N * ratio)`` sources most cosine-similar to some dst token are
  averaged into it before the chosen sub-layers (self-attention, and optionally cross-attention and MLP) and copied
  back after them. Similarity is measured on the block input, once per block, and the same merge serves every
  sub-layer.
* ``"todo"``: token downsampling (ToDo, Smith et al. 2024, https://arxiv.org/abs/2402.13573): self-attention keys
  and values come from the sy x sx average-pooled tokens, queries and outputs keep all tokens. No matching at all
  (no TopK, no data-dependent indexing); removes ``1 - 1/(sx*sy)`` of the keys/values (75 % at 2 x 2) whatever
  the `ratio` (which only switches it on).

Why not `tomesd` itself: it draws the dst tokens with ``torch.randint`` (``use_rand``, on by default; a random op
in an exported graph), assembles the unmerged output with three scatters into a zero tensor, gathers with
``torch.gather`` over a fully expanded index (a [B, N, C] int64 tensor per gather), and computes its index
arithmetic with Python ``int``/``math.ceil`` on shapes, which freezes a traced graph to the traced resolution. Here
every step is a deterministic, shape-generic tensor op: the src/dst partition is integer arithmetic on
``arange``, gathers are row gathers (``index_select``) over [B*N, C], and the unmerge is a single gather through a
per-token "slot" index computed once per block. The graph converts with ``openvino.convert_model``, keeps
working when the IR is reshaped to another resolution, and the tensors that NNCF quantizes (the Linear inputs of
the attention, now on merged tokens) are ordinary activations.

Patching swaps the class of each chosen block to `ToMeBasicTransformerBlock` (a module-level subclass, so
``copy.deepcopy``, pickling and NNCF's wrapping keep working) and adds a forward pre-hook to its
`Transformer2DModel` that records the token grid size. No module is added or renamed, so parameter and NNCF
node names stay those of the plain UNet. `remove_tome` undoes it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from .quantize import HOOK_STORAGE_ATTR, unwrap_model
from .tome_config import TomeConfig

_CONFIG_ATTR = "_tome"  # on a patched block: its TomeConfig
_HW_ATTR = "_tome_hw"  # on a patched block: (h, w) of the token grid, set by the parent's pre-hook each forward
_HOOK_ATTR = "_tome_hook_id"  # on a patched Transformer2DModel: the id of its pre-hook


# --------------------------------------------------------------------------------------------------------------------
# The merge itself (shape-generic, deterministic tensor ops: works eagerly, under NNCF's hooks and when traced)
# --------------------------------------------------------------------------------------------------------------------


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _hidden_from_nncf():
    """Context in which NNCF's function hooks do not see the ops (nncf.torch.disable_tracing's context).

    The matching (similarity matmul, max, argsort, index arithmetic) only decides which tokens merge: it must
    not get quantizers (8-bit similarities tie, and ties would make PyTorch and OpenVINO merge differently) nor
    shift the op counters by which NNCF names the quantized ops. The merge and unmerge themselves stay visible."""
    import contextlib
    import sys

    if "nncf.torch.function_hook.hook_executor_mode" not in sys.modules:  # NNCF not loaded: no hooks to hide from
        return contextlib.nullcontext()
    from nncf.torch.function_hook.hook_executor_mode import disable_function_hook_mode

    return disable_function_hook_mode()


def _fraction(ratio: float) -> tuple[int, int]:
    """ratio as p/q, so that r = floor(N * ratio) is exact integer arithmetic on (possibly traced) sizes."""
    f = Fraction(ratio).limit_denominator(10_000)
    return f.numerator, f.denominator


def partition(h, w, sx: int, sy: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raster indices (a_pos: src tokens, b_pos: dst tokens) of an h x w token grid.

    dst = the top-left token of every full sy x sx cell (tomesd with use_rand=False); src = every other token
    (also the rows/columns left over when sy/sx do not divide h/w). Both lists are in raster order. Only integer
    ops on `arange`: `h`, `w` may be traced sizes, and the result is a constant once the shapes are static."""
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    row_dst = (rows % sy == 0) & (rows < (h // sy) * sy)
    col_dst = (cols % sx == 0) & (cols < (w // sx) * sx)
    is_dst = (row_dst[:, None] & col_dst[None, :]).reshape(-1).long()
    n = is_dst.shape[0]
    # Unique keys: src tokens first, dst tokens after, each in raster order (no reliance on a stable sort).
    order = torch.argsort(is_dst * n + torch.arange(n, device=device))
    num_dst = (h // sy) * (w // sx)
    return order[: n - num_dst], order[n - num_dst :]


def _rows(x_flat: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x_flat [B*N, C], index [B, K] (per-sample token index), offsets [B, 1] = b*N -> [B, K, C] (one row Gather)."""
    batch = index.shape[0]
    return x_flat.index_select(0, (index + offsets).reshape(-1)).reshape(batch, -1, x_flat.shape[-1])


def bipartite_soft_matching(
    metric: torch.Tensor, h, w, sx: int, sy: int, ratio: float
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """ToMe for SD's bipartite soft matching with fixed (top-left) dst tokens; returns (merge, unmerge).

    metric: [B, N, C] with N = h*w (the block input). merge: [B, N, C'] -> [B, N - r, C'] with
    r = floor(N * ratio): each of the r src tokens most similar (cosine) to a dst token is averaged into that dst
    token; output order [unmerged src | dst]. unmerge: [B, N - r, C'] -> [B, N, C'] gives every token the value of
    the merged token it went into. The same merged token sets as
    `tomesd.merge.bipartite_soft_matching_random2d(no_rand=True)` (tomesd orders the unmerged tokens differently).
    """
    batch, n, _ = metric.shape
    p, q = _fraction(ratio)
    r = n * p // q
    device = metric.device
    with torch.no_grad(), _hidden_from_nncf():
        a_pos, b_pos = partition(h, w, sx, sy, device)
        num_src, num_dst = a_pos.shape[0], b_pos.shape[0]
        m = metric / metric.norm(dim=-1, keepdim=True)
        scores = m.index_select(1, a_pos) @ m.index_select(1, b_pos).transpose(-1, -2)  # [B, Na, Nd]
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)  # most similar src first
        src_idx = edge_idx[:, :r]  # merged into a dst token
        unm_idx = edge_idx[:, r:]  # kept as they are
        dst_idx = node_idx.gather(1, src_idx)  # [B, r]: which dst token each merged src joins
        batch_ids = torch.arange(batch, device=device).unsqueeze(1)
        # Row indices into the flattened [B*N, C] input: one Gather per token set, no expanded [B, K, C] index.
        unm_rows = (a_pos[unm_idx] + batch_ids * n).reshape(-1)
        src_rows = (a_pos[src_idx] + batch_ids * n).reshape(-1)
        dst_rows = (dst_idx + batch_ids * num_dst).reshape(-1)  # into the flattened [B*Nd, C] dst tokens
        # Tokens per dst after merging (1 + its sources): the mean's divisor, shared by every merge of the block.
        count = torch.ones(batch * num_dst, 1, dtype=metric.dtype, device=device)
        count.index_put_((dst_rows,), torch.ones_like(dst_rows, dtype=metric.dtype).unsqueeze(1), accumulate=True)
        # slot[b, t]: where token t lives in the merged sequence [unm | dst]; unmerge is one Gather through it.
        num_unm = num_src - r
        positions = torch.cat([a_pos[unm_idx], a_pos[src_idx], b_pos.unsqueeze(0).expand(batch, -1)], dim=1)
        slots = torch.cat(
            [
                torch.arange(num_unm, device=device).unsqueeze(0).expand(batch, -1),
                dst_idx + num_unm,
                torch.arange(num_dst, device=device).unsqueeze(0).expand(batch, -1) + num_unm,
            ],
            dim=1,
        )
        slot = torch.zeros_like(positions).scatter(1, positions, slots)
        slot_rows = (slot + batch_ids * (n - r)).reshape(-1)

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        x_flat = x.reshape(-1, c)
        unm = x_flat.index_select(0, unm_rows).reshape(batch, -1, c)
        dst = x.index_select(1, b_pos).reshape(-1, c)
        # Row scatter-add (OpenVINO: ScatterNDUpdate, reduction sum); a scatter_reduce("mean") over an expanded
        # [B, r, C] index becomes a ScatterElementsUpdate that measured ~60x slower on the CPU.
        dst.index_put_((dst_rows,), x_flat.index_select(0, src_rows), accumulate=True)  # in place: dst is fresh
        dst = dst / count
        return torch.cat([unm, dst.reshape(batch, -1, c)], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        return x.reshape(-1, c).index_select(0, slot_rows).reshape(batch, -1, c)

    return merge, unmerge


def downsample_tokens(x: torch.Tensor, h, w, sx: int, sy: int) -> torch.Tensor:
    """ToDo's key/value tokens: [B, h*w, C] -> [B, ceil(h/sy)*ceil(w/sx), C], each the mean of its sy x sx cell
    (partial cells at the right/bottom edge average the tokens they have)."""
    batch, _, c = x.shape
    grid = x.transpose(1, 2).reshape(batch, c, h, w)
    pooled = F.avg_pool2d(grid, kernel_size=(sy, sx), stride=(sy, sx), ceil_mode=True)
    return pooled.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------------------------------
# The patched block
# --------------------------------------------------------------------------------------------------------------------


def _block_class():
    from diffusers.models.attention import BasicTransformerBlock

    return BasicTransformerBlock


def _make_block_class():
    from diffusers.models.attention import BasicTransformerBlock, _chunked_feed_forward

    class ToMeBasicTransformerBlock(BasicTransformerBlock):
        """`BasicTransformerBlock` with token merging ("tome") or key/value downsampling ("todo") around its
        sub-layers, for the SD layout (layer norms, self-attention, cross-attention, feed-forward). The call
        signature and output are the parent's; with ratio 0 it runs the parent's forward unchanged."""

        def forward(
            self,
            hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            encoder_hidden_states: torch.Tensor | None = None,
            encoder_attention_mask: torch.Tensor | None = None,
            timestep: torch.LongTensor | None = None,
            cross_attention_kwargs: dict[str, Any] | None = None,
            class_labels: torch.LongTensor | None = None,
            added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        ) -> torch.Tensor:
            cfg: TomeConfig = getattr(self, _CONFIG_ATTR)
            hw = getattr(self, _HW_ATTR, None)
            if not cfg.active or hw is None:  # ratio 0, or called outside its Transformer2DModel: exact block
                return super().forward(
                    hidden_states,
                    attention_mask=attention_mask,
                    encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=encoder_attention_mask,
                    timestep=timestep,
                    cross_attention_kwargs=cross_attention_kwargs,
                    class_labels=class_labels,
                    added_cond_kwargs=added_cond_kwargs,
                )
            h, w = hw
            kwargs = dict(cross_attention_kwargs or {})
            m_a = u_a = m_c = u_c = m_m = u_m = _identity
            if cfg.mode == "tome":
                merge, unmerge = bipartite_soft_matching(hidden_states, h, w, cfg.sx, cfg.sy, cfg.ratio)
                if cfg.merge_attn:
                    m_a, u_a = merge, unmerge
                if cfg.merge_crossattn:
                    m_c, u_c = merge, unmerge
                if cfg.merge_mlp:
                    m_m, u_m = merge, unmerge

            # 1. self-attention
            norm_hidden_states = self.norm1(hidden_states)
            if cfg.mode == "todo":
                kv = downsample_tokens(norm_hidden_states, h, w, cfg.sx, cfg.sy)
                attn_output = self.attn1(
                    norm_hidden_states, encoder_hidden_states=kv, attention_mask=attention_mask, **kwargs
                )
            else:
                attn_output = u_a(self.attn1(m_a(norm_hidden_states), attention_mask=attention_mask, **kwargs))
            hidden_states = attn_output + hidden_states
            if hidden_states.ndim == 4:
                hidden_states = hidden_states.squeeze(1)
            # 2. cross-attention
            if self.attn2 is not None:
                norm_hidden_states = self.norm2(hidden_states)
                attn_output = self.attn2(
                    m_c(norm_hidden_states),
                    encoder_hidden_states=encoder_hidden_states,
                    attention_mask=encoder_attention_mask,
                    **kwargs,
                )
                hidden_states = u_c(attn_output) + hidden_states
            # 3. feed-forward
            norm_hidden_states = m_m(self.norm3(hidden_states))
            if self._chunk_size is not None:
                ff_output = _chunked_feed_forward(self.ff, norm_hidden_states, self._chunk_dim, self._chunk_size)
            else:
                ff_output = self.ff(norm_hidden_states)
            hidden_states = u_m(ff_output) + hidden_states
            if hidden_states.ndim == 4:
                hidden_states = hidden_states.squeeze(1)
            return hidden_states

    ToMeBasicTransformerBlock.__module__ = __name__
    ToMeBasicTransformerBlock.__qualname__ = "ToMeBasicTransformerBlock"
    return ToMeBasicTransformerBlock


def __getattr__(name: str):
    # The block class subclasses diffusers' BasicTransformerBlock; build it on first use so that importing this
    # module (e.g. from config.py) does not import diffusers.
    if name == "ToMeBasicTransformerBlock":
        cls = _make_block_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _record_grid_size(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a patched Transformer2DModel: its input is [B, C, h, w]; tell its blocks (h, w).

    A module-level function that finds the blocks through `module`, so deep copies of the UNet stay correct."""
    hidden_states = args[0] if args else kwargs["hidden_states"]
    hw = (hidden_states.shape[-2], hidden_states.shape[-1])
    for block in module.transformer_blocks:
        if hasattr(block, _CONFIG_ATTR):
            setattr(block, _HW_ATTR, hw)


# --------------------------------------------------------------------------------------------------------------------
# apply / remove
# --------------------------------------------------------------------------------------------------------------------


def _unet_of(model: torch.nn.Module) -> torch.nn.Module:
    """The UNet under DDP / torch.compile wrappers (quantization's rule), or a pipeline's UNet."""
    model = unwrap_model(model)
    if hasattr(model, "unet") and isinstance(model.unet, torch.nn.Module):  # a pipeline
        model = unwrap_model(model.unet)
    return model


def transformer_levels(unet: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(downsampling factor, Transformer2DModel) for every attention module of a diffusers UNet2DConditionModel,
    from its structure: each down block but the last halves the resolution, each up block but the last doubles."""
    if not all(hasattr(unet, a) for a in ("down_blocks", "up_blocks")):
        raise UserError(
            f"token merging needs a diffusers UNet2DConditionModel (with down_blocks/up_blocks), "
            f"got {type(unet).__name__}"
        )
    levels = []
    factor = 1
    for block in unet.down_blocks:
        levels += [(factor, a) for a in getattr(block, "attentions", None) or []]
        if getattr(block, "downsamplers", None):
            factor *= 2
    if unet.mid_block is not None:
        levels += [(factor, a) for a in getattr(unet.mid_block, "attentions", None) or []]
    for block in unet.up_blocks:
        levels += [(factor, a) for a in getattr(block, "attentions", None) or []]
        if getattr(block, "upsamplers", None):
            factor //= 2
    return levels


def _check_block(block, where: str) -> None:
    """The patched forward implements the SD layout only; anything else would be silently wrong."""
    problems = []
    if getattr(block, "norm_type", "layer_norm") != "layer_norm":
        problems.append(f"norm_type={block.norm_type!r}")
    if getattr(block, "pos_embed", None) is not None:
        problems.append("positional embeddings")
    if getattr(block, "only_cross_attention", False):
        problems.append("only_cross_attention")
    if hasattr(block, "fuser"):
        problems.append("GLIGEN fuser")
    if problems:
        raise UserError(f"token merging supports SD's transformer blocks only; {where} has {', '.join(problems)}")


def _check_not_quantized(model: torch.nn.Module, action: str) -> None:
    """NNCF names its quantizers by the traced graph; changing the graph under them would misplace them silently."""
    if getattr(model, HOOK_STORAGE_ATTR, None) is not None:
        raise UserError(
            f"cannot {action} token merging on an NNCF-quantized UNet; apply it to the FP32 UNet, then quantize "
            "(or load the quantized checkpoint onto a merged FP32 UNet)"
        )


def tome_config(unet: torch.nn.Module) -> TomeConfig | None:
    """The TomeConfig a UNet is patched with, or None."""
    for module in _unet_of(unet).modules():
        cfg = getattr(module, _CONFIG_ATTR, None)
        if isinstance(cfg, TomeConfig):
            return cfg
    return None


def is_patched(unet: torch.nn.Module) -> bool:
    return tome_config(unet) is not None


def apply_tome(
    unet: torch.nn.Module,
    ratio: float = 0.4,
    max_downsample: int = 1,
    sx: int = 2,
    sy: int = 2,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    mode: str = "tome",
) -> torch.nn.Module:
    """Patch `unet` (a diffusers UNet2DConditionModel, or a pipeline holding one) in place; returns it.

    See `TomeConfig` for the arguments. A UNet that is already patched is re-patched with the new settings.
    Patch the FP32 UNet before NNCF quantizes it (the quantizers then sit on the merged tokens); the UNet's
    forward signature and outputs are unchanged."""
    cfg = TomeConfig(ratio, max_downsample, sx, sy, merge_attn, merge_crossattn, merge_mlp, mode)
    return apply_tome_config(unet, cfg)


def apply_tome_config(unet: torch.nn.Module, cfg: TomeConfig) -> torch.nn.Module:
    """`apply_tome` with a `TomeConfig`."""
    from . import tome as this

    model = _unet_of(unet)
    _check_not_quantized(model, "apply")
    levels = transformer_levels(model)
    block_cls = _block_class()
    chosen = [(f, t) for f, t in levels if f <= cfg.max_downsample]
    if not chosen:
        raise UserError(
            f"tome max_downsample={cfg.max_downsample}: no transformer blocks at that resolution in this UNet "
            f"(its attention levels: {sorted({f for f, _ in levels})})"
        )
    remove_tome(model)
    tome_cls = this.ToMeBasicTransformerBlock
    for factor, transformer in chosen:
        blocks = list(transformer.transformer_blocks)
        for i, block in enumerate(blocks):
            if type(block) is not block_cls:
                raise UserError(f"token merging expects diffusers BasicTransformerBlocks, found {type(block).__name__}")
            _check_block(block, f"transformer block {i} at downsampling {factor}")
        for block in blocks:
            block.__class__ = tome_cls
            setattr(block, _CONFIG_ATTR, cfg)
            setattr(block, _HW_ATTR, None)
        handle = transformer.register_forward_pre_hook(_record_grid_size, with_kwargs=True)
        setattr(transformer, _HOOK_ATTR, handle.id)
    return unet


def remove_tome(unet: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply_tome` exactly (blocks get their class back, hooks and attributes go); no-op if not patched."""
    from . import tome as this

    model = _unet_of(unet)
    if is_patched(model):
        _check_not_quantized(model, "remove")
    block_cls = _block_class()
    tome_cls = this.ToMeBasicTransformerBlock
    for module in model.modules():
        hook_id = getattr(module, _HOOK_ATTR, None)
        if hook_id is not None:
            module._forward_pre_hooks.pop(hook_id, None)
            module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
            delattr(module, _HOOK_ATTR)
        if type(module) is tome_cls:
            module.__class__ = block_cls
        for attr in (_CONFIG_ATTR, _HW_ATTR):
            if attr in module.__dict__:
                delattr(module, attr)
    return unet
