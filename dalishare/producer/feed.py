"""The serving order: which samples go into each producer batch, epoch after epoch, minus bad files.

`EpochFeed` cuts the epochs into `Plan`s, one per batch; the producer sends each to its stage worker
as a task. When the worker is lost with tasks in flight, the producer excludes the files the probes
blamed and rewinds the feed to the oldest lost plan: the samples already served keep their
positions, the rest of the epoch closes up. A producer serving one node's shard (``--shard I/N``)
feeds that node's share of each epoch's order (DistributedSampler's cut, padded with flagged
repeats); there an excluded file is replaced by a flagged repeat of a neighbour instead, so every
node's share keeps the same size and the ranks' batch counts stay equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..wire.order import epoch_order, share
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
    padded: np.ndarray    # bool per sample of ``indices``: a repeat that evens out a shard (or stands in for an excluded file)
    order_padded: np.ndarray  # the same for the whole ``order``


class EpochFeed:
    def __init__(self, dataset: Dataset, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)):
        self.dataset, self.batch_size, self.seed, self.shard = dataset, batch_size, seed, shard
        self.excluded: dict[int, str] = {}  # sample index -> why DALI cannot decode it
        # (epoch, position) up to which plans are one file each, after a failure that no single file
        # explained (two files that only fail together); None: whole batches
        self._careful_until: tuple[int, int] | None = None
        self._start_epoch(0)

    @property
    def epoch_size(self) -> int:
        """Samples in the epoch being fed."""
        return len(self._order)

    def _start_epoch(self, epoch: int) -> None:
        order = epoch_order(len(self.dataset), self.seed, epoch)
        padded = np.zeros(len(order), dtype=bool)
        if self.shard[1] > 1:
            order, padded = share(order, *self.shard)
        self._epoch, self._pos = epoch, 0
        self._order, self._padded = self._without_excluded(order, padded)
        if not len(self._order):
            raise DatasetError(f"none of the {len(self.dataset)} files in {self.dataset.root} can be decoded")

    def _without_excluded(self, order: np.ndarray, padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``order`` without the excluded files: dropped, or for a shard replaced by a flagged repeat
        of the nearest decodable sample before them (after them at the start)."""
        if not self.excluded:
            return order, padded
        bad = np.isin(order, np.fromiter(self.excluded, dtype=np.int64))
        if self.shard[1] == 1:
            return order[~bad], padded[~bad]
        good = np.flatnonzero(~bad)
        if not good.size:
            return order[:0], padded[:0]
        stand_in = good[np.clip(np.searchsorted(good, np.arange(len(order)), side="right") - 1, 0, None)]
        return order[stand_in], padded | bad

    def next_epoch(self) -> int:
        """The epoch of the next plan."""
        return self._epoch + (self._pos == len(self._order))

    def position(self) -> tuple[int, int]:
        """(epoch, position in its order) of the next plan's first sample."""
        return (self._epoch, self._pos)

    def careful(self) -> bool:
        """The next plan re-makes a lost batch one file at a time (send it alone)."""
        return self._careful_until is not None

    def next_plan(self, limit: int | None = None) -> Plan:
        """The next batch: ``batch_size`` samples, or ``limit`` (fewer), or the rest of the epoch;
        one sample while `careful`."""
        if self._pos == len(self._order):
            self._start_epoch(self._epoch + 1)
        if self._careful_until is not None:
            limit = 1
        rows = slice(self._pos, self._pos + min(self.batch_size, limit or self.batch_size))
        indices = self._order[rows]
        last = self._pos + len(indices) == len(self._order)
        plan = Plan(self._epoch, self._pos, indices, self.dataset.labels[indices], last, self._order,
                    self._padded[rows], self._padded)
        self._pos += len(indices)
        if self._careful_until is not None and self.position() >= self._careful_until:
            self._careful_until = None
        return plan

    def skip_rest_of_epoch(self) -> None:
        """The next plan starts the next epoch (nobody reads the rest of this one)."""
        if self._pos:
            self._start_epoch(self._epoch + 1)

    def exclude(self, index: int, reason: str) -> None:
        self.excluded[index] = reason

    def redo(self, lost: list[Plan], careful: bool) -> None:
        """Feed again from the oldest of the ``lost`` plans (its worker went with them); ``careful``:
        no file explained the loss, so up to the end of the newest they are re-made one file each."""
        if not lost:
            return
        self.rewind(lost[0])
        if careful:
            end = (lost[-1].epoch, lost[-1].start + len(lost[-1].indices))
            self._careful_until = max(self._careful_until or end, end)

    def rewind(self, plan: Plan) -> None:
        """Feed again from the start of ``plan`` (which failed), without the excluded samples."""
        self._epoch, self._pos = plan.epoch, plan.start
        rest, rest_padded = self._without_excluded(plan.order[plan.start :], plan.order_padded[plan.start :])
        self._order = np.concatenate([plan.order[: plan.start], rest])
        self._padded = np.concatenate([plan.order_padded[: plan.start], rest_padded])
