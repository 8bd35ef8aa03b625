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

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..errors import HDLMError
from ..layout import inference_cells
from ..model import HDLMTransformer
from ..masks import clean_layout, concat_layouts, dense_mask
from .rng import SequenceGenerators
from .samplers import Generator, Sampler


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
    n_reused: int = 0  # sequence-steps whose output came from the OutputStore (no forward pass for them)

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


def _checked_inputs(model, process, batch_size: int, generator) -> tuple[torch.device, Generator]:
    """The model's device and the generator (default: per-sequence streams of seed 0), after checking."""
    if process.N != model.n_real:
        raise HDLMError(f"process has N = {process.N} tokens but the model predicts {model.n_real}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise HDLMError(f"batch_size = {batch_size!r}: must be a positive integer")
    device = next(model.parameters()).device
    if generator is None:
        return device, SequenceGenerators(0, range(int(batch_size)), device)
    if isinstance(generator, SequenceGenerators) and len(generator) != batch_size:
        raise HDLMError(f"{len(generator)} sequence generators for a batch of {batch_size}")
    if torch.device(generator.device).type != device.type:
        raise HDLMError(f"the generator is on {generator.device} but the model is on {device}: "
                        f"make it with torch.Generator(device='{device}')")
    return device, generator


@dataclass
class _Run:
    """What every step of one :func:`generate` call shares."""

    model: object
    process: object
    hs: object
    sampler: Sampler
    generator: Generator
    prompt_len: int
    fixed: Tensor | None  # infilling conditions (B, d), −1 where generated
    ar: bool
    cache: object
    kw: dict  # settled_attention, block_width
    window: int | None
    lazy: bool
    callback: Callable[[StepInfo], None] | None
    reuse: OutputStore | None
    committed: int = 0  # clean cells in the cache: those predicting positions [0, committed)
    calls: int = 0


@torch.no_grad()
def generate(model, process, hyperschedule, sampler: Sampler, batch_size: int, prompt=None,
             generator: Generator = None, *, kv_cache: bool = True, trace: bool = False,
             progress: bool = True, callback: Callable[[StepInfo], None] | None = None,
             lazy: bool = True, stop_at_eos: int | None = None, infill=None, reuse: bool = True) -> GenerationResult:
    """Generate ``batch_size`` sequences of length d = ``hyperschedule.d`` (paper §3, App. B.4). ``prompt``: LongTensor (P,) or (B, P) of real token ids, settled from the start. ``generator``:
    the only source of randomness (on the model's device): :class:`SequenceGenerators` (one stream
    per sequence, so a sequence's tokens do not depend on the batch; default: seed 0, sequences
    0..B−1) or a ``torch.Generator`` (one stream for the batch). ``kv_cache``: cache
    the settled cells' keys/values (§3.3). ``trace``: keep x_t of every step (CPU) for plots.
    ``lazy``: the output head only where a token can change (``Sampler.plan``), no model call where
    none can; ``False``: at every active position every step (same tokens). ``stop_at_eos``: EOS id;
    once every sequence has an EOS settled after the prompt no step runs (Flat only cuts at the
    end); ``lengths`` says where each text ends (tokens/s counts the tokens before it). ``infill``
    (Flat only): (d,)/(B, d) token ids to keep (level 0 at every step), −1 where to generate.
    ``reuse`` (models without time conditioning): a sequence whose model input did not change since
    the last call reuses that call's output (:class:`OutputStore`, exact; issue #16.4).
    """
    hs, cfg = hyperschedule, model.cfg
    device, generator = _checked_inputs(model, process, batch_size, generator)
    B, d, shift = int(batch_size), hs.d, cfg.shift
    prompt, fixed = _prompt_tensor(prompt, B, d, process.N, device), _infill_tensor(infill, prompt, hs, B, process.N, device)
    P = 0 if prompt is None else prompt.shape[1]
    ar = hs.levels == 1 and shift == 1  # Quench + SHIFTED: the model is an AR model (as trained)
    window, room = _context_window(model, hs, shift)
    # Flat without a prompt never settles anything before the end: nothing to cache
    settles = ar or P > 0 or int(hs.splits()[0].max()) > 0
    cache = model.new_cache(B, room, device=device) if kv_cache and settles else None
    store = OutputStore() if reuse and lazy and not getattr(cfg, "time_conditioning", True) else None
    run = _Run(model, process, hs, sampler, generator, P, fixed, ar, cache,
               dict(settled_attention=cfg.settled_attention, block_width=hs.width), window, lazy, callback, store)
    was_training = model.training
    model.eval()
    try:
        x = _initial_state(process, B, d, prompt, fixed, generator, device)
        x, steps, wall = _loop(run, x, trace, progress, stop_at_eos)
    finally:
        model.train(was_training)
    lengths = None if stop_at_eos is None else _text_lengths(x, P, stop_at_eos)
    generated = B * (d - P) if lengths is None else int((lengths - P).sum())
    return GenerationResult(tokens=x, n_model_calls=run.calls, wall_time=wall,
                            tokens_per_s=generated / wall if wall > 0 else float("inf"),
                            steps=hs.T, prompt_len=P, sampler=sampler.name, hyperschedule=hs, trace=steps,
                            lengths=lengths, n_reused=0 if store is None else store.reused)


def _loop(run: _Run, x: Tensor, trace: bool, progress: bool, stop_at_eos: int | None):
    """Steps t = 0 .. T−1; returns (x_T, the trace or None, seconds)."""
    hs, P = run.hs, run.prompt_len
    steps: list[TraceStep] | None = [] if trace else None
    _sync(x.device)
    start = time.perf_counter()
    bar = _progress(hs.T, progress)
    for t in range(hs.T):
        settled_end, active_end = hs.split(t)
        settled_end = max(settled_end, P)
        if stop_at_eos is not None and _eos_settled(x, P, settled_end, stop_at_eos).all():
            break
        x_before, called = x, False
        if active_end > settled_end:
            x, called = _step(run, x, t, settled_end, active_end)
            run.calls += called
        if steps is not None:
            steps.append(TraceStep(t, settled_end, max(active_end, settled_end), x_before.cpu(), called))
        bar.update(1)
    bar.close()
    _sync(x.device)
    return x, steps, time.perf_counter() - start


def _initial_state(process, B: int, d: int, prompt: Tensor | None, fixed: Tensor | None, generator,
                   device) -> Tensor:
    """x_0: a draw from the prior, with the prompt in front and the infilling conditions in place."""
    if isinstance(generator, SequenceGenerators):  # each sequence's prior from its own stream
        x = torch.cat([process.prior((1, d), generator=g, device=device) for g in generator.generators])
    else:
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


def _step(run: _Run, x: Tensor, t: int, settled_end: int, active_end: int) -> tuple[Tensor, bool]:
    """One sampler step, with a model call unless no position can change (``lazy``) or every
    sequence's input is unchanged (``reuse``). Returns (x_{t+1}, whether the model was called)."""
    hs, cache, kw = run.hs, run.cache, run.kw
    level_now, level_next = (_levels(run, hs.level_at_step(u, torch.float64).to(x.device)) for u in (t, t + 1))
    x_act = x[:, settled_end:active_end]
    plan = run.sampler.plan(x_act, level_now[..., settled_end:active_end], level_next[..., settled_end:active_end],
                            run.generator)
    if run.lazy and not plan.need.any():  # the model's output would not be read (issue #16.4)
        return x, False
    committed = run.committed
    cells, out_index = inference_cells(x, level_now, settled_end, active_end, run.process, run.model.cfg.shift,
                                       clean_from=committed if cache is not None else 0, ar=run.ar, **kw)
    commit = 0
    if cache is not None:
        commit = max(0, _final_clean(committed + cells.n_clean, hs.d, kw["settled_attention"], kw["block_width"])
                     - committed)
    mask, n_cached = _attention_mask(cells, cache, committed, run.model.cfg.shift, kw, run.window,
                                     isinstance(run.model, HDLMTransformer))  # the DiT reads None as dense
    need = plan.need if run.lazy else torch.ones_like(plan.need)
    key = (settled_end, active_end, committed, 0 if cache is None else cache.start)
    raw_need, called = _outputs(run, cells, mask, out_index, need, commit, key)
    if not run.lazy:
        raw_need = raw_need.view(*need.shape, -1)[plan.need]
    run.committed += commit  # the model advanced the cache by `commit`; later cells get overwritten
    new = run.sampler.finish(plan, raw_need, run.generator)
    x = x.clone()
    x[:, settled_end:active_end] = new
    if run.callback is not None:
        raw = raw_need.new_zeros(*plan.need.shape, raw_need.shape[-1])
        raw[plan.need] = raw_need
        run.callback(StepInfo(t, settled_end, active_end, raw, x_act, new, len(cells.layout), n_cached))
    return x, called


def _levels(run: _Run, level: Tensor) -> Tensor:
    """The levels of one step with the prompt and the infilling conditions settled (level 0)."""
    level[: run.prompt_len] = 0.0  # the prompt is settled at every step
    if run.fixed is not None:  # so are the infilling conditions: no sampler moves them
        level = level.expand(run.fixed.shape).masked_fill(run.fixed >= 0, 0.0)
    return level


def _attention_mask(cells, cache, committed: int, shift: int, kw: dict, window: int | None,
                    dense_ok: bool = False) -> tuple[Tensor | None, int]:
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
    if dense_ok and bool(mask.all()):  # an active window that sees every cached cell: SDPA without a mask
        mask = None
    return mask, len(kv_layout) - len(cells.layout)


def _outputs(run: _Run, cells, mask, out_index: Tensor, need: Tensor, commit: int, key: tuple) -> tuple[Tensor, bool]:
    """Network outputs (M, N) at the active positions need.nonzero() (row-major), nowhere else, and
    whether the model ran.

    The output head runs per sequence at its K = max_b |need_b| needed cells (DESIGN.md §9).
    The sequences that need nothing are left out of the forward pass (with a KV cache, unless the
    pass commits cells to it); with an :class:`OutputStore` so are those whose input is unchanged
    (the head then reads their stored features).
    """
    model, cache, store = run.model, run.cache, run.reuse
    rows = need.any(1)
    whole = cache is not None and commit > 0  # a pass that writes the cache takes every sequence
    if store is not None:
        rows = store.rows_to_run(key, cells, rows, whole)
    full = whole or bool(rows.all())
    need_rows = need if store is not None or full else need[rows]
    count = need_rows.sum(1)
    K = int(count.max())
    order = torch.argsort((~need_rows).to(torch.int8), dim=1, stable=True)[:, :K]  # needed first, in order
    called = bool(rows.any())
    with contextlib.nullcontext() if cache is None else cache.subset(None if full else rows):
        if store is None:
            raw = _forward(model, cells, mask, None if full else rows, out_index[order], cache, commit)
        elif called:
            store.remember(rows, _forward(model, cells, mask, None if full else rows, out_index, cache, commit,
                                          _features))
    if store is not None:
        raw = store.head(_select_cells(store.features, order))
    valid = torch.arange(K, device=need.device).unsqueeze(0) < count.unsqueeze(1)
    return raw[valid], called


def _forward(model, cells, mask, rows: Tensor | None, index: Tensor, cache, commit: int, head_loss=None):
    """The model on the cells of the sequences ``rows`` (None: all), outputs at ``index``."""
    tokens, sigma, keep = cells.tokens, cells.sigma, cells.keep
    if rows is not None:
        tokens, sigma, keep = tokens[rows], sigma[rows], keep[rows]
    return model(tokens, sigma, cells.positions, mask, keep=keep, out_index=index, cache=cache, commit=commit,
                 head_loss=head_loss)


def _features(features: Tensor, head: Callable, params: tuple) -> tuple:
    """``head_loss`` hook: the head's input features (B, K, h) and the head itself, unapplied."""
    return features, head, params


def _select_cells(x: Tensor, order: Tensor) -> Tensor:
    """x (B, A, h) at the cells ``order`` (B, K) -> (B, K, h)."""
    return torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))


class OutputStore:
    """Output reuse (issue #16.4): the head's input features of the last call, per sequence.

    A model without time conditioning sees, at a step, only the cells' tokens, their Eq. (12) keep
    weights, positions and mask. When the step has the same layout as the last call (same Eq. (1)
    split and cache state) and a sequence's tokens and keep weights are unchanged (a Flat step that
    revealed nothing), its network output is unchanged: the stored features are reused and the
    head runs only where a token can change. Exact by construction.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.tokens = self.keep = self.features = None
        self.valid: Tensor | None = None  # (B,) sequences whose stored features match their inputs
        self.head_fn, self.params = None, ()
        self.reused = 0  # sequence-steps answered from the store

    def rows_to_run(self, key: tuple, cells, rows: Tensor, whole_batch: bool) -> Tensor:
        """(B,) the sequences the model must run this step, of the ``rows`` that need outputs
        (``whole_batch``: a pass that commits to the KV cache runs them all)."""
        if key != self.key or self.valid is None:
            self.key, self.valid, self.features = key, torch.zeros_like(rows), None
        else:
            self.valid &= (cells.tokens == self.tokens).all(1) & (cells.keep == self.keep).all(1)
        self.tokens, self.keep = cells.tokens, cells.keep
        run = rows & ~self.valid
        if whole_batch and run.any():
            run = torch.ones_like(rows)
        self.valid &= ~run  # the rows run now are refreshed by remember()
        self.reused += int((rows & ~run).sum())
        return run

    def remember(self, rows: Tensor, fresh: tuple) -> None:
        """Store the features (B', A, h) of the sequences ``rows`` just run, and the head."""
        features, self.head_fn, self.params = fresh
        if self.features is None:
            self.features = features.new_zeros(rows.shape[0], *features.shape[1:])
        self.features[rows] = features
        self.valid |= rows

    def head(self, features: Tensor) -> Tensor:
        """The output head on stored features (B, K, h)."""
        return self.head_fn(features, *self.params)


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
