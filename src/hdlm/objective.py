"""The training objective of the paper, Eq. (10): β₁·CE on settled tokens + β₂·(DWDSE | HDCE) on active ones.

The cells it runs over (and the Eq. (11) position weights of the naive layout) come from
:mod:`hdlm.layout`; the Eq. (12) weighted token embedding is the model's (:mod:`hdlm.model`).

ALIGNED drops the settled CE: an ALIGNED clean cell predicts its own (visible, clean) input token,
so only SHIFTED's clean cells (which predict the next token) get β₁·L_CE. Training uses the
efficient layout, which App. B.3 says needs no Eq. (11) weights; ``single=True`` (the naive Fig. 6
layout with those weights) is the reference the efficient layout is tested against.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .head_loss import TokenLoss, chunk_positions, fused_head_loss, head_chunk_elements
from .hyperschedule import from_config
from .layout import attention_mask, training_cells
from .processes import cross_entropy, make_process


class Objective:
    """Eq. (10) over the efficient training layout: β₁·CE on settled tokens + β₂·(DWDSE | HDCE) on active ones.

    ``objective(model, y, seeds, batch_seed)`` returns the per-token loss to backpropagate and a
    dict of floats. ``stats["nelbo"]`` is the per-token estimate of the negative ELBO of the
    continuous-time process under the hyperschedule (DESIGN.md §2): the diffusion term summed
    over all intervals, or the exact next-token NLL for Quench + SHIFTED.
    """

    def __init__(self, cfg, vocab_size: int):
        self.cfg = cfg
        self.process = make_process(cfg.process, vocab_size)
        self.hyperschedule = from_config(cfg.schedule, cfg.model.length)
        self.shift = cfg.model.shift
        self.beta1 = cfg.objective.beta1
        self.beta2 = cfg.objective.beta2
        self.n_intervals = cfg.objective.intervals
        self.settled_attention = cfg.model.settled_attention
        self.block_width = self.hyperschedule.width
        #: logits per chunk of the fused head + loss (hdlm.head_loss); 0: the plain unchunked head
        self.head_chunk = head_chunk_elements()
        #: attention backend switch of hdlm.layout.attention_mask (None: $HDLM_ATTENTION, else auto)
        self.attention: str | None = None

    @property
    def is_ar(self) -> bool:
        """Quench + SHIFTED: a plain autoregressive language model."""
        return self.hyperschedule.levels == 1 and self.shift == 1

    def cells(self, y: Tensor, seeds: Tensor, batch_seed: int, single: bool = False):
        return training_cells(y, self.hyperschedule, self.process, self.shift, seeds, batch_seed,
                              n_intervals=self.n_intervals, single=single, use_ce=self.beta1 > 0 or self.is_ar,
                              settled_attention=self.settled_attention, block_width=self.block_width)

    def __call__(self, model, y: Tensor, seeds: Tensor, batch_seed: int, single: bool = False):
        tc = self.cells(y, seeds, batch_seed, single=single)
        c = tc.cells
        out_index = torch.cat([tc.ce_index, tc.diff_index])
        mask = attention_mask(c.layout, c.layout, device=y.device, mode=self.attention)
        parts = self.token_losses(tc, y.shape[1])
        args = (c.tokens, c.sigma, c.positions, mask)
        if self.head_chunk:  # the fused chunked head + loss (hdlm.head_loss): no (B, K, N) tensors kept
            head_loss = functools.partial(self._fused_parts, parts=parts)
            total, values = model(*args, keep=c.keep, out_index=out_index, head_loss=head_loss)
        else:
            raw = model(*args, keep=c.keep, out_index=out_index)
            values = [fn(raw[:, lo:hi], 0, hi - lo) if hi > lo else raw.new_zeros(raw.shape[0], 0)
                      for fn, _, lo, hi in parts]
            total = sum((v * coef.to(v.dtype)).sum() for v, (_, coef, _, _) in zip(values, parts))
        d = y.shape[1]
        ce, diff = (values[0] * tc.ce_weight).sum(-1) / d, values[1].sum(-1) / d
        loss, nelbo = (ce, ce) if self.is_ar else (self.beta1 * ce + self.beta2 * diff, diff)
        stats = {k: float(v.detach().mean()) for k, v in
                 (("loss", loss), ("ce", ce), ("diffusion", diff), ("nelbo", nelbo))}
        self.last_nelbo = nelbo.detach()
        return total, stats

    def token_losses(self, tc, d: int) -> list[tuple[TokenLoss, Tensor, int, int]]:
        """The two groups of output cells, [settled CE cells; diffusion cells], each as (per-token loss of
        a chunk of its positions, coefficient (B, K) of each token in the batch mean of Eq. (10), lo, hi)."""
        B = tc.cells.tokens.shape[0]
        kc, kd = tc.ce_index.numel(), tc.diff_index.numel()
        b1, b2 = (1.0, 0.0) if self.is_ar else (self.beta1, self.beta2)

        def ce_loss(raw: Tensor, lo: int, hi: int) -> Tensor:
            return cross_entropy(raw, tc.ce_target[:, lo:hi])

        def diffusion_loss(raw: Tensor, lo: int, hi: int) -> Tensor:
            rate = tc.diff_rate[:, lo:hi].to(raw.dtype)
            if tc.discrete:
                return cross_entropy(raw, tc.diff_y[:, lo:hi]) * rate
            aux = {key: v[:, lo:hi] for key, v in tc.diff_aux.items()}
            return self.process.diffusion_loss(raw, tc.diff_x[:, lo:hi], tc.diff_y[:, lo:hi],
                                               tc.diff_level[:, lo:hi].to(raw.dtype), rate, aux)

        ce_coef = (b1 / (d * B)) * tc.ce_weight.to(torch.float64).expand(B, kc)
        diff_coef = torch.full((B, kd), b2 / (d * B), dtype=torch.float64, device=tc.diff_y.device)
        return [(ce_loss, ce_coef, 0, kc), (diffusion_loss, diff_coef, kc, kc + kd)]

    def _fused_parts(self, x: Tensor, head, params: tuple, parts) -> tuple[Tensor, list[Tensor]]:
        """model.forward's ``head_loss``: :func:`fused_head_loss` over each group of output cells."""
        chunk = chunk_positions(x.shape[0], params[0].shape[0], self.head_chunk)
        results = [fused_head_loss(x[:, lo:hi], coef, head, fn, params, chunk) for fn, coef, lo, hi in parts]
        return sum(total for total, _ in results), [values for _, values in results]


def build_objective(cfg, vocab_size: int) -> Objective:
    """The training objective for a config (process, hyperschedule, ALIGNED/SHIFTED, β₁, β₂)."""
    return Objective(cfg, vocab_size)
