"""Per-sequence random streams for generation (issue #12.10): the same seed gives the same text
whatever the batch size.

Sequence i of a run with seed s draws every random number from its own generator, seeded with
``mix_seed(s, Stream.GENERATE, i)``, in the order of its own positions. Which other sequences share
its batch therefore changes none of its draws: 4 sequences generated in batches of 1, 2 or 4 are
the same 4 sequences (up to the floating-point rounding of a differently shaped forward pass).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from ..runtime import Stream, mix_seed


class SequenceGenerators:
    """One ``torch.Generator`` per sequence of a batch, for sequences ``indices`` of a run with ``seed``."""

    def __init__(self, seed: int, indices: Iterable[int], device: Any = None) -> None:
        self.seed, self.indices = int(seed), [int(i) for i in indices]
        self.device = torch.device(device if device is not None else "cpu")
        self.generators = [torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, Stream.GENERATE, i))
                           for i in self.indices]

    def __len__(self) -> int:
        return len(self.generators)

    def rand(self, rows: Tensor, inner: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """Uniforms (M, *inner) on [0, 1): row m from the generator of sequence ``rows[m]``.

        ``rows`` (M,) must be non-decreasing (row-major order, as ``nonzero`` gives): each
        sequence then draws its rows in its own position order, one call per sequence.
        """
        counts = torch.bincount(rows.reshape(-1).cpu(), minlength=len(self)).tolist()
        parts = [torch.rand((n, *inner), generator=self.generators[b], dtype=dtype, device=self.device)
                 for b, n in enumerate(counts) if n]
        if not parts:
            return torch.empty((0, *inner), dtype=dtype, device=self.device)
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def uniforms(shape: tuple[int, ...], generator: Any, dtype: torch.dtype, device: Any,
             rows: Tensor | None = None) -> Tensor:
    """``shape`` uniforms on [0, 1) from ``generator``: a ``torch.Generator`` (one stream for the
    batch) or :class:`SequenceGenerators`, where leading row m belongs to sequence ``rows[m]``
    (default: row m is sequence m)."""
    if isinstance(generator, SequenceGenerators):
        if rows is None:
            rows = torch.arange(shape[0])
        return generator.rand(rows, tuple(shape[1:]), dtype).to(device)
    return torch.rand(tuple(shape), generator=generator, dtype=dtype, device=device)


def sequence_rows(mask: Tensor) -> Tensor:
    """The sequence (row) index of each True entry of ``mask`` (B, A), in row-major order."""
    return mask.nonzero(as_tuple=True)[0]
