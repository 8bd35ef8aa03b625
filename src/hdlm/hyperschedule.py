"""Hyperschedules: a noise schedule per token position (paper §3.1, Fig. 2, Eq. (1)).

A hyperschedule is an integer table τ[t, i] ∈ {0, …, 𝒯} over generation steps t = 0..T
(t = 0 is pure noise, t = T is the output) and positions i = 0..d-1, with
𝒯 = τ[0, i] ≥ τ[1, i] ≥ … ≥ τ[T, i] = 0 (§3.1). Level k is the noise s = k/𝒯 ∈ [0, 1].

Derived quantities (§3.1, Eq. (1)):

- the window width ω: the largest number, over transitions t → t+1, of positions whose
  (τ_t^i, τ_{t+1}^i) is neither (0, 0) nor (𝒯, 𝒯);
- the generation rate ρ (long-sequence limit of d/T; ``rate`` is the finite-length d/T);
- for every transition, the split settled ⁀ active ⁀ worthless of Eq. (1).

The four schedules of Fig. 2 are :func:`quench` (AR), :func:`flat` (diffusion),
:func:`block` (block diffusion) and :func:`slide` (sliding window); :func:`custom` accepts any
valid table. The continuous view of DESIGN.md §2 (generation time u ∈ [0, 1], per-position noise
ℓ_i(u)) serves training and likelihood: NELBO = E_u Σ_i |dℓ_i/du| L_i(x_u, ℓ_i(u)).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .config import SCHEDULE_KINDS as KINDS
from .config import WINDOWED_KINDS
from .errors import HDLMError

if TYPE_CHECKING:  # pragma: no cover
    from .config import ScheduleConfig


@dataclass(frozen=True, eq=False)
class Hyperschedule:
    """An immutable, validated hyperschedule τ[t, i] (paper §3.1, Fig. 2).

    ``table`` is a LongTensor (T+1, d) and must be treated as read-only: the split of Eq. (1)
    and the width are computed from it once, at construction.
    """

    table: Tensor
    levels: int
    kind: str
    rho: float
    _settled: Tensor = field(init=False, repr=False)
    _active: Tensor = field(init=False, repr=False)
    _split_list: tuple = field(init=False, repr=False)
    _width: int = field(init=False, repr=False)
    _views: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        table = _validated_table(self.table, self.levels, self.kind)
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "levels", int(self.levels))
        object.__setattr__(self, "rho", float(self.rho))
        settled, active, width = _splits_and_width(table, self.levels)
        object.__setattr__(self, "_settled", settled)
        object.__setattr__(self, "_active", active)
        # Samplers ask for one split per step: plain Python ints make that O(1).
        object.__setattr__(self, "_split_list", tuple(zip(settled.tolist(), active.tolist())))
        object.__setattr__(self, "_width", width)
        object.__setattr__(self, "_views", {})

    # ---------------------------------------------------------------- discrete view

    @property
    def T(self) -> int:
        """Number of generation steps (the table has T + 1 rows)."""
        return self.table.shape[0] - 1

    @property
    def d(self) -> int:
        """Sequence length."""
        return self.table.shape[1]

    @property
    def width(self) -> int:
        """Window width ω (§3.1): max over t of #{i : (τ_t^i, τ_{t+1}^i) ∉ {(0, 0), (𝒯, 𝒯)}}."""
        return self._width

    @property
    def rate(self) -> float:
        """Finite-length generation rate d / T (ρ is its long-sequence limit, §3.1)."""
        return self.d / self.T

    def split(self, t: int) -> tuple[int, int]:
        """Eq. (1) for the transition t → t+1: ``(settled_end, active_end)``.

        Positions [0, settled_end) are settled ((τ_t, τ_{t+1}) = (0, 0): longest such prefix),
        [active_end, d) are worthless ((𝒯, 𝒯): longest such suffix), the rest is active.
        """
        if not 0 <= t < self.T:
            raise HDLMError(f"hyperschedule split: step t = {t} must be in [0, T = {self.T})")
        return self._split_list[t]

    def splits(self) -> tuple[Tensor, Tensor]:
        """Eq. (1) for every transition: ``(settled_end, active_end)``, two LongTensors (T,)."""
        return self._settled.clone(), self._active.clone()

    def level_at_step(self, t: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Noise levels τ[t] / 𝒯 ∈ [0, 1] of every position at step t, shape (d,)."""
        if not 0 <= t <= self.T:
            raise HDLMError(f"hyperschedule: step t = {t} must be in [0, T = {self.T}]")
        return self.table[t].to(dtype) / self.levels

    # ---------------------------------------------------------------- continuous view

    def _view(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(τ/𝒯, T|Δτ|/𝒯, settled_end, active_end) on ``device``, built once per device."""
        key = str(device)
        if key not in self._views:
            dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
            tab = self.table.to(dtype) / self.levels
            rate = (self.table[1:] - self.table[:-1]).abs().to(dtype) * (self.T / self.levels)
            self._views[key] = tuple(x.to(device) for x in (tab, rate, self._settled, self._active))
        return self._views[key]

    def _step_and_frac(self, u: Tensor | float) -> tuple[Tensor, Tensor, torch.dtype]:
        """t0 = min(⌊uT⌋, T-1) and the fraction uT - t0 ∈ [0, 1] (float64 where the device has it)."""
        u = torch.as_tensor(u)
        out_dtype = u.dtype if u.is_floating_point() else torch.get_default_dtype()
        tt = u.to(self._view(u.device)[0].dtype) * self.T
        # u = t/T stored in floating point may land a hair below t: snap to the step it means.
        tol = 4 * torch.finfo(out_dtype).eps * max(self.T, 1)
        near = torch.round(tt)
        tt = torch.where((tt - near).abs() <= tol, near, tt)
        t0 = tt.floor().clamp(0, self.T - 1).long()
        frac = (tt - t0).clamp(0.0, 1.0)
        return t0, frac, out_dtype

    def level(self, u: Tensor | float) -> Tensor:
        """ℓ(u) (…, d): τ/𝒯 interpolated linearly at t = uT (u = 0: full noise, u = 1: clean)."""
        t0, frac, dtype = self._step_and_frac(u)
        tab = self._view(t0.device)[0]
        lo, hi = tab[t0], tab[t0 + 1]
        return (lo + frac.unsqueeze(-1) * (hi - lo)).to(dtype)

    def level_rate(self, u: Tensor | float) -> Tensor:
        """|dℓ_i/du| (…, d) = T |τ[t+1, i] - τ[t, i]| / 𝒯 with t = min(⌊uT⌋, T-1)."""
        t0, _, dtype = self._step_and_frac(u)
        return self._view(t0.device)[1][t0].to(dtype)

    def window(self, u: Tensor | float) -> tuple[Tensor, Tensor]:
        """Eq. (1) split at t = min(⌊uT⌋, T-1): ``(start, end)`` LongTensors shaped like u."""
        t0, _, _ = self._step_and_frac(u)
        _, _, settled, active = self._view(t0.device)
        return settled[t0], active[t0]

    # ---------------------------------------------------------------- export

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary, including the table as nested lists."""
        return {
            "kind": self.kind,
            "d": self.d,
            "T": self.T,
            "levels": self.levels,
            "width": self.width,
            "rho": self.rho,
            "rate": self.rate,
            "table": self.table.tolist(),
        }

    def __repr__(self) -> str:
        return (f"Hyperschedule(kind={self.kind!r}, d={self.d}, T={self.T}, levels={self.levels}, "
                f"width={self.width}, rho={self.rho:g})")


# -------------------------------------------------------------------- validation helpers


def _validated_table(table: Any, levels: Any, kind: str) -> Tensor:
    """Check the §3.1 conditions on τ; raise HDLMError naming the first violation."""
    where = f"{kind} hyperschedule"
    try:
        tab = torch.as_tensor(table)
    except (TypeError, ValueError, RuntimeError) as e:
        raise HDLMError(f"{where}: table is not a numeric array ({e})") from None
    if tab.dim() != 2:
        raise HDLMError(f"{where}: table must be 2-D (T+1, d), got shape {tuple(tab.shape)}")
    if tab.shape[0] < 2:
        raise HDLMError(f"{where}: table needs at least 2 rows (T >= 1), got {tab.shape[0]}")
    if tab.shape[1] < 1:
        raise HDLMError(f"{where}: length d must be >= 1, got table of shape {tuple(tab.shape)}")
    if tab.dtype == torch.bool or tab.is_complex():
        raise HDLMError(f"{where}: table must hold integers, got dtype {tab.dtype}")
    if tab.is_floating_point():
        bad = ~torch.isfinite(tab) | (tab != tab.round())
        if bad.any():
            t, i = (int(v) for v in bad.nonzero()[0])
            raise HDLMError(f"{where}: table must hold integers, got {tab[t, i].item()} at step {t}, position {i}")
    tab = tab.to(torch.long).cpu().contiguous()
    if isinstance(levels, float) and levels.is_integer():
        levels = int(levels)
    if _as_int(levels) is None or levels < 1:
        raise HDLMError(f"{where}: levels must be a positive integer, got {levels!r}")
    levels = _as_int(levels)
    bad = (tab < 0) | (tab > levels)
    if bad.any():
        t, i = (int(v) for v in bad.nonzero()[0])
        raise HDLMError(f"{where}: table values must be in [0, levels = {levels}], "
                        f"got {tab[t, i].item()} at step {t}, position {i}")
    if (tab[0] != levels).any():
        i = int((tab[0] != levels).nonzero()[0])
        raise HDLMError(f"{where}: τ[0] must equal levels = {levels} everywhere (full noise), "
                        f"got {tab[0, i].item()} at position {i}")
    if (tab[-1] != 0).any():
        i = int((tab[-1] != 0).nonzero()[0])
        raise HDLMError(f"{where}: τ[T] must be 0 everywhere (clean), got {tab[-1, i].item()} at position {i}")
    up = tab[1:] > tab[:-1]
    if up.any():
        t, i = (int(v) for v in up.nonzero()[0])
        raise HDLMError(f"{where}: table is not non-increasing in t at position {i} (step {t + 1})")
    return tab


def _splits_and_width(table: Tensor, levels: int) -> tuple[Tensor, Tensor, int]:
    """Eq. (1) splits of every transition and the width ω, vectorised over t."""
    now, nxt = table[:-1], table[1:]
    settled = (now == 0) & (nxt == 0)
    worthless = (now == levels) & (nxt == levels)
    settled_end = settled.long().cumprod(dim=1).sum(dim=1)
    worthless_len = worthless.flip(1).long().cumprod(dim=1).sum(dim=1)
    active_end = table.shape[1] - worthless_len
    width = int((~settled & ~worthless).sum(dim=1).max())
    return settled_end, active_end, width


def _as_int(value: Any) -> int | None:
    """value as a Python int if it is an integer (numpy and 0-d tensor ints included), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_length(d: Any, kind: str) -> int:
    n = _as_int(d)
    if n is None or n <= 0:
        raise HDLMError(f"{kind} hyperschedule: length d = {d!r} must be a positive integer")
    return n


def _check_width(width: Any, d: int, kind: str) -> int:
    w = _as_int(width)
    if w is None or not 1 <= w <= d:
        raise HDLMError(f"{kind} hyperschedule: width = {width!r} must be an integer in [1, length = {d}]")
    return w


def _rate_fraction(rho: Any, kind: str) -> Fraction:
    """ρ as an exact fraction, so that ω/ρ and ⌊i/ρ⌋ are free of rounding (1/3 stays 1/3)."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float, Fraction)) or not math.isfinite(rho) or rho <= 0:
        raise HDLMError(f"{kind} hyperschedule: rho = {rho!r} must be a positive number")
    return Fraction(rho).limit_denominator(10**6)


def _levels_per_window(width: int, rho: Fraction, kind: str) -> int:
    """𝒯 = ω/ρ, which must be a positive integer."""
    levels = Fraction(width) / rho
    if levels.denominator != 1 or levels < 1:
        raise HDLMError(f"{kind} hyperschedule: rho = {float(rho):g} gives width/rho = {float(levels):g} "
                        f"levels; width/rho must be a positive integer (width = {width})")
    return int(levels)


def _annealed(start: Tensor, levels: int, T: int) -> Tensor:
    """τ[t, i] = clip(𝒯 - (t - start_i), 0, 𝒯): position i anneals during steps [start_i, start_i + 𝒯)."""
    t = torch.arange(T + 1).unsqueeze(1)
    return (levels - (t - start.unsqueeze(0))).clamp(0, levels)


# -------------------------------------------------------------------- constructors (Fig. 2)


def quench(d: int, rho: float = 1.0) -> Hyperschedule:
    """Standard AR, Fig. 2a: 𝒯 = 1, T = d, τ[t, i] = 1 if i ≥ t else 0 (ω = 1, ρ = 1)."""
    d = _check_length(d, "quench")
    if rho != 1:
        raise HDLMError(f"quench hyperschedule: rho = {rho!r} not allowed; quench has rho = 1 by construction")
    return Hyperschedule(_annealed(torch.arange(d), 1, d), levels=1, kind="quench", rho=1.0)


def flat(d: int, steps: int | None = None, rho: float | None = None) -> Hyperschedule:
    """Standard diffusion, Fig. 2b: 𝒯 = T, τ[t, i] = T - t for every i (ω = d).

    T = ``steps`` if given, else d/ρ (which must then be an integer); ρ defaults to 1.
    """
    d = _check_length(d, "flat")
    if steps is None:
        r = _rate_fraction(1.0 if rho is None else rho, "flat")
        T = Fraction(d) / r
        if T.denominator != 1:
            raise HDLMError(f"flat hyperschedule: rho = {rho!r} gives d/rho = {float(T):g} steps; "
                            f"d/rho must be an integer (d = {d})")
        steps = int(T)
    elif _as_int(steps) is None or steps < 1:
        raise HDLMError(f"flat hyperschedule: steps = {steps!r} must be a positive integer")
    else:
        steps = _as_int(steps)
        if rho is not None and Fraction(d, steps) != _rate_fraction(rho, "flat"):
            raise HDLMError(f"flat hyperschedule: rho = {rho!r} and steps = {steps} disagree "
                            f"(d/steps = {d / steps:g}); give one of them")
    table = torch.arange(steps, -1, -1).unsqueeze(1).expand(steps + 1, d).contiguous()
    return Hyperschedule(table, levels=steps, kind="flat", rho=d / steps)


def block(d: int, width: int, rho: float = 1.0) -> Hyperschedule:
    """Block diffusion, Fig. 2c: blocks of ω positions annealed one after another.

    Each block takes 𝒯 = ω/ρ steps (a positive integer); block b = i // ω anneals during steps
    [b𝒯, (b+1)𝒯), so T = ⌈d/ω⌉ 𝒯. The last block is shorter when ω ∤ d.
    """
    d = _check_length(d, "block")
    width = _check_width(width, d, "block")
    levels = _levels_per_window(width, _rate_fraction(rho, "block"), "block")
    n_blocks = -(-d // width)
    start = (torch.arange(d) // width) * levels
    return Hyperschedule(_annealed(start, levels, n_blocks * levels), levels=levels, kind="block", rho=rho)


def slide(d: int, width: int, rho: float = 1.0) -> Hyperschedule:
    """Sliding window ("smoothed AR"), Fig. 2d: position i anneals over 𝒯 = ω/ρ steps from s_i = ⌊i/ρ⌋.

    T = s_{d-1} + 𝒯. At ρ = 1: τ[t, i] = clip(ω - (t - i), 0, ω), T = d + ω - 1, the ω - 1 step
    overhead of Fig. 3's caption.
    """
    d = _check_length(d, "slide")
    width = _check_width(width, d, "slide")
    r = _rate_fraction(rho, "slide")
    levels = _levels_per_window(width, r, "slide")
    start = (torch.arange(d) * r.denominator) // r.numerator  # ⌊i/ρ⌋, exactly
    T = int(start[-1]) + levels
    return Hyperschedule(_annealed(start, levels, T), levels=levels, kind="slide", rho=rho)


def custom(table: Any, levels: int | None = None) -> Hyperschedule:
    """Any table satisfying §3.1: integers in [0, 𝒯], τ[0] = 𝒯, τ[T] = 0, non-increasing in t.

    𝒯 = ``levels`` if given, else the table's maximum. ρ is recorded as d/T.
    """
    try:
        tab = torch.as_tensor(table)
    except (TypeError, ValueError, RuntimeError) as e:
        raise HDLMError(f"custom hyperschedule: table is not a numeric array ({e})") from None
    if levels is None:
        if tab.numel() == 0:
            raise HDLMError(f"custom hyperschedule: table is empty (shape {tuple(tab.shape)})")
        levels = tab.max().item()
        if levels < 1:
            raise HDLMError(f"custom hyperschedule: table maximum is {levels}; the full-noise level τ[0] must be >= 1")
    rate = tab.shape[1] / (tab.shape[0] - 1) if tab.dim() == 2 and tab.shape[0] > 1 else 1.0
    return Hyperschedule(tab, levels=levels, kind="custom", rho=rate)


def make_hyperschedule(kind: str, d: int, width: int | None = None, rho: float | None = None,
                       steps: int | None = None) -> Hyperschedule:
    """Build one of the Fig. 2 hyperschedules by name; ``None`` means that kind's default.

    ``width`` applies to block/slide (default max(1, d // 4)), ``steps`` to flat only;
    ``rho`` defaults to 1 (quench accepts no other value).
    """
    if kind not in KINDS:
        raise HDLMError(f"hyperschedule kind '{kind}': must be one of {', '.join(KINDS)}")
    if steps is not None and kind != "flat":
        raise HDLMError(f"{kind} hyperschedule: steps applies to flat only (use rho to set the number of steps)")
    if kind == "flat":
        if width is not None and width != _as_int(d):
            raise HDLMError(f"flat hyperschedule: width = {width!r} not allowed; flat has width = length = {d}")
        return flat(d, steps=steps, rho=rho)
    if kind == "quench":
        if width is not None and width != 1:
            raise HDLMError(f"quench hyperschedule: width = {width!r} not allowed; quench has width = 1")
        return quench(d, rho=1.0 if rho is None else rho)
    if width is None and _as_int(d) is not None:
        width = max(1, _as_int(d) // 4)
    build = block if kind == "block" else slide
    return build(d, width, rho=1.0 if rho is None else rho)


def from_config(schedule_cfg: "ScheduleConfig", d: int, *, kind: str | None = None, width: int | None = None,
                rho: float | None = None, steps: int | None = None) -> Hyperschedule:
    """The hyperschedule an :class:`~hdlm.config.ScheduleConfig` describes for length d, with overrides.

    The one rule by which every command (``sample``, ``eval ppl``, ``eval gen``) and the pipeline
    merge a checkpoint's schedule with ``--schedule/--width/--rho/--steps``: a value given wins;
    an unset one comes from the config where it applies to the resulting kind —
    ``width`` for block/slide (so switching between block and slide keeps the checkpoint's ω;
    unset in the config: d/4), ``steps`` for flat, ``rho`` for every kind but quench (ρ = 1 by
    construction). Giving ``rho`` drops the config's ``steps`` and giving ``steps`` its ``rho``
    (each sets T). For flat with ``steps`` set, ``rho`` at its default 1 means "not given". A value
    given that does not apply to the kind is an error, never dropped.
    """
    sc = schedule_cfg
    kind = kind or sc.kind
    if rho is None and steps is None:
        rho = sc.rho if (kind == sc.kind or kind != "quench") else None  # quench: rho = 1 by construction
        steps = sc.steps if kind == "flat" else None
    if width is None and kind in WINDOWED_KINDS:
        width = sc.width
    if kind == "flat" and steps is not None and rho == 1.0:
        rho = None
    return make_hyperschedule(kind, d, width=width, rho=rho, steps=steps)
