"""The generation driver: a hyperschedule-driven loop with an exact KV cache (paper §3.3, App. B.4).

Step t → t+1 of a hyperschedule τ splits the sequence into settled ⁀ active ⁀ worthless
(Eq. 1). The model runs on the settled prefix (clean cells, attending to each other by the
settled rule of training) followed by one noisy interval over the active window; worthless
positions are never fed to it. The sampler then updates the active positions from their own
level change τ_t/𝒯 → τ_{t+1}/𝒯.

KV cache. Clean cells never attend to noisy ones, so their keys/values do not depend on the
active window: they are computed once. Each step feeds only the clean cells settled since the
previous step together with the active interval, in ONE forward pass that also appends those
clean cells to preallocated buffers (:class:`hdlm.model.KVCache`). With block-causal settled
attention a clean cell also sees the later cells of its block, so a cell is committed only once
its block is complete (until then it is recomputed, as the uncached pass does). Cached and
uncached generation are therefore the same computation up to floating-point rounding.

Prompts (conditional generation, §2): prompt positions are settled from the start (level 0 at
every step, never changed); a step whose active window lies inside the prompt is skipped.
Quench + SHIFTED is plain autoregressive decoding (the cell predicting the next token is the
clean cell of the last settled one, as in training).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..errors import HDLMError
from ..layout import inference_cells
from ..masks import clean_layout, concat_layouts, dense_mask
from .samplers import Sampler


@dataclass
class TraceStep:
    """One transition t → t+1: the state before it and its Eq. (1) split (after the prompt)."""

    t: int
    settled_end: int
    active_end: int
    tokens: Tensor  # (B, d) x_t, on the CPU
    model_called: bool


@dataclass
class StepInfo:
    """What a ``callback`` sees after each model call (tests, logging)."""

    t: int
    settled_end: int
    active_end: int
    raw: Tensor  # (B, A, N) network outputs at the active positions
    x_before: Tensor  # (B, A)
    x_after: Tensor  # (B, A)
    n_cells: int  # cells run by this forward pass
    n_cached: int  # cells read from the KV cache


@dataclass
class GenerationResult:
    """Output of :func:`generate`."""

    tokens: Tensor  # (B, d) generated sequences (prompt included)
    n_model_calls: int
    wall_time: float
    tokens_per_s: float  # generated (non-prompt) tokens per second
    steps: int  # T of the hyperschedule
    prompt_len: int = 0
    sampler: str = ""  # the sampler's name ("auto" resolved)
    hyperschedule: object = field(default=None, repr=False)
    trace: list[TraceStep] | None = field(default=None, repr=False)
    lengths: Tensor | None = None  # (B,) with stop_at_eos: tokens before each sequence's first EOS

    def texts_ids(self) -> list[list[int]]:
        """Each sequence's token ids, cut before its first EOS when generation stopped at one."""
        rows = self.tokens.tolist()
        return rows if self.lengths is None else [r[:n] for r, n in zip(rows, self.lengths.tolist())]


def _prompt_tensor(prompt, batch_size: int, d: int, N: int, device) -> Tensor | None:
    if prompt is None:
        return None
    prompt = torch.as_tensor(prompt, dtype=torch.long)
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0).expand(batch_size, -1)
    if prompt.dim() != 2 or prompt.shape[0] != batch_size:
        raise HDLMError(f"prompt of shape {tuple(prompt.shape)}: expected (P,) or (batch_size = {batch_size}, P)")
    if prompt.shape[1] > d:
        raise HDLMError(f"prompt of {prompt.shape[1]} tokens is longer than the sequence length d = {d}")
    if prompt.numel() and (int(prompt.min()) < 0 or int(prompt.max()) >= N):
        raise HDLMError(f"prompt token ids must be real tokens in [0, {N})")
    return prompt.to(device)


def _final_clean(n: int, d: int, settled_attention: str, width: int) -> int:
    """How many of the clean cells predicting [0, n) have final keys/values (may be cached).

    Token-causal: all of them. Block-causal: those whose block of ω predicted positions is
    complete (or everything, once the whole sequence is settled).
    """
    if settled_attention == "causal" or n >= d:
        return n
    return (n // width) * width


def _context_window(model, hs, shift: int) -> tuple[int | None, int]:
    """(window, KV cache length): beyond the training length d (§4.5), Block, Slide and Quench keep
    the last d positions in view (window = d, see :func:`_attention_mask`); within d there is none."""
    context = getattr(model.cfg, "length", None) or hs.d
    if hs.d <= context:
        return None, hs.d + shift
    if hs.kind == "flat" or hs.width > context:
        raise HDLMError(f"length {hs.d} > the model's training length d = {context}: only Block, Slide and "
                        f"Quench with width <= d generate beyond it (a Flat step denoises all {hs.d} positions at once)")
    return context, min(hs.d, context + 3 * hs.width) + shift


def _checked_inputs(model, process, batch_size: int, generator) -> tuple[torch.device, torch.Generator]:
    """The model's device and the generator (default: seed 0 there), after checking the inputs agree."""
    if process.N != model.n_real:
        raise HDLMError(f"process has N = {process.N} tokens but the model predicts {model.n_real}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise HDLMError(f"batch_size = {batch_size!r}: must be a positive integer")
    device = next(model.parameters()).device
    if generator is None:
        return device, torch.Generator(device=device).manual_seed(0)
    if torch.device(generator.device).type != device.type:
        raise HDLMError(f"the generator is on {generator.device} but the model is on {device}: "
                        f"make it with torch.Generator(device='{device}')")
    return device, generator


@torch.no_grad()
def generate(model, process, hyperschedule, sampler: Sampler, batch_size: int, prompt=None,
             generator: torch.Generator | None = None, *, kv_cache: bool = True, trace: bool = False,
             progress: bool = True, callback: Callable[[StepInfo], None] | None = None,
             lazy: bool = True, stop_at_eos: int | None = None, infill=None) -> GenerationResult:
    """Generate ``batch_size`` sequences of length d = ``hyperschedule.d`` (paper §3, App. B.4). ``prompt``: LongTensor (P,) or (B, P) of real token ids, settled from the start. ``generator``:
    the only source of randomness (on the model's device; default: seed 0). ``kv_cache``: cache
    the settled cells' keys/values (§3.3). ``trace``: keep x_t of every step (CPU) for plots.
    ``lazy``: the output head only where a token can change (``Sampler.plan``), no model call where
    none can; ``False``: at every active position every step (same tokens). ``stop_at_eos``: EOS id;
    once every sequence has an EOS settled after the prompt no step runs (Flat only cuts at the
    end); ``lengths`` says where each text ends (tokens/s counts the tokens before it). ``infill``
    (Flat only): (d,)/(B, d) token ids to keep (level 0 at every step), −1 where to generate.
    """
    hs = hyperschedule
    cfg = model.cfg
    device, generator = _checked_inputs(model, process, batch_size, generator)
    B, d, shift = int(batch_size), hs.d, cfg.shift
    prompt, fixed = _prompt_tensor(prompt, B, d, process.N, device), _infill_tensor(infill, prompt, hs, B, process.N, device)
    P = 0 if prompt is None else prompt.shape[1]
    ar = hs.levels == 1 and shift == 1  # Quench + SHIFTED: the model is an AR model (as trained)
    kw = dict(settled_attention=cfg.settled_attention, block_width=hs.width)

    was_training = model.training
    model.eval()
    try:
        x = _initial_state(process, B, d, prompt, fixed, generator, device)
        # Flat without a prompt never settles anything before the end: nothing to cache
        settles = ar or P > 0 or int(hs.splits()[0].max()) > 0
        window, room = _context_window(model, hs, shift)
        cache = model.new_cache(B, room, device=device) if kv_cache and settles else None
        committed = calls = 0  # committed: clean cells in the cache, those predicting positions [0, committed)
        steps: list[TraceStep] | None = [] if trace else None
        _sync(device)
        start = time.perf_counter()
        bar = _progress(hs.T, progress)
        for t in range(hs.T):
            settled_end, active_end = hs.split(t)
            settled_end = max(settled_end, P)
            if stop_at_eos is not None and _eos_settled(x, P, settled_end, stop_at_eos).all():
                break
            x_before, n_cells = x, None
            if active_end > settled_end:
                x, n_cells, _, committed = _step(model, process, hs, sampler, x, t, settled_end, active_end,
                                                 (P, fixed), shift, ar, cache, committed, kw, generator, callback, lazy, window)
                calls += n_cells is not None
            if steps is not None:
                steps.append(TraceStep(t, settled_end, max(active_end, settled_end), x_before.cpu(), n_cells is not None))
            bar.update(1)
        bar.close()
        _sync(device)
        wall = time.perf_counter() - start
    finally:
        model.train(was_training)
    lengths = None if stop_at_eos is None else _text_lengths(x, P, stop_at_eos)
    generated = B * (d - P) if lengths is None else int((lengths - P).sum())
    return GenerationResult(tokens=x, n_model_calls=calls, wall_time=wall,
                            tokens_per_s=generated / wall if wall > 0 else float("inf"),
                            steps=hs.T, prompt_len=P, sampler=sampler.name, hyperschedule=hs, trace=steps,
                            lengths=lengths)


def _initial_state(process, B: int, d: int, prompt: Tensor | None, fixed: Tensor | None, generator,
                   device) -> Tensor:
    """x_0: a draw from the prior, with the prompt in front and the infilling conditions in place."""
    x = process.prior((B, d), generator=generator, device=device)
    if prompt is not None:
        x[:, : prompt.shape[1]] = prompt
    if fixed is not None:
        x = torch.where(fixed >= 0, fixed, x)
    return x


def _infill_tensor(infill, prompt, hs, batch_size: int, N: int, device) -> Tensor | None:
    """The infilling conditions (B, d): a token id where it is given, −1 where it is generated.

    Only Flat: Block, Slide and Quench denoise left to right and never show the model a clean token
    after the active window (those positions are worthless, Eq. 1), so only a prefix (``prompt``)
    can condition them.
    """
    if infill is None:
        return None
    if hs.kind != "flat":
        raise HDLMError(f"infilling needs a Flat hyperschedule: {hs.kind} only supports a prefix (use a prompt)")
    if prompt is not None:
        raise HDLMError("give either a prompt or infilling conditions (a prefix is one), not both")
    fixed = torch.as_tensor(infill, dtype=torch.long)
    fixed = fixed.unsqueeze(0).expand(batch_size, -1) if fixed.dim() == 1 else fixed
    if fixed.shape != (batch_size, hs.d):
        raise HDLMError(f"infill of shape {tuple(fixed.shape)}: expected (d = {hs.d},) or ({batch_size}, {hs.d})")
    if int(fixed.min()) < -1 or int(fixed.max()) >= N:
        raise HDLMError(f"infill entries must be token ids in [0, {N}) or -1 (generate)")
    return fixed.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eos_settled(x: Tensor, P: int, settled_end: int, eos: int) -> Tensor:
    """(B,) whether each sequence has an EOS among its settled generated tokens [P, settled_end)."""
    return (x[:, P:settled_end] == eos).any(1)


def _text_lengths(x: Tensor, P: int, eos: int) -> Tensor:
    """(B,) index of each sequence's first EOS after the prompt (d where there is none), on the CPU."""
    is_eos = (x[:, P:] == eos).cpu()
    first = torch.argmax(is_eos.to(torch.int8), dim=1) + P
    return torch.where(is_eos.any(1), first, torch.full_like(first, x.shape[1]))


def _step(model, process, hs, sampler, x, t, settled_end, active_end, P, shift, ar, cache, committed, kw,
          generator, callback, lazy=True, window=None):
    """One sampler step, with a model call unless no position can change (``lazy``).

    Returns (x, cells run or None when the model was not called, cells cached, committed).
    """
    device = x.device
    level_now = hs.level_at_step(t, torch.float64).to(device)
    level_next = hs.level_at_step(t + 1, torch.float64).to(device)
    P, fixed = P
    level_now[:P] = 0.0  # the prompt is settled at every step
    level_next[:P] = 0.0
    if fixed is not None:  # so are the infilling conditions: no sampler moves them
        level_now, level_next = (lv.expand(fixed.shape).masked_fill(fixed >= 0, 0.0) for lv in (level_now, level_next))
    x_act = x[:, settled_end:active_end]
    plan = sampler.plan(x_act, level_now[settled_end:active_end], level_next[settled_end:active_end], generator)
    if lazy and not plan.need.any():  # the model's output would not be read (issue #16.4)
        return x, None, committed if cache is not None else 0, committed
    clean_from = committed if cache is not None else 0
    cells, out_index = inference_cells(x, level_now, settled_end, active_end, process, shift,
                                       clean_from=clean_from, ar=ar, **kw)
    commit = 0
    if cache is not None:
        clean_end = committed + cells.n_clean
        commit = max(0, _final_clean(clean_end, hs.d, kw["settled_attention"], kw["block_width"]) - committed)
    mask, n_cached = _attention_mask(cells, cache, committed, shift, kw, window)
    need = plan.need if lazy else torch.ones_like(plan.need)
    raw_need = _outputs(model, cells, mask, out_index, need, cache, commit)
    if not lazy:
        raw_need = raw_need.view(*need.shape, -1)[plan.need]
    committed += commit  # the model advanced the cache by `commit`; later cells get overwritten
    new = sampler.finish(plan, raw_need, generator)
    x = x.clone()
    x[:, settled_end:active_end] = new
    if callback is not None:
        raw = raw_need.new_zeros(*plan.need.shape, raw_need.shape[-1])
        raw[plan.need] = raw_need
        callback(StepInfo(t, settled_end, active_end, raw, x_act, new, len(cells.layout), n_cached))
    return x, len(cells.layout), n_cached, committed


def _attention_mask(cells, cache, committed: int, shift: int, kw: dict, window: int | None) -> tuple[Tensor, int]:
    """The (new cells × cached + new cells) mask and the number of cached cells attended to.

    ``window`` (generation beyond the training length d): every cell also sees only the cells
    whose input position is within d − 1 + shift of its own (as far as training ever reaches:
    a SHIFTED interval's last input is d − 1, BOS is at −1); the cache first drops the cells no
    later cell can see (the clean cells before committed − d − shift + 1: queries never move back).
    """
    device = cells.tokens.device
    kv_layout = cells.layout
    if window is not None:
        window += shift
    if cache is not None:
        if window is not None:
            cache.drop(max(0, committed - window + 1 - cache.start))
        if committed:
            cached = clean_layout(committed, shift, device=device, **kw)[cache.start:]
            kv_layout = concat_layouts(cached, cells.layout)
    # SDPA with a boolean mask on every device: the step shapes change every step, and a compiled
    # FlexAttention kernel would be recompiled for each new shape; the masks here are small.
    mask = dense_mask(cells.layout, kv_layout, device=device)
    if window is not None:
        mask = mask & ((cells.layout.pos[:, None] - kv_layout.pos[None, :]).abs() < window)
    return mask, len(kv_layout) - len(cells.layout)


def _outputs(model, cells, mask, out_index: Tensor, need: Tensor, cache, commit: int) -> Tensor:
    """Network outputs (M, N) at the active positions need.nonzero() (row-major), nowhere else.

    The output head runs per sequence at its K = max_b |need_b| needed cells (DESIGN.md §9).
    Without a KV cache, the sequences that need nothing are left out of the forward pass.
    """
    rows = need.any(1)
    if cache is not None or bool(rows.all()):
        rows = None
    need_rows = need if rows is None else need[rows]
    count = need_rows.sum(1)
    K = int(count.max())
    order = torch.argsort((~need_rows).to(torch.int8), dim=1, stable=True)[:, :K]  # needed first, in order
    index = out_index[order]  # (B', K) cells
    tokens, sigma, keep = cells.tokens, cells.sigma, cells.keep
    if rows is not None:
        tokens, sigma, keep = tokens[rows], sigma[rows], keep[rows]
    raw = model(tokens, sigma, cells.positions, mask, keep=keep, out_index=index, cache=cache, commit=commit)
    valid = torch.arange(K, device=need.device).unsqueeze(0) < count.unsqueeze(1)
    return raw[valid]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    """A tqdm bar on a terminal (none in pipes, logs and tests)."""
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step", leave=False)
