"""Cells: what one forward pass of the transformer runs over, for training and for generation.

Training (App. B.3, Fig. 7-10). The efficient layout is the clean sequence followed by noisy
copies of K denoising intervals. Each interval k is the active window of a generation step t_k
(Eq. 1) at a continuous time u_k = (t_k + φ)/T (DESIGN.md §2): its positions carry the levels
ℓ_i(u_k) and rates |dℓ_i/du|, attend to the clean prefix before the interval and densely to
themselves. The steps t_k are stratified over [0, T) and shared by the batch (one attention
mask per step); φ and the noise are drawn per sample from that sample's own seed, so a sample
gets the same noise whatever rank or micro-batch it lands on. With strata of n_k steps,

    NELBO(y) ≈ Σ_k (n_k / T) Σ_{i ∈ interval k} |dℓ_i/du| L_i(x_i, ℓ_i(u_k)),

an unbiased estimate of E_u Σ_i |dℓ_i/du| L_i. For Block with one interval per block this is
exactly the sum of per-block flat losses with an independent level per block.

Generation (§3.3, App. B.4). One step runs the clean cells of the settled prefix (or only the
new ones, the others being in the KV cache) and one noisy interval over the active window.

Both use the same cell conventions (docs/architecture.md): a cell with input position p
predicts position p + shift; SHIFTED intervals start with a copy of the last settled token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import masks, sparse_attention
from .masks import CellLayout, clean_layout, concat_layouts, interval_layout
from .runtime import Stream, generator, mix_seed


def attention_mask(q_layout: CellLayout, kv_layout: CellLayout, device=None, mode: str | None = None):
    """The mask for a forward pass, from the one rule of :mod:`hdlm.masks`.

    On CUDA a FlexAttention BlockMask (block-sparse, compiled); elsewhere a
    :class:`~hdlm.sparse_attention.BlockSparseMask` when it pays (``auto``: long layouts such as the
    efficient training layout, where most pairs are masked) and a boolean (Lq, Lkv) mask for dense
    SDPA otherwise. ``mode`` (default $HDLM_ATTENTION or ``auto``): ``dense`` forces the boolean mask
    on every device, ``sparse`` the block-sparse path.
    """
    dev = torch.device(device) if device is not None else q_layout.device
    mode = sparse_attention.attention_mode(mode)
    if dev.type == "cuda" and mode != "dense":
        return masks.flex_block_mask(q_layout.to(dev), kv_layout.to(dev))
    if mode == "sparse" or (mode == "auto" and len(q_layout) >= sparse_attention.MIN_CELLS):
        planned = masks.block_sparse_mask(q_layout, kv_layout, dev)
        if sparse_attention.use_sparse(len(q_layout), planned, mode):
            return planned
    return masks.dense_mask(q_layout, kv_layout, dev)


@dataclass
class Cells:
    """Model inputs for one forward pass (see :meth:`hdlm.model.HDLMTransformer.forward`)."""

    tokens: Tensor  # (B, L) input ids (MASK = N, BOS = N + 1)
    sigma: Tensor  # (B, L) sigma_bar of the level of the position each cell predicts (adaLN)
    keep: Tensor  # (B, L) Eq. (12) keep weight of each input token
    positions: Tensor  # (L,) rotary positions p + shift
    layout: CellLayout  # metadata for the attention mask
    n_clean: int = 0  # number of clean cells at the front (what a KV cache commits)


def _input_tokens(x: Tensor, pos: Tensor, bos_id: int) -> Tensor:
    """x[:, p], with BOS where p = −1 (SHIFTED's conditioning token x^{-1})."""
    tok = x[:, pos.clamp(min=0)]
    return torch.where(pos.unsqueeze(0) < 0, torch.full_like(tok, bos_id), tok)


def _level_at(level: Tensor, idx: Tensor) -> Tensor:
    """level[:, idx] with level = 1 past the end (the dropped last SHIFTED cell predicts d)."""
    d = level.shape[-1]
    out = level[:, idx.clamp(max=d - 1)]
    return torch.where(idx.unsqueeze(0) >= d, torch.ones_like(out), out)


def inference_cells(x: Tensor, level: Tensor, settled_end: int, active_end: int, process, shift: int, *,
                    clean_from: int = 0, ar: bool = False, settled_attention: str = "causal",
                    block_width: int = 1) -> tuple[Cells, Tensor]:
    """Inputs of one generation step t → t+1.

    ``x`` (B, d) is the current state, ``level`` (d,) or (B, d) the current levels ℓ = τ_t/𝒯.
    Clean cells predict positions [clean_from, settled_end) (fewer when a KV cache holds the
    others); the noisy interval covers the active window [settled_end, active_end). With
    ``ar`` (Quench + SHIFTED) there is no interval: the clean cells run up to the one
    predicting the active position, as in plain autoregressive decoding.

    Returns the cells and ``out_index``: the cells whose outputs predict the active positions
    settled_end .. active_end − 1, in order.
    """
    B, d = x.shape
    device = x.device
    if level.dim() == 1:
        level = level.unsqueeze(0).expand(B, d)
    level = level if level.is_floating_point() else level.float()
    bos = process.N + 1
    kw = dict(settled_attention=settled_attention, block_width=block_width, device=device)
    clean_end = active_end if ar else settled_end
    clean = clean_layout(clean_end, shift, **kw)
    clean = CellLayout(clean.pos[clean_from:], clean.seg[clean_from:], clean.start[clean_from:], *clean.settings())
    parts = [clean]
    if not ar:
        parts.append(interval_layout(settled_end, active_end, 1, shift, **kw))
    layout = concat_layouts(*parts)
    pos, is_clean = layout.pos, layout.is_clean
    tokens = _input_tokens(x, pos, bos)
    zeros = torch.zeros(1, device=device, dtype=level.dtype)
    target_level = torch.where(is_clean.unsqueeze(0), zeros, _level_at(level, pos + shift))
    input_level = torch.where(is_clean.unsqueeze(0) | (pos < settled_end).unsqueeze(0), zeros,
                              _level_at(level, pos.clamp(min=0)))
    sigma = process.noise.sigma_bar(target_level)
    keep = process.embed_keep(tokens.clamp(max=process.N), input_level)
    n_clean = len(clean)
    if ar:
        out_index = torch.arange(len(layout) - (active_end - settled_end), len(layout), device=device)
    else:
        out_index = torch.arange(n_clean, n_clean + (active_end - settled_end), device=device)
    return Cells(tokens, sigma, keep, pos + shift, layout, n_clean), out_index


# --------------------------------------------------------------------------------------------
# training


@dataclass
class TrainingCells:
    """The efficient training layout for a batch, with what the loss needs per cell."""

    cells: Cells
    ce_index: Tensor  # (Kc,) clean cells whose outputs get the settled cross-entropy
    ce_target: Tensor  # (B, Kc) their targets
    ce_weight: Tensor  # (Kc,) per-cell weight (Eq. 11 in the one-interval layout, else 1)
    diff_index: Tensor  # (Kd,) noisy cells whose outputs get the diffusion loss
    diff_x: Tensor  # (B, Kd) noisy token at the predicted position
    diff_y: Tensor  # (B, Kd) clean token at the predicted position
    diff_level: Tensor  # (B, Kd) its level ℓ
    diff_rate: Tensor  # (B, Kd) |dℓ/du| times the stratum weight n_k / T
    diff_aux: dict  # per-cell aux of the forward process (B, Kd)
    discrete: bool = False  # 𝒯 = 1: active tokens are at full noise and the loss is their CE


def stratified_steps(T: int, K: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """K steps, one uniformly inside each of K contiguous strata of [0, T); returns (steps, stratum sizes)."""
    K = max(1, min(K, T))
    bounds = [(k * T) // K for k in range(K + 1)]
    steps, sizes = [], []
    for k in range(K):
        lo, hi = bounds[k], bounds[k + 1]
        steps.append(lo + int(torch.randint(hi - lo, (1,), generator=generator)))
        sizes.append(hi - lo)
    return steps, sizes


def position_weights(d: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Eq. (11): w(i) = floor(i / omega) / (ceil(d / omega) - 1), and w = 1 when ceil(d/omega) = 1."""
    n_blocks = math.ceil(d / width)
    if n_blocks == 1:
        return torch.ones(d, device=device, dtype=dtype)
    i = torch.arange(d, device=device)
    return (i // width).to(dtype) / (n_blocks - 1)


def draw_intervals(hs, d: int, shift: int, batch_seed: int, *, n_intervals: int | None = None,
                   single: bool = False) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Step 1: the denoising intervals of a batch (shared by its samples): (steps t_k, stratum sizes n_k,
    active windows [a_k, e_k) of Eq. 1).

    K = ``n_intervals`` (default ceil(d/ω)) steps stratified over [0, T), or one uniform step for the
    naive ``single`` layout; none for Quench + SHIFTED (the active token is predicted by a clean cell).
    """
    gen = generator(batch_seed)
    K = 1 if single else (n_intervals if n_intervals is not None else -(-d // hs.width))
    if hs.levels == 1 and shift == 1:
        K = 0
    steps, sizes = stratified_steps(hs.T, K, gen) if K > 0 else ([], [])
    if single:
        steps, sizes = [int(torch.randint(hs.T, (1,), generator=gen))], [hs.T]
    lo, hi = hs.splits()
    return steps, sizes, [(int(lo[t]), int(hi[t])) for t in steps]


def interval_cells(windows: list[tuple[int, int]], hs, d: int, shift: int, single: bool, **kw) -> tuple[CellLayout, int]:
    """Step 2: the cell layout (clean cells ⁀ one noisy copy per interval) and its number of clean cells.

    The clean cells are the settled context of every interval: all d of them (none for Flat, which
    never has settled tokens), or just the prefix before the one window of the naive layout.
    """
    n_clean = windows[0][0] if single else (d if (hs.width < d or any(a > 0 for a, _ in windows)) else 0)
    parts = [clean_layout(n_clean, shift, **kw)] if n_clean else []
    parts += [interval_layout(a, e, k + 1, shift, **kw) for k, (a, e) in enumerate(windows)]
    return concat_layouts(*parts), n_clean


def levels_and_rates(hs, steps: list[int], sizes: list[int], windows: list[tuple[int, int]], seeds: Tensor,
                     d: int) -> tuple[Tensor, Tensor]:
    """Step 3: per sample and interval, the levels ℓ(u_k) and rates |dℓ/du| · n_k/T, both (B, K, d) float64.

    u_k = (t_k + φ)/T with φ ~ U[0, 1) from each sample's own seed. With 𝒯 = 1 the active tokens are
    at full noise (level 1, rate 1) and the loss is their cross-entropy.
    """
    B = len(seeds)
    steps_t = torch.tensor(steps, dtype=torch.float64)
    phi = torch.stack([torch.rand(len(steps), generator=generator(s), dtype=torch.float64)
                       for s in seeds.tolist()]) if steps else torch.zeros(B, 0, dtype=torch.float64)
    if hs.levels == 1:
        lev = torch.zeros(B, len(steps), d, dtype=torch.float64)
        for k, (a, e) in enumerate(windows):
            lev[:, k, a:e] = 1.0
        return lev, (lev > 0).to(torch.float64)
    u = (steps_t.unsqueeze(0) + phi) / hs.T  # (B, K)
    weight = (torch.tensor(sizes, dtype=torch.float64) / hs.T)[None, :, None]
    return hs.level(u).to(torch.float64), hs.level_rate(u).to(torch.float64) * weight


def noisy_inputs(y: Tensor, layout: CellLayout, lev: Tensor, process, seeds: Tensor,
                 discrete: bool) -> tuple[Tensor, Tensor, dict]:
    """Step 4: the input tokens (B, L), their levels (B, L) and the forward process's aux (B, L).

    Clean cells and SHIFTED's repeated settled token take y; noisy inputs are drawn from
    q(x | y, ℓ) (the prior when 𝒯 = 1) with each sample's own generator (a stream apart from φ's).
    """
    B, L, device = y.shape[0], len(layout), y.device
    pos, is_clean = layout.pos, layout.is_clean
    kk = (layout.seg - 1).clamp(min=0)  # interval index of each noisy cell
    noisy_in = (~is_clean) & (pos >= layout.start)  # noisy input cells (not the SHIFTED repeat)
    in_pos = pos.clamp(min=0)
    zero = torch.zeros(1, dtype=lev.dtype, device=device)
    in_level = torch.where(noisy_in.unsqueeze(0), lev[:, kk, in_pos] if lev.shape[1] else zero.expand(B, L), zero)
    tokens = _input_tokens(y, pos, process.N + 1).clone()
    aux: dict = {}
    idx = noisy_in.nonzero().squeeze(-1)
    if idx.numel() == 0:
        return tokens, in_level, aux
    xs, auxes = [], []
    for b, s in enumerate(seeds.tolist()):
        g = generator(mix_seed(s, Stream.FORWARD_NOISE), device)
        if discrete:
            xb, ab = process.prior((idx.numel(),), generator=g, device=device), {}
        else:
            xb, ab = process.sample_forward(y[b, in_pos[idx]], in_level[b, idx], generator=g)
        xs.append(xb)
        auxes.append(ab)
    tokens[:, idx] = torch.stack(xs)
    for key in auxes[0]:
        aux[key] = torch.zeros(B, L, dtype=auxes[0][key].dtype, device=device)
        aux[key][:, idx] = torch.stack([a[key] for a in auxes])
    return tokens, in_level, aux


def target_levels(layout: CellLayout, lev: Tensor, shift: int, d: int) -> Tensor:
    """The level (B, L) of the position each cell predicts: 0 for clean cells, 1 past the end."""
    B, L = lev.shape[0], len(layout)
    target = layout.pos + shift
    kk = (layout.seg - 1).clamp(min=0)
    zero = torch.zeros(1, dtype=lev.dtype, device=lev.device)
    noisy = lev[:, kk, target.clamp(max=d - 1)] if lev.shape[1] else zero.expand(B, L)
    out = torch.where(layout.is_clean.unsqueeze(0), zero, noisy)
    return torch.where((target >= d).unsqueeze(0), torch.ones_like(out), out)


def training_cells(y: Tensor, hs, process, shift: int, seeds: Tensor, batch_seed: int, *,
                   n_intervals: int | None = None, single: bool = False, use_ce: bool = True,
                   settled_attention: str = "causal", block_width: int = 1) -> TrainingCells:
    """Build the efficient training layout (App. B.3) for clean sequences ``y`` (B, d).

    ``n_intervals`` defaults to ceil(d/ω) (about half of the cells train the diffusion head);
    ``single`` gives the naive one-interval-per-sequence layout (settled prefix ⁀ one active
    window, Fig. 6) with the Eq. (11) weights on the settled cross-entropy. ``use_ce`` adds the
    clean cells' cross-entropy (meaningful for SHIFTED, where a clean cell predicts the next token).
    """
    B, d = y.shape
    kw = dict(settled_attention=settled_attention, block_width=block_width, device=y.device)
    steps, sizes, windows = draw_intervals(hs, d, shift, batch_seed, n_intervals=n_intervals, single=single)
    layout, n_clean = interval_cells(windows, hs, d, shift, single, **kw)
    lev, rate = (t.to(y.device) for t in levels_and_rates(hs, steps, sizes, windows, seeds, d))
    discrete = hs.levels == 1
    tokens, in_level, aux = noisy_inputs(y, layout, lev, process, seeds, discrete)
    target_level = target_levels(layout, lev, shift, d)
    sigma = process.noise.sigma_bar(target_level.float())
    keep = process.embed_keep(tokens.clamp(max=process.N), in_level.float())
    cells = Cells(tokens, sigma, keep, layout.pos + shift, layout, n_clean)
    return loss_targets(cells, y, windows, lev, rate, target_level, aux, shift, discrete,
                        use_ce=use_ce, single=single, width=hs.width)


def loss_targets(cells: Cells, y: Tensor, windows: list[tuple[int, int]], lev: Tensor, rate: Tensor,
                 target_level: Tensor, aux: dict, shift: int, discrete: bool, *, use_ce: bool, single: bool,
                 width: int) -> TrainingCells:
    """Step 5: what the loss needs — cross-entropy on clean cells (SHIFTED), diffusion on noisy targets."""
    layout, n_clean, device = cells.layout, cells.n_clean, y.device
    d = y.shape[1]
    target = layout.pos + shift
    kk = (layout.seg - 1).clamp(min=0)
    if use_ce and shift == 1 and n_clean:
        ce_index = torch.arange(n_clean, device=device)
        ce_weight = (position_weights(d, width, device=device)[:n_clean] if single
                     else torch.ones(n_clean, dtype=torch.float32, device=device))
    else:
        ce_index = torch.zeros(0, dtype=torch.long, device=device)
        ce_weight = torch.zeros(0, device=device)
    ends = torch.tensor([0] + [e for _, e in windows], dtype=torch.long, device=device)
    # SHIFTED: the last cell of an interval predicts `end` and is dropped
    diff_index = ((~layout.is_clean) & (target < ends[layout.seg])).nonzero().squeeze(-1)
    src = diff_index + shift  # the noisy token at the predicted position is the input `shift` cells later
    diff_rate = rate[:, kk[diff_index], target[diff_index]] if windows else torch.zeros(y.shape[0], 0, device=device)
    return TrainingCells(cells, ce_index, y[:, target[ce_index]], ce_weight, diff_index, cells.tokens[:, src],
                         y[:, target[diff_index]], target_level[:, diff_index], diff_rate,
                         {key: v[:, src] for key, v in aux.items()}, discrete)
