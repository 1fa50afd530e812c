"""The producer's decoded-sample cache: where it lives (`ServedCache`) and what to decode next to fill
it (`CacheFill`). Which cache to use is cache_policy.py; the file format is shm/cache.py.

NOTE [ Cache protocol ]
=======================
Cited from the producer's cache mode (producer/cache_serving.py), the stage worker (producer/worker.py) and the
job's cache reader (job/cache_reader.py). With a cache there is no ring: no announcements, no slots, no
releases, and so nobody waits for anybody.

- Open. Producer: with ``--cache DIR`` it first looks in DIR for this dataset's and stage's cache
  file; if its key (shm/cache.py: listing, stage file, shape, dtype, DALI version) matches, it
  serves it at once and decodes only the rows still MISSING (none: no stage worker is started).
  Otherwise the first batch (decoded by the worker, which also says whether the stage has random
  operators: ``Ready.stateful``) gives the sample shape, `cache_policy.choose` decides, and the
  producer creates the file (every mark MISSING, the labels written, the space allocated; a full
  disk turns the cache off there and serving goes on with the ring) and sends it to the worker
  (``MapCache``).
- Fill. Producer: once ``--min-consumers`` jobs attached, tasks of up to ``--batch-size`` MISSING
  rows in epoch 0's order (``--seed``; a sharded producer, ``--shard I/N``, puts its node's share of
  it first, then the rest: each node caches everything), STAGE_TASKS_IN_FLIGHT at once: as fast as the stage goes,
  whoever reads. Worker: writes each sample into its row, answers ``Filled``. Producer: marks the
  rows VALID (after the worker's answer: the mark follows the bytes). A lost worker (NOTE [ Stage
  worker protocol ]): the probes' culprits are marked EXCLUDED, the other rows of the lost tasks go
  first into the next tasks (one file per task when no file explained the failure). Nothing MISSING
  left: the worker is ended; the producer decodes nothing more.
- Read. Job: ``Welcome`` carries the cache (file, layout, GPU rows) instead of a ring, and
  ``--epochs``. Each pass is one epoch of its own: the producer's order for that epoch (or its own,
  ``seed=``), without EXCLUDED samples; it waits (polling the marks every CACHE_POLL_S) for a
  MISSING one, and meanwhile checks the producer's messages and life: a fill that makes no progress
  for ``batch_timeout`` is `ProducerLost`. Each batch is gathered from the rows into a buffer the job
  owns (one copy). A rank of a consumer group, or a job of a sharded producer, reads its share
  (wire/order.share) of the order of all samples, so every rank and node cuts the same order; an
  EXCLUDED sample there is read as a flagged repeat, so the counts stay equal. At the end of a pass:
  ``EpochDone(epochs)``. Heartbeats and ``Bye`` as ever.
- End. With ``--epochs N`` the producer stops once a job has read N epochs and every attached job
  has; a job's pass after its N-th ends at once. A memory or GPU cache is removed when the producer
  stops (a job's mapping of a memory cache stays readable until it unmaps it; GPU memory is freed
  after the jobs were told ``Stop``, as for a device ring); a DIR cache stays for the next producer.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from collections import deque
from pathlib import Path

import numpy as np

from ..shm import create_ring, names
from ..shm.cache import CACHE_SUFFIX, CacheLayout, Mark, SampleCache, cache_key, read_layout
from .cache_policy import CacheMode


def dali_version() -> str:
    """The installed DALI build (part of the cache key), read without importing DALI."""
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if name.startswith("nvidia-dali"):
            return f"{name} {dist.version}"
    return "no DALI"


def disk_cache_path(folder: Path, data: Path, stage_file: Path) -> Path:
    """The one cache file of this dataset and stage in ``folder``: a changed key rebuilds it in place
    (so old versions do not pile up); another dataset or stage has a file of its own."""
    where = hashlib.sha256(f"{Path(data).resolve()}\0{Path(stage_file).resolve()}".encode()).hexdigest()[:10]
    return Path(folder) / f"{Path(data).resolve().name}-{Path(stage_file).stem}-{where}{CACHE_SUFFIX}"


def reusable_layout(path: Path, listing: bytes, stage_file: Path, decoder: str) -> CacheLayout | None:
    """The layout of the cache at ``path`` if its key matches this listing, stage and decoder for the
    shape and dtype it records: then the shape is known without decoding anything."""
    layout = read_layout(path)
    if layout is None or layout.key != cache_key(listing, stage_file, layout.sample_shape, layout.dtype,
                                                 dali_version(), decoder):
        return None
    return layout


def fingerprint(identity: bytes, stage_file: Path, options, samples: int, sample_shape: list, dtype: str,
                source: str) -> dict:
    """What the ranks of one DDP job compare across nodes (through torch.distributed) before they read:
    producers that disagree on any of it would serve them different data. ``identity``: the dataset's
    files (paths inside it and sizes: shm.cache.listing_digests); ``source``: "ring" or "cache" (they
    cut a shard's tail differently)."""
    return {"dataset": identity.hex()[:16], "samples": samples, "source": source,
            "stage": hashlib.sha256(Path(stage_file).read_bytes()).hexdigest()[:16],
            "output": f"{list(sample_shape)} {dtype}", "seed": options.seed, "shards": options.shard_of[1]}


class ServedCache:
    """The producer's cache: the file (`SampleCache`) and, for ``--cache gpu``, the rows in GPU memory
    (a one-slot device ring). Removed on close unless it is a DIR cache."""

    def __init__(self, mode: CacheMode, path: Path, layout: CacheLayout, labels: np.ndarray, name: str,
                 gpu: int | None):
        self.mode, self.layout = mode, layout
        self.store = SampleCache(path, layout, labels)
        self.rows = None
        if not layout.rows_in_file:
            try:
                self.rows = create_ring(name, 1, layout.rows_bytes, gpu=gpu)
            except BaseException:
                self.store.close(remove=True)
                raise

    @classmethod
    def memory_path(cls, name: str) -> Path:
        return names.memory_cache_path(name, os.getpid())

    def wire(self) -> dict:
        """What the worker and the jobs need to map it (``MapCache``, ``Welcome.cache``)."""
        return {"path": str(self.store.path), "layout": self.layout.to_wire(),
                "rows": self.rows.layout.to_wire() if self.rows is not None else {}}

    def close(self, free: bool = True) -> None:
        """``free``: False if jobs may still map the GPU rows (NOTE [ Producer shutdown ])."""
        if self.rows is not None:
            self.rows.close(free=free)
        self.store.close(remove=self.mode is not CacheMode.DISK)


class CacheFill:
    """Which rows to decode next: the MISSING ones in ``order`` (epoch 0's, so jobs reading in the
    producer's order find them as they come), lost ones first again. Rows out in tasks are in
    neither queue."""

    def __init__(self, marks: np.ndarray, order: np.ndarray):
        self._queue = deque(int(i) for i in order[marks[order] == Mark.MISSING])  # not sent yet, in order
        self._careful: deque[int] = deque()  # lost when no file explained it: sent one per task

    def pending(self) -> int:
        return len(self._queue) + len(self._careful)

    def careful(self) -> bool:
        """The next task is a careful one: send it alone."""
        return bool(self._careful)

    def next_rows(self, batch_size: int) -> tuple[list[int], bool]:
        """The rows of the next task, and whether it is a careful one (a single file)."""
        if self._careful:
            return [self._careful.popleft()], True
        n = min(batch_size, len(self._queue))
        return [self._queue.popleft() for _ in range(n)], False

    def requeue(self, rows: list[int], careful: bool) -> None:
        """Rows of a lost task, to be sent again before anything else (``careful``: one per task)."""
        (self._careful if careful else self._queue).extendleft(reversed(rows))
