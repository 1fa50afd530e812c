"""`CacheReader`: a job's batches from the producer's cache, one epoch of its own per pass.

Each pass reads one epoch at the job's own pace, from its first sample whenever the job attached,
in the producer's order or its own (``seed=``); the producer fills the cache meanwhile, so a
sample still MISSING is waited for. The message sequence is NOTE [ Cache protocol ] in
producer/filling.py. One code path cuts a whole epoch and a share (a group rank's, a sharded
producer's: wire/order.share's cut of the same order on every rank and node); they differ only in
what an EXCLUDED sample (one DALI cannot decode) becomes: a whole epoch skips it (its batches stay
full, the epoch is smaller), a share repeats a readable sample in its place, flagged as padding,
so every rank reads the same count. Batches are gathered into tensors the job owns, so ``keep``
and ``copy`` do not matter here.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..errors import DatasetError, ProducerLost
from ..intervals import CACHE_POLL_S, PRODUCER_POLL_S
from ..shm.cache import Mark
from ..wire.order import epoch_order, share
from .cached import CachedSamples
from .reading import ReadOptions, labels_to, target_device


class CacheReader:
    """Reads ``cache`` (mapped from the ``Welcome``) for ``session``."""

    source = "cache"

    def __init__(self, session, cache: CachedSamples, options: ReadOptions):
        self.session, self.cache, self.options = session, cache, options
        self.device = cache.device
        self.target = target_device(options.device, self.device)
        self.batch_size = options.batch_size or session.producer_batch_size
        self.splits = options.member is not None or session.shard[1] > 1  # a share; batches carry "padded"
        self.passes = 0  # passes this job finished or left: the next pass reads epoch ``passes``
        self.position = 0  # samples of the pass's order behind the last batch given
        self.epoch_read = False  # the pass read its order to the end
        self._epoch: int | None = None  # the epoch of the pass in progress
        self._batches = None  # the pass's (indices, padded, position) generator; None between passes
        # a share keeps its size (excluded samples are repeated); a whole epoch is its decodable samples
        self._epoch_size = len(self._order(0)[0]) if self.splits else session.samples_per_epoch

    @property
    def samples_per_epoch(self) -> int:
        return self._epoch_size

    def resume_point(self, epoch: int, position: int) -> tuple[int, int]:
        """Where a loaded state resumes: exactly there; the passes before it count as read."""
        self.passes = epoch
        return epoch, position

    def leave_last_pass(self, resume: tuple[int, int] | None = None) -> bool:
        """A pass left by a break holds nothing of the producer's: its batches were copies (a
        loaded ``resume`` is taken by `begin_pass`, wherever it is)."""
        self._batches = None
        return True

    def begin_pass(self, resume: tuple[int, int] | None) -> tuple[int, int] | None:
        """The pass reads epoch ``passes`` from its start, or from ``resume`` in it; None once
        the producer's ``--epochs`` are read, or the producer stopped or was lost."""
        session = self.session
        if resume is not None and resume[1] >= len(self._order(0)[0]):  # saved after its epoch's last batch
            self.passes, resume = resume[0] + 1, None
        limit = session.producer_epochs
        if limit and self.passes >= limit:
            session.stop_reason = session.stop_reason or f"finished {limit} epochs"
            return None
        if not session.poll_producer(self.options.reconnect):
            return None
        self._epoch, self.epoch_read = self.passes, False
        self._count_excluded()
        order, padded = self._order(self._epoch)
        start = resume[1] if resume is not None and resume[0] == self._epoch and resume[1] < len(order) else 0
        self.position, self._batches = start, self._cut(order, padded, start)
        return self._epoch, start

    def next_batch(self) -> dict | None:
        """The pass's next batch (gathered from the cache), or None at its end."""
        if self._batches is None:
            return None
        try:
            indices, padded, self.position = next(self._batches)
        except StopIteration as end:
            self.epoch_read, self._batches = bool(end.value), None
            return None
        labels = torch.from_numpy(self.cache.labels[indices].astype(np.int64))
        batch = {"images": self.cache.gather(indices, self.session.sample_shape, self.session.dtype, self.target),
                 "labels": labels_to(labels, self.target), "indices": torch.from_numpy(indices)}
        if self.splits:
            batch["padded"] = torch.from_numpy(padded)
        return batch

    def end_pass(self) -> None:
        """The pass ended or was left: it counts as one of the job's epochs (``EpochDone``)."""
        self._batches = None
        self.passes += 1
        self.session.epoch_done(self.passes)

    def unmap_device_memory(self) -> bool:
        """The producer stops: a GPU cache's rows are unmapped (the pass ends at its next poll)."""
        return self.cache is None or self.cache.unmap_rows()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    # -- cutting -----------------------------------------------------------------------------------

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This job's samples of ``epoch`` and which are padding: the node's share of the order
        (``--shard``), then this rank's share of that (``group``), DistributedSampler's cuts
        (wire/order.py); a whole epoch is the order itself. Excluded files stay in: every rank and
        node must cut the same order; `_cut` deals with them."""
        session, member = self.session, self.options.member
        seed = session.producer_seed if self.options.seed is None else self.options.seed
        order = epoch_order(self.cache.layout.samples, seed, epoch)
        padded = np.zeros(len(order), dtype=bool)
        index, shards = session.shard
        if shards > 1:
            order, padded = share(order, index, shards, self.options.drop_last)
        if member is not None:
            order, padded = share(order, member.rank, member.world, self.options.drop_last, padded)
        return order, padded

    def _cut(self, order: np.ndarray, padded: np.ndarray, pos: int):
        """(indices, padding flags, position after them) of each batch of ``order`` from position
        ``pos``, the last one smaller; waits for samples not cached yet. Returns whether it read the
        order to its end (not if the producer stopped first)."""
        marks, size, repeat = self.cache.marks, self.batch_size, self.splits
        before = order[:pos][marks[order[:pos]] == Mark.VALID] if repeat else order[:0]  # resumed at ``pos``
        stand_in = int(before[-1]) if before.size else -1  # a share's last readable sample: what an excluded one repeats
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        have, next_check = 0, time.monotonic() + PRODUCER_POLL_S
        while pos < len(order):
            at, end = pos, min(pos + size - have, len(order))
            chunk, flags = order[at:end].copy(), padded[at:end].copy()
            if not self._await_cached(chunk):
                return False
            excluded, pos = marks[chunk] == Mark.EXCLUDED, end
            if not repeat:
                chunk, flags = chunk[~excluded], flags[~excluded]
            else:
                stand_in = self._repeat_excluded(chunk, flags, excluded, stand_in, at)
            parts.append((chunk, flags))
            have += len(chunk)
            if have == size or (pos == len(order) and have):  # a batch ready goes out before any check
                yield np.concatenate([c for c, _ in parts]), np.concatenate([f for _, f in parts]), pos
                parts, have = [], 0
            if pos < len(order) and time.monotonic() >= next_check:  # the producer's Stop, failure or death, or the group's loss
                if not self.session.poll_producer(self.options.reconnect):
                    return False
                self._count_excluded()
                next_check = time.monotonic() + PRODUCER_POLL_S
        self._count_excluded()
        return True

    def _repeat_excluded(self, chunk: np.ndarray, flags: np.ndarray, excluded: np.ndarray, stand_in: int,
                         at: int) -> int:
        """In place: each excluded sample of ``chunk`` becomes a repeat of its first readable one
        (or ``stand_in``, the one before it), flagged. Returns the stand-in for the next chunk."""
        readable = chunk[~excluded]
        stand_in = int(readable[0]) if readable.size else stand_in
        if excluded.any():
            if stand_in < 0:
                raise DatasetError(f"job {self.session.job_id}: none of the samples before its batch at {at} of "
                                   f"epoch {self._epoch} can be decoded, so there is nothing to repeat in their place")
            chunk[excluded], flags[excluded] = stand_in, True
        return int(chunk[-1])

    def _count_excluded(self) -> None:
        """The files the producer excluded so far (the fill finds them), and so the epoch's size."""
        self.session.counters.excluded = self.cache.excluded()
        if not self.splits:  # a share keeps its size: excluded samples are replaced by repeats
            self._epoch_size = self.cache.layout.samples - self.session.counters.excluded

    def _await_cached(self, chunk: np.ndarray) -> bool:
        """Wait until no sample of ``chunk`` is MISSING; False if the producer stopped meanwhile."""
        while (missing := np.flatnonzero(self.cache.marks[chunk] == Mark.MISSING)).size:
            if not self._await_sample(int(chunk[missing[0]])):
                return False
        return True

    def _await_sample(self, index: int) -> bool:
        """Wait until the cache has sample ``index`` (or has excluded it); False if the producer
        stopped meanwhile (see `Session.poll_producer`). A fill that makes no progress for
        ``batch_timeout`` seconds raises `ProducerLost`."""
        session, timeout = self.session, self.options.batch_timeout
        marks, valid = self.cache.marks, self.cache.valid()
        deadline = next_check = time.monotonic()
        deadline += timeout
        while marks[index] == Mark.MISSING:
            now = time.monotonic()
            if now >= next_check:
                if not session.poll_producer(self.options.reconnect):
                    return False
                filled = self.cache.valid()
                if filled != valid:
                    valid, deadline = filled, now + timeout
                elif now > deadline:
                    raise ProducerLost(
                        f"producer {session.name!r} (pid {session.producer_pid}) is alive but filled no sample of "
                        f"its cache for {timeout:.0f} s (job {session.job_id} waits for sample {index}); check its log")
                next_check = now + PRODUCER_POLL_S
            time.sleep(CACHE_POLL_S)
        return True
