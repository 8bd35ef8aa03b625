"""Batches of a :class:`hdlm.data.TokenDataset`: shuffled per epoch, resumable, sharded across ranks (App. E)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .errors import HDLMError

if TYPE_CHECKING:
    from .data import TokenDataset


class BatchIterator:
    """Infinite, epoch-wise shuffled, resumable batches, sharded across data-parallel ranks.

    ``batch_size`` is the PER-RANK batch. A *global batch* is ``batch_size * world_size``
    consecutive entries of the epoch's permutation (``torch.randperm`` seeded by (seed, epoch));
    rank r takes entries ``[r * batch_size, (r + 1) * batch_size)`` of it. So the ranks of a
    step see disjoint blocks whose concatenation, in rank order, is the batch a single process
    with ``batch_size * world_size`` would draw. With ``drop_last`` an epoch has
    ``len(dataset) // global`` batches; without it the last batch wraps around to the start of
    the same permutation, so every block is seen each epoch and batches stay full.

    ``state_dict()`` = ``{"epoch", "position"}`` (position: permutation entries already used this
    epoch); loading it into an iterator built with the same dataset and seed resumes the exact
    sequence of batches.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise HDLMError(f"batch iterator: need batch_size >= 1 and 0 <= rank < world_size "
                            f"(got batch_size={batch_size}, rank={rank}, world_size={world_size})")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, int(seed)
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.global_batch = batch_size * world_size
        n = len(dataset)
        if n == 0 or (drop_last and n < self.global_batch):
            raise HDLMError(f"dataset has {n} blocks of {dataset.d} tokens, fewer than one global batch of "
                            f"{self.global_batch} (batch_size {batch_size} x {world_size} ranks)")
        self.epoch, self.position = 0, 0
        self._perm: Optional[tuple[int, torch.Tensor]] = None

    @property
    def batches_per_epoch(self) -> int:
        n, g = len(self.dataset), self.global_batch
        return n // g if self.drop_last else -(-n // g)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of the blocks in ``epoch``: a function of (seed, epoch) only."""
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 2 ** 32 + epoch)
            self._perm = (epoch, torch.randperm(len(self.dataset), generator=g))
        return self._perm[1]

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> torch.Tensor:
        n = len(self.dataset)
        start = self.position + self.rank * self.batch_size
        idx = (torch.arange(start, start + self.batch_size) % n)
        batch = self.dataset.gather(self.permutation(self.epoch)[idx].numpy())
        self.position += self.global_batch
        if self.position >= self.batches_per_epoch * self.global_batch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = state.get("epoch"), state.get("position")
        if not (isinstance(epoch, int) and isinstance(position, int) and epoch >= 0 and position >= 0):
            raise HDLMError(f"batch iterator state {state!r}: expected non-negative integers epoch and position")
        self.epoch, self.position = epoch, position
        if self.position >= self.batches_per_epoch * self.global_batch:  # saved with a larger global batch
            self.epoch, self.position = self.epoch + 1, 0
