"""What the serve loop serves, as one object chosen once: `Measuring` (the first batch, whose shape
decides the output), then `RingServing` (ring_serving.py) or `CacheServing` (cache_serving.py), picked by
output.py. The loop (server.py) keeps the lifecycle, phases, liveness and teardown and asks the mode
everything that depends on ring or cache, through the interface of `Serving`; groups and shards are
the modes' parameters, not branches of the loop.

Each mode is driven by the loop only: it never receives messages itself (the loop's dispatch table
hands it releases, resumes and finished epochs), so no message is taken in while it decides; the one
way a job leaves meanwhile is a send that fails (``ctx.send`` detaches it at once, and with it the
other ranks of its group), which is why a mode checks a job is still registered before it records
a hold for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .dataset import Dataset
from .feed import EpochFeed
from .jobs import Job, JobRegistry, JobState
from .options import ServeOptions
from .supervisor import Done, Lost, StageSupervisor

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What every mode shares with the loop, which owns it."""

    options: ServeOptions
    pipeline_file: Path
    data: Path
    dataset: Dataset
    listing: bytes   # the dataset's listing with mtimes (a cache's key) ...
    identity: bytes  # ... and without (what the ranks of a group compare): shm.cache.listing_digests
    jobs: JobRegistry
    send: Callable[[Job, object], bool]  # to a job; False (the job detached) if it cannot be reached
    start_stage: Callable[[], StageSupervisor]  # the running stage supervisor, started if there is none
    seq: int = 0  # seq of the next stage task; only grows (a re-made batch gets a new one)
    decoded: int = 0  # samples decoded into the ring or the cache (the measured first batch not counted)
    stateful: list[str] = field(default_factory=list)  # the stage's random operators (from the first batch)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq - 1


class Serving:
    """The interface the loop drives, with the answers of a producer that serves nothing yet (it
    is scanning the dataset). Subclasses override what their mode does.

    Once: `begin` (after the loop registered its teardown). Per loop pass: `can_submit`/`submit`
    (hand the stage worker a task), `on_filled`/`on_lost` (its answers), `reap` (the mode's liveness
    policy: stalls). Per job: `initial_state` and `welcome` (its ``Welcome``), `attach` (after it),
    `on_release`, `on_resume`, `on_epoch_done`, `forget` (it left). End: `done`, `finished_with`,
    `readers` (who may still read device memory), `summary`, `close`. Status: `report`, `job_report`."""

    ctx: Context  # set by every mode that serves
    source = ""  # "ring" or "cache": what positions in an epoch refer to (a job's resume state, the fingerprint)
    stage: StageSupervisor | None = None  # None: no worker (a full DIR cache)
    shape: list | None = None  # each sample's shape and dtype, once known: the stage must keep them
    dtype = np.dtype("uint8")
    where = ""                # where the output lives, for the log

    def begin(self) -> None:
        """The loop registered `close` for the teardown: give the worker the output (or end it)."""

    # -- the stage ------------------------------------------------------------------------------

    def can_submit(self) -> bool:
        """Whether to hand the worker a task now. One rule for every mode: a task that must go
        `alone` waits until none is in flight."""
        stage = self.stage
        if stage is None or stage.room() <= 0:
            return False
        if self.alone() and stage.in_flight():
            return False
        return self.wants_task()

    def alone(self) -> bool:
        """The next task must be the only one in flight: a careful re-make (lost work made again one
        file per task, so a failure blames its file), or the measured first batch."""
        return False

    def wants_task(self) -> bool:
        return False

    def submit(self) -> None:
        raise NotImplementedError

    def on_filled(self, event: Done) -> None:
        raise NotImplementedError

    def on_lost(self, event: Lost) -> None:
        """The worker went with ``event.tasks``: say which files the probes blamed, and `redo`."""
        dataset = self.ctx.dataset
        for index, reason in event.culprits.items():
            log.warning("excluded %s (sample %d): %s", dataset.describe(index), index, reason)
        self.redo(event)
        if event.culprits:
            log.warning("%d of %d samples excluded so far because they cannot be decoded", self.excluded(), len(dataset))

    def redo(self, event: Lost) -> None:
        """Exclude the culprits; make the lost tasks' samples again (carefully if none was blamed)."""
        raise NotImplementedError

    def excluded(self) -> int:
        """Files excluded so far because the stage cannot decode them."""
        return 0

    # -- jobs -----------------------------------------------------------------------------------

    def initial_state(self, hello) -> JobState:
        return JobState.ACTIVE

    def welcome(self) -> dict:
        """The mode's fields of a ``Welcome``."""
        raise NotImplementedError

    def attach(self, job: Job) -> None:
        """``job`` was welcomed."""

    def on_release(self, job: Job, seq: int) -> None:
        """``job`` released batch ``seq``."""

    def on_resume(self, job: Job, after_seq: int) -> None:
        """A suspended ``job`` asks to go on after batch ``after_seq``."""

    def on_epoch_done(self, job: Job) -> None:
        """``job`` finished a pass (its ``epochs_read`` is updated)."""

    def reap(self, now: float) -> None:
        """The mode's part of the loop's liveness pass (the loop took in every message before)."""

    def forget(self, job: Job) -> None:
        """``job`` is gone: it holds nothing any more."""

    # -- the end --------------------------------------------------------------------------------

    def done(self) -> bool:
        """Nothing more to serve for ``--epochs``."""
        return False

    def finished_with(self, job: Job) -> bool:
        """After the last epoch: whether the producer may stop without pulling anything from under ``job``."""
        return True

    def readers(self) -> int:
        """Jobs that map device memory: freeing it then is undefined in CUDA, so a stopping producer
        waits, boundedly, for them to reach 0 (NOTE [ Producer shutdown ])."""
        return 0

    def summary(self) -> str:
        """What it served, for the producer's last log line."""
        return "nothing served"

    def close(self, free: bool = True) -> None:
        """Free the ring or cache (after the jobs were told and the worker ended); ``free`` False:
        leave device memory that jobs still map to the driver (NOTE [ Producer shutdown ])."""

    # -- status ---------------------------------------------------------------------------------

    def report(self) -> dict:
        """The mode's fields of a `StatusReport`."""
        return {"output": "", "epoch": -1, "epoch_position": 0, "epoch_size": -1, "cached": -1,
                "excluded": self.excluded(), "slots": 0, "slots_in_use": 0, "sample": ""}

    def job_report(self, job: Job) -> dict:
        """The mode's fields of a job's `JobStatus`."""
        return {"epoch": -1, "behind": 0, "holds": 0, "paces": False}


def describe_sample(shape: list, dtype: np.dtype) -> str:
    return f"{list(shape)} {dtype.name}"


class Measuring(Serving):
    """The first batch, decoded alone and written nowhere: its shape and the stage's random
    operators decide the output (output.py). The feed then serves it again, into the output."""

    def __init__(self, ctx: Context, stage: StageSupervisor):
        opts = ctx.options
        self.ctx, self.stage = ctx, stage
        self.feed = EpochFeed(ctx.dataset, opts.batch_size, opts.seed, opts.shard_of)  # the ring's, once measured

    def alone(self) -> bool:
        return True  # one task at a time: the one that measures

    def wants_task(self) -> bool:
        return True

    def submit(self) -> None:
        careful = self.feed.careful()  # before next_plan(), which leaves careful mode after the last such plan
        self.stage.submit_batch(self.ctx.next_seq(), -1, self.feed.next_plan(), careful=careful)

    def on_filled(self, event: Done) -> None:
        self.feed.rewind(event.done.plan)  # served again, into a slot (or its rows)
        self.ctx.stateful = self.stage.stateful or []  # the worker said, with its first batch

    def redo(self, event: Lost) -> None:
        redo_in_feed(self.feed, event)

    def excluded(self) -> int:
        return len(self.feed.excluded)


def redo_in_feed(feed: EpochFeed, event: Lost) -> None:
    """The worker went with ``event.tasks``: exclude the files the probes blamed, feed again from the
    oldest lost batch (the served samples keep their places); one file at a time up to the newest
    if no file explains it (maybe files together do)."""
    for index, reason in event.culprits.items():
        feed.exclude(index, reason)
    feed.redo([lost.plan for lost in event.tasks], careful=bool(event.tasks) and not event.culprits)
    if event.tasks and not event.culprits:
        log.warning("no file explains the failure: making the %d lost batches again one file at a time",
                    len(event.tasks))
