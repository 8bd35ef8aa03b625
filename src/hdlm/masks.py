"""Attention masks from cell metadata (paper §3.3, App. B.3-B.4, Fig. 6-10; DESIGN.md §5).

A forward pass runs over *cells*. A cell has an input position p (−1 for SHIFTED's BOS), a
segment (0 = clean/settled, k ≥ 1 = noisy interval k) and, for noisy cells, the first target
position j of its interval. A cell with input p predicts position p + shift (shift = 0 ALIGNED,
1 SHIFTED). Whether query cell q may attend to key cell k is a pure function of their metadata:

- clean q, clean k: token-causal p_k ≤ p_q, or block-causal blk(p_k) ≤ blk(p_q) with
  blk(p) = ⌊(p + shift)/ω⌋, the block of the position the cell predicts;
- noisy q, clean k: p_k < j_q − shift (the settled prefix before the interval; in SHIFTED the
  interval's own first cell repeats the last settled token);
- noisy q, noisy k: same segment (dense within the interval);
- clean q, noisy k: never.

That one rule is written once, as a FlexAttention ``mask_mod``, over a query layout and a key
layout (key layout = cached cells ⁀ new cells, cached cells being clean). Every backend is
derived from it: :func:`dense_mask` evaluates it on index grids (SDPA, any device),
:func:`flex_block_mask` hands it to FlexAttention (CUDA), :func:`naive_attention` is the
explicit-softmax reference used by tests. Built masks are kept in a small LRU cache keyed by
the layouts' contents, so a sampler or trainer does not rebuild them every step.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .errors import HDLMError
from .sparse_attention import TILE, BlockSparseMask, plan

SETTLED_ATTENTION = ("causal", "block")

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class CellLayout:
    """Metadata of the L cells of a forward pass, shared by the whole batch.

    ``pos``, ``seg``, ``start`` are 1-D LongTensors of length L (see the module docstring);
    ``start`` is ignored for clean cells. ``shift`` is 0 (ALIGNED) or 1 (SHIFTED);
    ``settled_attention`` is "causal" (token-causal) or "block" (block-causal with width
    ``block_width`` = ω) and must be the same at training and inference.
    """

    pos: Tensor
    seg: Tensor
    start: Tensor
    shift: int = 0
    settled_attention: str = "causal"
    block_width: int = 1

    def __post_init__(self) -> None:
        n = self.pos.shape
        if self.pos.dim() != 1 or self.seg.shape != n or self.start.shape != n:
            raise ValueError(f"CellLayout: pos/seg/start must be 1-D of equal length, got "
                             f"{tuple(self.pos.shape)}, {tuple(self.seg.shape)}, {tuple(self.start.shape)}")
        if self.shift not in (0, 1):
            raise ValueError(f"CellLayout: shift must be 0 or 1, got {self.shift}")
        if self.settled_attention not in SETTLED_ATTENTION:
            raise HDLMError(f"settled_attention = {self.settled_attention!r}: must be causal or block")
        if self.block_width < 1:
            raise HDLMError(f"block_width = {self.block_width}: must be >= 1")

    def __len__(self) -> int:
        return self.pos.shape[0]

    @property
    def device(self) -> torch.device:
        return self.pos.device

    @property
    def is_clean(self) -> Tensor:
        return self.seg == 0

    @property
    def target(self) -> Tensor:
        """Position each cell predicts, p + shift."""
        return self.pos + self.shift

    def __getitem__(self, index: slice | Tensor) -> "CellLayout":
        """The cells at ``index`` (a slice or an index tensor), e.g. a chunk to commit to a KV cache."""
        return CellLayout(self.pos[index], self.seg[index], self.start[index], *self.settings())

    def to(self, device: Any) -> "CellLayout":
        return CellLayout(self.pos.to(device), self.seg.to(device), self.start.to(device),
                          self.shift, self.settled_attention, self.block_width)

    def settings(self) -> tuple[int, str, int]:
        return self.shift, self.settled_attention, self.block_width


# --------------------------------------------------------------------------------------------
# building layouts


def clean_layout(n: int, shift: int, *, settled_attention: str = "causal", block_width: int = 1,
                 device: Any = None) -> CellLayout:
    """The n clean cells predicting positions 0..n−1: inputs p = −shift .. n−1−shift."""
    pos = torch.arange(-shift, n - shift, dtype=torch.long, device=device)
    zeros = torch.zeros_like(pos)
    return CellLayout(pos, zeros, zeros.clone(), shift, settled_attention, block_width)


def interval_layout(start: int, end: int, seg: int, shift: int, *, settled_attention: str = "causal",
                    block_width: int = 1, device: Any = None) -> CellLayout:
    """The noisy cells of one interval with targets [start, end), as segment ``seg`` ≥ 1.

    Inputs are p ∈ [start − shift, end): in SHIFTED the first cell repeats the last settled
    token (or BOS) and the last cell's output predicts ``end`` and is dropped by the caller
    (App. B.3, Fig. 9-10).
    """
    if seg < 1:
        raise ValueError(f"interval_layout: a noisy segment must be >= 1, got {seg}")
    if not 0 <= start <= end:
        raise ValueError(f"interval_layout: need 0 <= start <= end, got [{start}, {end})")
    pos = torch.arange(start - shift, end, dtype=torch.long, device=device)
    return CellLayout(pos, torch.full_like(pos, seg), torch.full_like(pos, start),
                      shift, settled_attention, block_width)


def concat_layouts(*layouts: CellLayout) -> CellLayout:
    """Cells of several layouts, one after the other (e.g. cached cells ⁀ new cells)."""
    if not layouts:
        raise ValueError("concat_layouts: need at least one layout")
    settings = {lay.settings() for lay in layouts}
    if len(settings) != 1:
        raise ValueError(f"concat_layouts: layouts disagree on (shift, settled_attention, block_width): {settings}")
    first = layouts[0]
    return CellLayout(torch.cat([lay.pos for lay in layouts]), torch.cat([lay.seg for lay in layouts]),
                      torch.cat([lay.start for lay in layouts]), *first.settings())


def inference_layout(settled_end: int, active_end: int, shift: int, d: int, *,
                     settled_attention: str = "causal", block_width: int = 1,
                     device: Any = None) -> CellLayout:
    """Cells of one generation step (Eq. 1, App. B.4): the clean cells of the settled prefix
    [0, settled_end) followed by one noisy interval (segment 1) for the active window
    [settled_end, active_end), with inputs p ∈ [settled_end − shift, active_end).

    With a KV cache the clean cells are the cached ones and only the interval is run.
    """
    if not 0 <= settled_end <= active_end <= d:
        raise HDLMError(f"inference layout: need 0 <= settled_end <= active_end <= d, "
                        f"got settled_end={settled_end}, active_end={active_end}, d={d}")
    kw = dict(settled_attention=settled_attention, block_width=block_width, device=device)
    return concat_layouts(clean_layout(settled_end, shift, **kw),
                          interval_layout(settled_end, active_end, 1, shift, **kw))


# --------------------------------------------------------------------------------------------
# the rule


def _settled_key(layout: CellLayout) -> Tensor:
    """Order key of the settled rule: p (token-causal) or blk(p) = ⌊(p + shift)/ω⌋ (block-causal)."""
    if layout.settled_attention == "causal":
        return layout.pos
    return torch.div(layout.pos + layout.shift, layout.block_width, rounding_mode="floor")


def mask_mod_from(q_layout: CellLayout, kv_layout: CellLayout) -> MaskMod:
    """The attention rule as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

    Only indexes precomputed tensors (vmap-able, no Python branching on tensor values); the
    layout is shared by the batch and all heads, so ``b`` and ``h`` are ignored.
    """
    if q_layout.settings() != kv_layout.settings():
        raise ValueError(f"mask_mod_from: query and key layouts disagree: {q_layout.settings()} "
                         f"vs {kv_layout.settings()}")
    if q_layout.device != kv_layout.device:
        raise ValueError("mask_mod_from: query and key layouts are on different devices")
    q_clean, k_clean = q_layout.is_clean, kv_layout.is_clean
    q_order, k_order = _settled_key(q_layout), _settled_key(kv_layout)
    q_prefix_end = q_layout.start - q_layout.shift  # a noisy query sees clean keys with p < j − shift
    q_seg, k_seg, k_pos = q_layout.seg, kv_layout.seg, kv_layout.pos

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qc, kc = q_clean[q_idx], k_clean[kv_idx]
        clean_clean = qc & kc & (k_order[kv_idx] <= q_order[q_idx])
        noisy_clean = ~qc & kc & (k_pos[kv_idx] < q_prefix_end[q_idx])
        noisy_noisy = ~qc & ~kc & (k_seg[kv_idx] == q_seg[q_idx])
        return clean_clean | noisy_clean | noisy_noisy

    return mask_mod


# --------------------------------------------------------------------------------------------
# backends, with an LRU cache keyed by the layouts' contents


class _LRU:
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.data: OrderedDict = OrderedDict()

    def get(self, key: Any) -> Any:
        value = self.data.get(key)
        if value is not None:
            self.data.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.maxsize:
            self.data.popitem(last=False)


_MASK_CACHE = _LRU(maxsize=64)


def _layout_key(layout: CellLayout) -> tuple:
    meta = torch.stack([layout.pos, layout.seg, layout.start]).cpu()
    return (len(layout), meta.numpy().tobytes(), layout.settings())


def dense_mask(q_layout: CellLayout, kv_layout: CellLayout | None = None, device: Any = None) -> Tensor:
    """Boolean mask (Lq, Lkv), True = may attend, for SDPA: the mask_mod on index grids.

    ``kv_layout`` defaults to ``q_layout`` (no cache). The result is cached and shared: do not
    modify it in place.
    """
    kv_layout = q_layout if kv_layout is None else kv_layout
    device = torch.device(device) if device is not None else q_layout.device
    key = ("dense", _layout_key(q_layout), _layout_key(kv_layout), str(device))
    mask = _MASK_CACHE.get(key)
    if mask is None:
        q_l, kv_l = q_layout.to(device), kv_layout.to(device)
        qi = torch.arange(len(q_l), device=device)[:, None]
        ki = torch.arange(len(kv_l), device=device)[None, :]
        zero = torch.zeros((), dtype=torch.long, device=device)
        mask = mask_mod_from(q_l, kv_l)(zero, zero, qi, ki)
        _MASK_CACHE.put(key, mask)
    return mask


def block_sparse_mask(q_layout: CellLayout, kv_layout: CellLayout | None = None, device: Any = None,
                      tile: int = TILE) -> BlockSparseMask:
    """The same rule as :func:`dense_mask`, planned into query tiles for block-sparse attention
    (:mod:`hdlm.sparse_attention`; tiles never straddle a segment of the query layout). Cached like it."""
    kv_layout = q_layout if kv_layout is None else kv_layout
    device = torch.device(device) if device is not None else q_layout.device
    key = ("sparse", _layout_key(q_layout), _layout_key(kv_layout), str(device), tile)
    planned = _MASK_CACHE.get(key)
    if planned is None:
        planned = plan(dense_mask(q_layout, kv_layout, device), q_layout.seg, tile)
        _MASK_CACHE.put(key, planned)
    return planned


def flex_block_mask(q_layout: CellLayout, kv_layout: CellLayout | None = None, device: Any = None,
                    block_size: int = 128) -> Any:
    """FlexAttention ``BlockMask`` of the same rule (torch.nn.attention.flex_attention, imported lazily),
    on ``device`` (default: the layouts' device; CUDA for the fused kernel, CPU runs forward-only)."""
    from torch.nn.attention.flex_attention import create_block_mask

    kv_layout = q_layout if kv_layout is None else kv_layout
    device = torch.device(device) if device is not None else q_layout.device
    key = ("flex", _layout_key(q_layout), _layout_key(kv_layout), str(device), block_size)
    block_mask = _MASK_CACHE.get(key)
    if block_mask is None:
        q_l, kv_l = q_layout.to(device), kv_layout.to(device)
        block_mask = create_block_mask(mask_mod_from(q_l, kv_l), B=None, H=None, Q_LEN=len(q_l),
                                       KV_LEN=len(kv_l), device=device, BLOCK_SIZE=block_size)
        _MASK_CACHE.put(key, block_mask)
    return block_mask


_FLEX_FN: dict[str, Callable] = {}


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: Any, **kwargs: Any) -> Tensor:
    """FlexAttention with ``block_mask``: compiled on CUDA (the fused kernel), eager elsewhere.

    ``kwargs`` go to FlexAttention (e.g. ``scale``, ``enable_gqa`` for an HF backbone's attention).

    Errors are never swallowed: a compiled call whose exception was caught can silently fall
    back to a slow path for later shapes (DESIGN.md §9).
    """
    from torch.nn.attention.flex_attention import flex_attention as _flex

    kind = q.device.type
    if kind not in _FLEX_FN:
        _FLEX_FN[kind] = torch.compile(_flex, dynamic=False) if kind == "cuda" else _flex
    return _FLEX_FN[kind](q, k, v, block_mask=block_mask, **kwargs)


def naive_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Reference attention softmax(q kᵀ/√D + log mask) v with an explicit softmax (tests).

    q (…, Lq, D), k and v (…, Lkv, D), mask bool broadcastable to (…, Lq, Lkv). A query that
    may attend to nothing gets a zero output.
    """
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
    weights = torch.exp(scores - peak)
    total = weights.sum(dim=-1, keepdim=True)
    return (weights / total.clamp_min(torch.finfo(scores.dtype).tiny)) @ v


#: The name used in docs/architecture.md for the rule.
mask_mod = mask_mod_from
