"""Serving from the decoded-sample cache: the stage worker fills the missing rows as fast as it goes,
whoever reads; every job reads each epoch at its own pace, so nobody holds anybody back. Groups and
shards cut their shares on the job's side. The steps are NOTE [ Cache protocol ] in filling.py.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..shm.cache import CacheLayout, Mark
from ..wire.order import epoch_order, share
from .cache_policy import CacheChoice, CacheMode, human
from .filling import CacheFill, ServedCache, disk_cache_path
from .jobs import Job
from .serving import Context, Serving, describe_sample
from .stage import parse_device
from .supervisor import Done, Lost, StageSupervisor

log = logging.getLogger(__name__)


class CacheServing(Serving):
    """The cache ``choice`` of ``layout``: created, or reopened (a DIR cache), and filled."""

    source = "cache"

    def __init__(self, ctx: Context, choice: CacheChoice, layout: CacheLayout, excluded: dict[int, str],
                 stage: StageSupervisor | None):
        opts, dataset = ctx.options, ctx.dataset
        self.ctx, self.mode, self.stage = ctx, choice.mode, stage  # stage: the measuring worker, or None
        path = disk_cache_path(choice.folder, ctx.data, ctx.pipeline_file) if choice.mode is CacheMode.DISK \
            else ServedCache.memory_path(opts.name)
        self.cache = ServedCache(choice.mode, path, layout, dataset.labels, opts.name, parse_device(opts.device))
        self.shape, self.dtype = list(layout.sample_shape), np.dtype(layout.dtype)
        self.store = store = self.cache.store
        try:
            store.mark(list(excluded), Mark.EXCLUDED)  # found while measuring
            self.fill = CacheFill(store.marks, _fill_order(len(dataset), opts.seed, opts.shard_of))
        except BaseException:  # the loop registers close() only once this returns
            self.cache.close()
            raise
        self.started = False   # a first fill task went out: --min-consumers no longer applies
        self.fill_started: float | None = None  # when (for the log)
        self.tasks_filled = 0  # fill tasks done
        self.read_all = False  # with --epochs N: some job has read N epochs
        self.where = f"{human(layout.rows_bytes)} cache in {choice.mode.value} ({store.path})"
        log.info("%r: cache %s: %d of %d samples decoded%s, %d excluded; %s", opts.name, store.path,
                 store.valid_count(), layout.samples, " (resumed)" if store.resumed else "", len(store.excluded()),
                 f"{self.fill.pending()} to decode" if self.fill.pending() else "nothing to decode")

    def begin(self) -> None:
        """Give the worker the cache to fill (starting one), or end it if nothing is missing."""
        if self.fill.pending():
            self.stage = self.stage or self.ctx.start_stage()
            self.stage.map_cache(self.cache.wire())
        else:
            self._stop_stage("the cache is full")

    # -- the stage: fill as fast as it goes, once --min-consumers came ------------------------------

    def alone(self) -> bool:
        return self.fill.careful()

    def wants_task(self) -> bool:
        return self.fill.pending() > 0 and (self.started or len(self.ctx.jobs) >= self.ctx.options.min_consumers)

    def submit(self) -> None:
        rows, careful = self.fill.next_rows(self.ctx.options.batch_size)
        self.stage.submit_rows(self.ctx.next_seq(), rows, careful=careful)
        self.started = True
        self.fill_started = self.fill_started or time.monotonic()

    def on_filled(self, event: Done) -> None:
        rows = event.done.plan
        self.store.mark(rows)  # after the worker's answer: the mark follows the bytes
        self.tasks_filled += 1
        self.ctx.decoded += len(rows)
        self._stop_if_full()

    def redo(self, event: Lost) -> None:
        """Excluded rows are never cached; the other rows of the lost tasks are decoded again first."""
        self.store.mark(list(event.culprits), Mark.EXCLUDED)
        rows = [i for lost in event.tasks for i in lost.plan if i not in event.culprits]
        self.fill.requeue(rows, careful=bool(event.tasks) and not event.culprits)
        self._stop_if_full()

    def excluded(self) -> int:  # the marks also know the files a previous producer excluded
        return len(self.store.excluded())

    def _stop_if_full(self) -> None:
        if self.fill.pending() or self.stage.in_flight():
            return
        took = time.monotonic() - (self.fill_started or time.monotonic())
        log.info("%r: the cache is full: %d samples decoded in %.1f s (%.0f/s), %d valid, %d excluded; no more "
                 "decoding", self.ctx.options.name, self.ctx.decoded, took, self.ctx.decoded / max(took, 1e-9),
                 self.store.valid_count(), self.excluded())
        self._stop_stage("the cache is full")

    def _stop_stage(self, reason: str) -> None:
        if self.stage is not None:
            self.stage.stop(reason)

    # -- jobs: each reads at its own pace -----------------------------------------------------------

    def welcome(self) -> dict:
        return {"ring": {}, "cache": self.cache.wire(), "sample_shape": self.shape, "dtype": self.dtype.name,
                "epoch_size": self._epoch_size()}

    def attach(self, job: Job) -> None:
        rank = f" as rank {job.rank} of {job.world} of group {job.group!r}" if job.group else ""
        log.info("job %d (pid %d) attached%s; it reads the cache at its own pace; %d jobs", job.id, job.pid,
                 rank, len(self.ctx.jobs))

    def on_epoch_done(self, job: Job) -> None:
        epochs = self.ctx.options.epochs
        self.read_all = self.read_all or (epochs is not None and job.epochs_read >= epochs)

    def _epoch_size(self) -> int:
        return self.cache.layout.samples - self.excluded()

    # -- the end --------------------------------------------------------------------------------

    def done(self) -> bool:
        """Some job has read the last epoch."""
        return self.read_all

    def finished_with(self, job: Job) -> bool:
        return job.epochs_read >= self.ctx.options.epochs

    def readers(self) -> int:
        """A GPU cache is read by every attached job until it leaves."""
        return len(self.ctx.jobs) if self.cache.rows is not None else 0

    def summary(self) -> str:
        return f"{self.tasks_filled} fill tasks done"

    def close(self, free: bool = True) -> None:
        self.cache.close(free)

    # -- status ---------------------------------------------------------------------------------

    def report(self) -> dict:
        return {"output": f"cache {self.mode.value}", "epoch": -1, "epoch_position": 0,
                "epoch_size": self._epoch_size(), "cached": self.store.valid_count(), "excluded": self.excluded(),
                "slots": 0, "slots_in_use": 0, "sample": describe_sample(self.shape, self.dtype)}

    def job_report(self, job: Job) -> dict:
        return {"epoch": job.epochs_read, "behind": 0, "holds": 0, "paces": False}  # nobody sets the pace


def _fill_order(samples: int, seed: int, shard_of: tuple[int, int]) -> np.ndarray:
    """Epoch 0's order (jobs reading in the producer's order find the rows as they come); a sharded
    producer puts its node's share first: its jobs read that first."""
    first = epoch_order(samples, seed, 0)
    if shard_of[1] > 1:
        mine = share(first, *shard_of)[0]
        first = np.concatenate([mine, first[~np.isin(first, mine)]])
    return first
