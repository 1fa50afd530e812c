"""The serving order: which samples go into each producer batch, epoch after epoch, minus bad files.

`EpochFeed` cuts the epochs into `Plan`s, one per batch; the producer sends each to its stage worker
as a task. When the worker is lost with tasks in flight, the producer excludes the files the probes
blamed and rewinds the feed to the oldest lost plan: the samples already served keep their
positions, the rest of the epoch closes up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..wire.order import epoch_order
from .dataset import Dataset
from ..errors import DatasetError


@dataclass(frozen=True)
class Plan:
    epoch: int
    start: int            # position of the first sample in the epoch's order
    indices: np.ndarray   # stable sample indices, int64
    labels: np.ndarray
    last: bool            # the epoch's last batch
    order: np.ndarray     # the epoch's order this batch was cut from (needed to rewind)


class EpochFeed:
    def __init__(self, dataset: Dataset, batch_size: int, seed: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.excluded: dict[int, str] = {}  # sample index -> why DALI cannot decode it
        self._start_epoch(0)

    @property
    def epoch_size(self) -> int:
        """Samples in the epoch being fed."""
        return len(self._order)

    def _start_epoch(self, epoch: int) -> None:
        order = epoch_order(len(self.dataset), self.seed, epoch)
        self._epoch, self._pos, self._order = epoch, 0, self._without_excluded(order)
        if not len(self._order):
            raise DatasetError(f"none of the {len(self.dataset)} files in {self.dataset.root} can be decoded")

    def _without_excluded(self, order: np.ndarray) -> np.ndarray:
        if not self.excluded:
            return order
        return order[~np.isin(order, np.fromiter(self.excluded, dtype=np.int64))]

    def next_epoch(self) -> int:
        """The epoch of the next plan."""
        return self._epoch + (self._pos == len(self._order))

    def position(self) -> tuple[int, int]:
        """(epoch, position in its order) of the next plan's first sample."""
        return (self._epoch, self._pos)

    def next_plan(self, limit: int | None = None) -> Plan:
        """The next batch: ``batch_size`` samples, or ``limit`` (fewer), or the rest of the epoch."""
        if self._pos == len(self._order):
            self._start_epoch(self._epoch + 1)
        indices = self._order[self._pos : self._pos + min(self.batch_size, limit or self.batch_size)]
        last = self._pos + len(indices) == len(self._order)
        plan = Plan(self._epoch, self._pos, indices, self.dataset.labels[indices], last, self._order)
        self._pos += len(indices)
        return plan

    def skip_rest_of_epoch(self) -> None:
        """The next plan starts the next epoch (nobody reads the rest of this one)."""
        if self._pos:
            self._start_epoch(self._epoch + 1)

    def exclude(self, index: int, reason: str) -> None:
        self.excluded[index] = reason

    def rewind(self, plan: Plan) -> None:
        """Feed again from the start of ``plan`` (which failed), without the excluded samples."""
        served, rest = plan.order[: plan.start], plan.order[plan.start :]
        self._epoch, self._pos = plan.epoch, plan.start
        self._order = np.concatenate([served, self._without_excluded(rest)])
