"""Upper bounds on perplexity under any hyperschedule (paper §4.2-4.3, App. C.1, Algorithm 1,
Remark 1; DESIGN.md §2-3, §7). The derivations are in ``docs/likelihood.md``.

Three estimators of the negative log-likelihood −log p(y), summed over sequences and divided by
the number of tokens (never an average of perplexities, DESIGN.md §11):

- ``discrete`` (default, :mod:`.discrete`): the variational bound of the T-step generative process
  that the samplers run, scored with the process's reverse kernel.
- ``continuous`` (:mod:`.continuous`): Algorithm 1, M draws of the training NELBO.
- ``exact`` (:mod:`.exact`): Quench with a SHIFTED model is an AR model: the NLL is the next-token
  cross-entropy, one forward pass, standard error 0. Chosen automatically for that case.

Aggregation and the reported result are in :mod:`.result`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ..config import ESTIMATORS
from ..errors import HDLMError
from ..hyperschedule import from_config
from ..objective import build_objective
from ..progress import Progress
from ..runtime import current_dist
from .continuous import continuous_values, prior_matched
from .datasets import ZERO_SHOT, resolve_data_spec
from .discrete import ReverseChain, discrete_values, resolved_variational, variational_chain
from .exact import exact_ar_values
from .result import NLLSums, PerplexityResult, make_result

DEFAULT_MC_SAMPLES = 16


def _blocks(data) -> tuple[int, Any]:
    """(number of sequences, index → LongTensor (k, d)) for a tensor, a TokenDataset or a sequence."""
    if isinstance(data, Tensor):
        if data.dim() != 2:
            raise HDLMError(f"perplexity bound: data tensor must be (n, d), got shape {tuple(data.shape)}")
        return data.shape[0], lambda idx: data[torch.as_tensor(idx, dtype=torch.long)].long()
    if hasattr(data, "gather"):
        return len(data), lambda idx: data.gather(np.asarray(idx, dtype=np.int64))
    return len(data), lambda idx: torch.stack([torch.as_tensor(data[i]) for i in idx]).long()


def _checked_draws(estimator: str, mc_samples: int | None, batch_size: int) -> int:
    """M, after checking the estimator's name and the batch size."""
    if estimator not in ESTIMATORS:
        raise HDLMError(f"perplexity estimator '{estimator}': must be one of {', '.join(ESTIMATORS)}")
    if batch_size < 1:
        raise HDLMError(f"perplexity bound: batch_size = {batch_size} must be >= 1")
    M = DEFAULT_MC_SAMPLES if mc_samples is None else int(mc_samples)
    if M < 1:
        raise HDLMError(f"perplexity bound: mc_samples = {mc_samples} must be >= 1")
    return M


def _estimator(chain: ReverseChain, cfg, estimator: str, M: int, seed: int, batch_size: int, variational: str,
               stratified: bool) -> tuple[str, int, Callable[[Tensor, list[int]], Tensor]]:
    """(estimator, M, values(y, idx) -> (B, M) per-sequence NLL estimates); Quench + SHIFTED is exact."""
    if chain.ar:
        return "exact", 1, lambda y, idx: exact_ar_values(chain, y)
    if estimator == "discrete":
        q_chain = variational_chain(chain.process, variational)
        return estimator, M, lambda y, idx: discrete_values(chain, q_chain, y, idx, M, seed, batch_size, stratified)
    objective = build_objective(cfg, cfg.model.vocab_size)
    objective.hyperschedule, objective.block_width = chain.schedule, chain.schedule.width
    if estimator == "continuous-bound":
        objective.process = prior_matched(objective.process)
    return estimator, M, lambda y, idx: continuous_values(objective, chain.model, y, idx, M, seed)


def nll_sums(model, cfg, data, *, estimator: str = "discrete", mc_samples: int | None = None, schedule=None,
             batch_size: int = 8, seed: int = 0, device=None, progress: bool = True, variational: str = "auto",
             stratified: bool = True, rank: int | None = None, world_size: int | None = None,
             kernel: str | None = None) -> tuple[NLLSums, dict]:
    """This rank's share of :func:`perplexity_bound`: the summed statistics and the settings used.

    Sequences are split across ranks by index (rank r takes r, r + W, …); every random draw is
    seeded by (seed, sequence index, draw), so the sums do not depend on batching or on W.
    """
    M = _checked_draws(estimator, mc_samples, batch_size)
    n, get = _blocks(data)
    if n == 0:
        raise HDLMError("perplexity bound: the dataset is empty")
    d = int(get([0]).shape[1])
    hs = schedule if schedule is not None else from_config(cfg.schedule, d)
    if hs.d != d:
        raise HDLMError(f"perplexity bound: hyperschedule length {hs.d} does not match the data's d = {d}")
    device = device if device is not None else next(model.parameters()).device
    chain = ReverseChain.from_config(model, cfg, schedule=hs, kernel=kernel)
    estimator, M, values = _estimator(chain, cfg, estimator, M, seed, batch_size, variational, stratified)
    here = current_dist()
    rank = here.rank if rank is None else rank
    mine = list(range(rank, n, here.world if world_size is None else world_size))
    batches = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]
    bar = Progress(len(batches), f"ppl ({estimator})", "batch", enabled=progress and rank == 0)
    sums, was_training = NLLSums(), model.training
    model.eval()
    try:
        with torch.no_grad():
            for idx in batches:
                sums.add(values(get(idx).to(device), idx), d)
                bar.set_postfix(nll=f"{sums.nll / sums.n_tokens:.4f}")
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    settings = {"estimator": estimator, "mc_samples": M, "stratified": stratified and estimator == "discrete",
                "schedule": hs, "process_cfg": dataclasses.asdict(cfg.process), "kernel": chain.kernel,
                "variational": resolved_variational(chain.process, variational) if estimator == "discrete" else None}
    return sums, settings


def perplexity_bound(model, cfg, data, *, estimator: str = "discrete", mc_samples: int | None = None,
                     schedule=None, batch_size: int = 8, seed: int = 0, device=None, progress: bool = True,
                     variational: str = "auto", stratified: bool = True, kernel: str | None = None) -> PerplexityResult:
    """Upper bound on the perplexity of ``model`` on ``data`` (paper App. C.1, Algorithm 1).

    ``data``: a LongTensor (n, d), a :class:`~hdlm.data.TokenDataset` or a sequence of (d,) tensors.
    ``estimator``: "discrete" (bound on the NLL of the T-step sampler; default) or "continuous"
    (Algorithm 1 on the training NELBO); Quench + SHIFTED is always evaluated exactly.
    ``schedule``: a :class:`~hdlm.hyperschedule.Hyperschedule` overriding ``cfg.schedule``.
    ``variational``: the discrete bound's noising chain (see :func:`~.discrete.variational_chain`); ``stratified``:
    spread each sequence's M steps evenly over [0, T) (:func:`~.discrete.draw_step`; the reported standard
    error is then conservative). ``kernel``: the reverse kernel whose NLL the discrete bound bounds
    (default: "ar" for Quench, else the process's default, see ``Process.kernels``).
    NLLs and token counts are summed over batches and, when torch.distributed is initialised,
    over ranks; the standard error is that of the Monte-Carlo estimate given the data.
    """
    sums, s = nll_sums(model, cfg, data, estimator=estimator, mc_samples=mc_samples, schedule=schedule,
                       batch_size=batch_size, seed=seed, device=device, progress=progress, variational=variational,
                       stratified=stratified, kernel=kernel)
    if device is None:
        device = next(model.parameters()).device
    sums = sums.all_reduce(device=device)
    return make_result(sums, estimator=s["estimator"], mc_samples=s["mc_samples"], schedule=s["schedule"],
                       process_cfg=s["process_cfg"], variational=s["variational"], stratified=s["stratified"],
                       kernel=s["kernel"])


__all__ = ["ESTIMATORS", "NLLSums", "PerplexityResult", "ReverseChain", "ZERO_SHOT", "nll_sums", "perplexity_bound",
           "resolve_data_spec"]
