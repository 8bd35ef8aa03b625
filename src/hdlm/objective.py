"""The training objective of the paper, Eq. (10): β₁·CE on settled tokens + β₂·(DWDSE | HDCE) on active ones.

The cells it runs over (and the Eq. (11) position weights of the naive layout) come from
:mod:`hdlm.layout`; the Eq. (12) weighted token embedding is the model's (:mod:`hdlm.model`).

ALIGNED drops the settled CE: an ALIGNED clean cell predicts its own (visible, clean) input token,
so only SHIFTED's clean cells (which predict the next token) get β₁·L_CE. Training uses the
efficient layout, which App. B.3 says needs no Eq. (11) weights; ``single=True`` (the naive Fig. 6
layout with those weights) is the reference the efficient layout is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
        kc = tc.ce_index.numel()
        out_index = torch.cat([tc.ce_index, tc.diff_index])
        mask = attention_mask(c.layout, c.layout, device=y.device)
        raw = model(c.tokens, c.sigma, c.positions, mask, keep=c.keep, out_index=out_index)
        d = y.shape[1]
        zero = raw.new_zeros(y.shape[0])
        ce = (cross_entropy(raw[:, :kc], tc.ce_target) * tc.ce_weight).sum(-1) / d if kc else zero
        raw_diff = raw[:, kc:]
        if tc.diff_index.numel() == 0:
            diff = zero
        elif tc.discrete:
            diff = (cross_entropy(raw_diff, tc.diff_y) * tc.diff_rate.to(raw.dtype)).sum(-1) / d
        else:
            per_tok = self.process.diffusion_loss(raw_diff, tc.diff_x, tc.diff_y, tc.diff_level.to(raw.dtype),
                                                  tc.diff_rate.to(raw.dtype), tc.diff_aux)
            diff = per_tok.sum(-1) / d
        if self.is_ar:
            loss, nelbo = ce, ce
        else:
            loss, nelbo = self.beta1 * ce + self.beta2 * diff, diff
        stats = {k: float(v.detach().mean()) for k, v in
                 (("loss", loss), ("ce", ce), ("diffusion", diff), ("nelbo", nelbo))}
        self.last_nelbo = nelbo.detach()
        return loss.mean(), stats


def build_objective(cfg, vocab_size: int) -> Objective:
    """The training objective for a config (process, hyperschedule, ALIGNED/SHIFTED, β₁, β₂)."""
    return Objective(cfg, vocab_size)
