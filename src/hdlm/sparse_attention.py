"""Block-sparse attention over the cell layouts, on every device (issue #16.2; App. B.3, Fig. 7-10).

The efficient training layout (clean stream of d cells ⁀ one noisy copy per interval) has (2d)²
query-key pairs of which about a quarter may attend: the clean stream is (block-)causal and each
noisy interval sees only its prefix and itself. Dense SDPA with a boolean mask does all (2d)².

Here the boolean mask (:func:`hdlm.masks.dense_mask`, the one rule ``mask_mod_from`` on index
grids, stays the source of truth) is planned once per layout: the query cells are cut into tiles
of at most :data:`TILE` rows that never straddle a segment (the clean stream, one interval), and
each tile keeps only the key cells that one of its queries may attend. Attention then runs per
tile, SDPA over the gathered keys with the tile's sub-mask (none where all of it is allowed).
Exact: a dropped key has weight exp(−∞) = 0 in the dense softmax, so only the summation order
changes; autograd runs through the gathers, so training (backward) works unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import HDLMError

#: Query rows per tile: the causal clean stream wastes about TILE²/2 pairs per tile on its
#: diagonal, and each tile is one SDPA call forward and backward.
TILE = 128
#: ``auto`` uses the block-sparse path only from this many query cells on ...
MIN_CELLS = 512
#: ... and when at most this fraction of the (Lq, Lkv) pairs is computed (bench/RESULTS.md: the
#: efficient layout at 27-34% gains, one interval at 60-65% loses a little to the per-tile calls).
MAX_FRACTION = 0.5
#: Environment switch: ``auto`` (default), ``dense`` (always the dense SDPA), ``sparse`` (always block-sparse).
ENV = "HDLM_ATTENTION"
MODES = ("auto", "dense", "sparse")


@dataclass(frozen=True)
class Tile:
    """Query rows [lo, hi), their key cells ``keys`` (a slice or an index tensor), the sub-mask or None (all allowed)."""

    lo: int
    hi: int
    keys: slice | Tensor
    mask: Tensor | None


@dataclass(frozen=True, eq=False)
class BlockSparseMask:
    """A boolean (Lq, Lkv) mask planned into query tiles (see the module docstring).

    ``dense`` is the mask itself (for backends that need it), ``computed`` the number of
    query-key pairs the tiles compute (≥ the allowed ones).
    """

    dense: Tensor
    tiles: tuple[Tile, ...]
    computed: int

    @property
    def shape(self) -> torch.Size:
        return self.dense.shape

    @property
    def fraction(self) -> float:
        """Fraction of the (Lq, Lkv) query-key pairs that the tiles compute."""
        return self.computed / max(1, self.dense.numel())


def attention_mode(mode: str | None = None) -> str:
    """The block-sparse switch: ``mode`` if given, else $HDLM_ATTENTION, else ``auto``."""
    mode = mode if mode is not None else os.environ.get(ENV, "auto")
    if mode not in MODES:
        raise HDLMError(f"{ENV} = {mode!r}: must be one of {', '.join(MODES)}")
    return mode


def _query_tiles(segments: Tensor, tile: int) -> list[tuple[int, int]]:
    """Row ranges of at most ``tile`` rows, cut at every change of ``segments`` and evenly inside a run."""
    L = segments.shape[0]
    change = (segments[1:] != segments[:-1]).nonzero().squeeze(-1) + 1
    bounds = [0, *change.tolist(), L]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        n = -(-(b - a) // tile)
        cuts = [a + (i * (b - a)) // n for i in range(n + 1)]
        out += list(zip(cuts[:-1], cuts[1:]))
    return out


def _tile_keys(rows: Tensor) -> tuple[slice | Tensor, Tensor | None, int]:
    """For a tile's mask rows (t, Lkv): its key cells (a slice when contiguous), the sub-mask (None if
    all True) and the number of keys. A tile that may attend nothing keeps key 0, masked, so that
    its rows get whatever the dense kernel gives a fully masked row."""
    cols = rows.any(dim=0).nonzero().squeeze(-1)
    if cols.numel() == 0:
        cols = torch.zeros(1, dtype=torch.long, device=rows.device)
    first, last = int(cols[0]), int(cols[-1]) + 1
    keys: slice | Tensor = slice(first, last) if last - first == cols.numel() else cols
    sub = rows[:, keys]
    return keys, (None if bool(sub.all()) else sub), cols.numel()


def plan(mask: Tensor, segments: Tensor | None = None, tile: int = TILE) -> BlockSparseMask:
    """Plan a boolean (Lq, Lkv) mask into query tiles; ``segments`` (Lq,) (e.g. the query layout's
    segment ids) keeps tiles inside one segment. Done once per layout (the caller caches it)."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"block-sparse plan: need a 2-D bool mask, got {mask.dtype} {tuple(mask.shape)}")
    segments = segments if segments is not None else torch.zeros(mask.shape[0], dtype=torch.long)
    tiles, computed = [], 0
    for lo, hi in _query_tiles(segments.cpu(), tile):
        keys, sub, n = _tile_keys(mask[lo:hi])
        tiles.append(Tile(lo, hi, keys, sub))
        computed += (hi - lo) * n
    return BlockSparseMask(mask, tuple(tiles), computed)


def _gather(x: Tensor, keys: slice | Tensor) -> Tensor:
    """x (B, H, Lkv, D) at the key cells (dim −2)."""
    return x[:, :, keys] if isinstance(keys, slice) else x.index_select(-2, keys)


def _tile_sdpa(q: Tensor, k: Tensor, v: Tensor, t: Tile, sdpa: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One tile: (its queries, gathered keys, gathered values, SDPA output)."""
    keys = t.keys if isinstance(t.keys, slice) else t.keys.to(k.device)
    sub = None if t.mask is None else t.mask.to(q.device)
    qt, kt, vt = q[:, :, t.lo:t.hi], _gather(k, keys), _gather(v, keys)
    return qt, kt, vt, F.scaled_dot_product_attention(qt, kt, vt, attn_mask=sub, **sdpa)


def _scatter_add(acc: Tensor, keys: slice | Tensor, grad: Tensor) -> None:
    """acc[:, :, keys] += grad (keys along dim −2)."""
    if isinstance(keys, slice):
        acc[:, :, keys] += grad
    else:
        acc.index_add_(-2, keys.to(acc.device), grad)


class _BlockSparseSDPA(torch.autograd.Function):
    """Tile-by-tile SDPA; the backward recomputes each tile's (cheap, sparse) forward and writes its
    gradients in place, so no full-size zero gradient is filled and added per tile (autograd through
    per-tile slices would do that 3 × tiles times per layer)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: BlockSparseMask, sdpa: dict) -> Tensor:
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        for t in mask.tiles:
            out[:, :, t.lo:t.hi] = _tile_sdpa(q, k, v, t, sdpa)[3]
        ctx.save_for_backward(q, k, v)
        ctx.mask, ctx.sdpa = mask, sdpa
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
        for t in ctx.mask.tiles:
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
                qt, kt, vt, out = _tile_sdpa(*leaves, t, ctx.sdpa)
                gq, gk, gv = torch.autograd.grad(out, (qt, kt, vt), grad[:, :, t.lo:t.hi])
            dq[:, :, t.lo:t.hi] = gq
            _scatter_add(dk, t.keys, gk)
            _scatter_add(dv, t.keys, gv)
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, mask: BlockSparseMask, **sdpa: Any) -> Tensor:
    """SDPA of q (B, H, Lq, D) over k, v (B, H, Lkv, D) under ``mask``, tile by tile; equals
    ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, **sdpa)`` up to summation order,
    outputs and gradients (first order). ``sdpa``: further SDPA arguments (``scale``, ``enable_gqa``)."""
    if tuple(mask.shape) != (q.shape[-2], k.shape[-2]):
        raise ValueError(f"block-sparse mask {tuple(mask.shape)} does not fit {q.shape[-2]} queries x "
                         f"{k.shape[-2]} keys")
    return _BlockSparseSDPA.apply(q, k, v, mask, sdpa)


def use_sparse(q_len: int, planned: BlockSparseMask | None, mode: str | None = None) -> bool:
    """Whether the block-sparse path pays (``auto``: from :data:`MIN_CELLS` query cells and at most
    :data:`MAX_FRACTION` of the pairs computed), or as forced by the switch."""
    mode = attention_mode(mode)
    if mode != "auto":
        return mode == "sparse"
    return q_len >= MIN_CELLS and planned is not None and planned.fraction <= MAX_FRACTION
