"""The vocabulary head and the losses over it, fused and computed in position chunks (DESIGN.md §9).

The output head (hidden → N logits) and the per-token losses of Eq. (10) (the settled
cross-entropy, DWDSE, HDCE) are most of a training step's memory traffic: computed at once
they materialise (positions × N) logits, their log-softmax and the gradient of each, several
fp32 tensors of (B, K, N). :func:`fused_head_loss` instead runs, per chunk of positions, the
head, the loss and their backward (inside the forward pass), keeping only the gradients with
respect to the features and the head's parameters; the backward pass just scales them by the
incoming gradient of the scalar. Peak memory of the head is one (B, chunk, N) block, and no
head FLOP is recomputed. The result equals the unchunked computation up to summation order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import allocator

#: Logits per chunk (B × positions × N): 7 · 2^20 fp32 values = 28 MiB per block. Large enough for
#: the head's GEMMs to run near the GEMM rate (≥ 150 rows at N = 50k), below the 32 MiB above which
#: glibc serves every allocation by a fresh mmap, page-faulted again on each touch (each chunk
#: allocates a few such blocks: logits, the loss's temporaries, their gradient).
HEAD_CHUNK_ELEMENTS = 7 << 20
#: The chunk when malloc keeps freed memory (:func:`hdlm.allocator.keep_freed_memory`, as the ``hdlm``
#: command line does): 112 MiB, with no fault to pay the GEMMs get more rows (5-7% a training step at
#: 4 × 256 GPT-2 on a 2-core CPU, within the noise in the default preset: bench/RESULTS.md, #16.3).
KEPT_HEAD_CHUNK_ELEMENTS = 28 << 20


def head_chunk_elements() -> int:
    """The default logits per chunk of :func:`fused_head_loss` in this process (see above)."""
    return KEPT_HEAD_CHUNK_ELEMENTS if allocator.in_effect() else HEAD_CHUNK_ELEMENTS


Head = Callable[..., Tensor]  # head(x (B, k, h), *params) -> raw (B, k, N)
TokenLoss = Callable[[Tensor, int, int], Tensor]  # loss(raw (B, k, N), lo, hi) -> per-token loss (B, k)


@dataclass(frozen=True)
class LinearHead:
    """head(x, weight, bias=None) = post(x · weightᵀ + bias), ``post`` elementwise (None: identity;
    e.g. Gemma's logit soft-cap). :func:`fused_head_loss` knows its backward: per chunk, autograd
    runs only through ``post`` and the loss, and the weight gradient is accumulated in place by one
    GEMM, where a generic head returns a fresh (N, h) gradient per chunk to be added (a page-faulted
    allocation and three passes over N·h floats each time). ``F.linear`` is read as ``LinearHead()``."""

    post: Callable[[Tensor], Tensor] | None = None

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        raw = F.linear(x, weight, bias)
        return raw if self.post is None else self.post(raw)


def _as_linear(head: Head) -> LinearHead | None:
    if isinstance(head, LinearHead):
        return head
    return LinearHead() if head is F.linear else None


class _VocabReductions(torch.autograd.Function):
    """(logsumexp, entries at ``index``, sum) of raw over its last dimension, backward written out.

    The gradient is g_lse · softmax(raw) + g_sum + scatter(g_entries): one pass over the
    exponentials the forward kept, where autograd through logsumexp, gather and sum recomputes the
    exponentials, zero-fills the gather's gradient and adds three (…, N) gradients.
    """

    @staticmethod
    def forward(ctx, raw: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # an unused output costs no pass in the backward
        peak = raw.amax(dim=-1, keepdim=True)
        expd = torch.sub(raw, peak).exp_()
        total = expd.sum(dim=-1, keepdim=True)
        ctx.save_for_backward(expd, total, index)
        return (peak + total.log()).squeeze(-1), raw.gather(-1, index), raw.sum(dim=-1)

    @staticmethod
    def backward(ctx, g_lse: Tensor, g_entries: Tensor, g_sum: Tensor):
        expd, total, index = ctx.saved_tensors
        if g_lse is None:
            grad = torch.zeros_like(expd)
        else:
            grad = torch.mul(expd, (g_lse.unsqueeze(-1) / total).to(expd.dtype))
        if g_sum is not None:
            grad.add_(g_sum.unsqueeze(-1).to(expd.dtype))
        if g_entries is not None:
            grad.scatter_add_(-1, index, g_entries.to(expd.dtype))
        return grad, None


def vocab_reductions(raw: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(logsumexp(raw, -1), raw.gather(-1, index), raw.sum(-1))`` with a one-pass backward: what the
    closed-form losses over the vocabulary (DWDSE of Q_gamma, cross-entropy) read of raw (…, N);
    ``index`` (…, k) long. Used once per chunk of the fused head + loss (DESIGN.md §9)."""
    return _VocabReductions.apply(raw, index)


def chunk_positions(batch: int, columns: int, elements: int = HEAD_CHUNK_ELEMENTS) -> int:
    """Positions per chunk so that one chunk holds about ``elements`` logits (at least 1)."""
    return max(1, elements // max(1, batch * columns))


def _chunk_grads(x: Tensor, coef: Tensor, head: Head, loss: TokenLoss, params: Sequence[Tensor],
                 lo: int, hi: int, need: Sequence[bool]) -> tuple[Tensor, list[Tensor | None]]:
    """One chunk: per-token loss values (B, hi−lo) and the gradients of Σ coef·loss w.r.t. x[:, lo:hi] and params."""
    with torch.enable_grad():
        xc = x[:, lo:hi].detach().requires_grad_(need[0])
        ps = [p.detach().requires_grad_(n) for p, n in zip(params, need[1:])]
        per = loss(head(xc, *ps), lo, hi)
        inputs = [t for t, n in zip([xc, *ps], need) if n]
        grads = iter(torch.autograd.grad((per * coef[:, lo:hi]).sum(), inputs)) if inputs else iter(())
    return per.detach(), [next(grads) if n else None for n in need]


def _linear_chunk_grads(x: Tensor, coef: Tensor, head: LinearHead, loss: TokenLoss, params: Sequence[Tensor],
                        lo: int, hi: int, acc: Sequence[Tensor | None]) -> tuple[Tensor, Tensor | None]:
    """:func:`_chunk_grads` for a :class:`LinearHead`: the gradient w.r.t. x[:, lo:hi] returned, those of
    the weight and bias added into ``acc`` (None where not needed)."""
    B, h = x.shape[0], x.shape[-1]
    # rows copied contiguous: F.linear on the (B, k, h) slice would run as a bmm over B copies of the weight
    x_rows = x[:, lo:hi].detach().reshape(-1, h)
    weight, bias = params[0].detach(), (params[1].detach() if len(params) > 1 else None)
    with torch.enable_grad():
        lin = F.linear(x_rows, weight, bias).view(B, hi - lo, -1).requires_grad_()
        per = loss(lin if head.post is None else head.post(lin), lo, hi)
        (g,) = torch.autograd.grad((per * coef[:, lo:hi]).sum(), lin)
    rows = g.reshape(-1, g.shape[-1])
    if acc[1] is not None:
        if rows.dtype == x_rows.dtype == acc[1].dtype:
            acc[1].addmm_(rows.t(), x_rows)
        else:  # autocast: the GEMM in the low precision, accumulated in the parameter's
            acc[1].add_(rows.t() @ x_rows)
    if len(acc) > 2 and acc[2] is not None:
        acc[2].add_(rows.sum(0))
    return per.detach(), ((rows @ weight).view(B, hi - lo, h) if acc[0] is not None else None)


class _FusedHeadLoss(torch.autograd.Function):
    """Σ coef · loss(head(x)) with the head's backward done chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, coef: Tensor, head: Head, loss: TokenLoss, chunk: int, *params: Tensor):
        need = [x.requires_grad] + [p.requires_grad for p in params]
        gx = torch.zeros_like(x) if need[0] else None
        gps = [torch.zeros_like(p) if n else None for p, n in zip(params, need[1:])]
        values, linear = [], _as_linear(head)
        for lo in range(0, x.shape[1], chunk):
            hi = min(lo + chunk, x.shape[1])
            if linear is not None:
                per, g_x = _linear_chunk_grads(x, coef, linear, loss, params, lo, hi, [gx, *gps])
            else:
                per, grads = _chunk_grads(x, coef, head, loss, params, lo, hi, need)
                g_x = grads[0]
                for acc, g in zip(gps, grads[1:]):
                    if acc is not None:
                        acc += g
            values.append(per)
            if gx is not None:
                gx[:, lo:hi] = g_x
        per_token = torch.cat(values, dim=1)
        ctx.mark_non_differentiable(per_token)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in [gx, *gps]))
        ctx.need = need
        return (per_token * coef).sum(), per_token

    @staticmethod
    def backward(ctx, g_total: Tensor, _g_values: Tensor):
        saved = ctx.saved_tensors
        grads = [s * g_total.to(s.dtype) if n else None for s, n in zip(saved, ctx.need)]
        return (grads[0], None, None, None, None, *grads[1:])


def fused_head_loss(x: Tensor, coef: Tensor, head: Head, loss: TokenLoss, params: Sequence[Tensor],
                    chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """(Σ_{b,k} coef[b,k] · ℓ[b,k], ℓ (B, K) detached) with ℓ = ``loss(head(x, *params))`` per token.

    ``x`` (B, K, h) are the features the head reads (after the final norm), ``coef`` (B, K) the
    weight of each per-token loss in the scalar to backpropagate, ``loss(raw, lo, hi)`` the
    per-token loss of the chunk of positions [lo, hi) (it slices its own targets). ``chunk``
    positions per chunk (default: :func:`chunk_positions`; None or ≥ K: one chunk). Without grad
    mode only the values are computed, chunk by chunk.
    """
    B, K = x.shape[:2]
    if K == 0:
        return x.new_zeros(()), x.new_zeros(B, 0)
    chunk = max(1, min(chunk or K, K))
    coef = coef.to(x.dtype)
    if not torch.is_grad_enabled():
        per = torch.cat([loss(head(x[:, lo:lo + chunk], *params), lo, min(lo + chunk, K))
                         for lo in range(0, K, chunk)], dim=1)
        return (per * coef).sum(), per
    return _FusedHeadLoss.apply(x, coef, head, loss, chunk, *params)
