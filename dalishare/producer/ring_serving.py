"""Serving through the ring: the stage worker decodes each batch of the producer's order into a free
slot, every active job is sent its announcement and holds the slot until it releases it; the slowest
job sets the pace (a full ring waits for it, or suspends it once it stalls). Consumer groups start
together at an epoch's first batch; a sharded producer's feed serves its node's share.

The slot rules are NOTE [ Slot ownership ] (shm/__init__.py); the messages NOTE [ Control protocol ]
(wire/messages.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from ..shm import RingKind, create_ring
from ..wire.messages import Batch, Suspended
from .feed import EpochFeed, Plan
from .jobs import Job, JobState
from .serving import Context, Serving, describe_sample, redo_in_feed
from .slots import SlotTable
from .stage import parse_device
from .supervisor import Done, Lost, StageSupervisor

log = logging.getLogger(__name__)


class RingServing(Serving):
    """The ring of ``--slots`` slots, each one producer batch of ``shape`` ``dtype`` samples."""

    source = "ring"

    def __init__(self, ctx: Context, feed: EpochFeed, stage: StageSupervisor, shape: list, dtype: np.dtype):
        opts = ctx.options
        self.ctx, self.feed, self.stage, self.shape, self.dtype = ctx, feed, stage, list(shape), dtype
        self.slots = SlotTable(opts.slots)
        sample_bytes = int(np.prod(shape)) * dtype.itemsize
        self.ring = create_ring(opts.name, opts.slots, opts.batch_size * sample_bytes, gpu=parse_device(opts.device))
        self.started = False  # a first batch was announced: --min-consumers no longer applies
        self.announced = 0    # batches announced (each to every active job)
        self.where = f"{opts.slots} slots in {opts.device} memory"

    def begin(self) -> None:
        self.stage.map_ring(self.ring.layout.to_wire())

    # -- the stage ------------------------------------------------------------------------------

    def alone(self) -> bool:
        return self.feed.careful()

    def _last_epoch_fed(self) -> bool:
        epochs = self.ctx.options.epochs
        return epochs is not None and self.feed.next_epoch() >= epochs

    def wants_task(self) -> bool:
        jobs = self.ctx.jobs
        if self._last_epoch_fed() or not (jobs.active() or jobs.formed()):  # nothing more, or nobody to produce for
            return False
        if not self.started and len(jobs) < self.ctx.options.min_consumers:
            return False
        return self.slots.free_slot() is not None

    def submit(self) -> None:
        jobs, careful = self.ctx.jobs, self.feed.careful()
        if jobs.formed() and not jobs.active() and not careful and \
                not any(p.start == 0 for p in self.stage.plans()):  # a group waits for an epoch's start
            self.feed.skip_rest_of_epoch()
            if self._last_epoch_fed():  # that was the last epoch: nothing more to start the group with
                return
        plan = self.feed.next_plan()
        seq, k = self.ctx.next_seq(), self.slots.free_slot()
        self.slots.reserve(k, seq)
        self.ring.mark(k, -1)
        self.stage.submit_batch(seq, k, plan, careful=careful)
        if careful and not self.feed.careful():
            log.info("the batches lost without a culprit are made again; back to whole batches")

    def on_filled(self, event: Done) -> None:
        task, plan = event.done.task, event.done.plan
        k = task.slot
        if plan.start == 0:  # an epoch begins: groups whose ranks are all here start with it
            for group in self.ctx.jobs.formed():
                self._start_group(group, [], plan.epoch)
        self.ring.mark(k, task.seq)
        self.slots.fill(k, self._batch(task.seq, k, plan))
        for job in self.ctx.jobs.active():
            self._announce(job, k)
        self.started = True
        self.announced += 1
        self.ctx.decoded += len(plan.indices)

    def _batch(self, seq: int, k: int, plan: Plan) -> Batch:
        return Batch(seq=seq, slot=k, epoch=plan.epoch, start=plan.start, count=len(plan.indices), last=plan.last,
                     epoch_size=len(plan.order), excluded=len(self.feed.excluded),
                     labels=plan.labels.astype("<i8").tobytes(), indices=plan.indices.astype("<i8").tobytes(),
                     padded=plan.padded.astype(np.uint8).tobytes() if plan.padded.any() else b"", sent_ns=0)

    def redo(self, event: Lost) -> None:
        for lost in event.tasks:
            if lost.task.slot >= 0:
                self.slots.unreserve(lost.task.slot)
        redo_in_feed(self.feed, event)

    def excluded(self) -> int:
        return len(self.feed.excluded)

    # -- jobs -----------------------------------------------------------------------------------

    def initial_state(self, hello) -> JobState:
        return JobState.FORMING if hello.group else JobState.ACTIVE  # a group starts at an epoch's start

    def welcome(self) -> dict:
        return {"ring": self.ring.layout.to_wire(), "cache": {}, "sample_shape": self.shape,
                "dtype": self.dtype.name, "epoch_size": self.feed.epoch_size}

    def attach(self, job: Job) -> None:
        """A late job gets the resident batches of the current epoch; a group's rank waits for its
        peers and starts with them (`_start_group`)."""
        if job.state is JobState.FORMING:
            log.info("job %d (pid %d) attached as rank %d of %d of group %r (%d of its ranks here)", job.id, job.pid,
                     job.rank, job.world, job.group, len(self.ctx.jobs.group(job.group)))
            resident = self.slots.epoch_from_start()
            if job.group in self.ctx.jobs.formed() and resident:
                self._start_group(job.group, resident, self.slots.slots[resident[0]].batch.epoch)
            return
        for k in self.slots.resident_of_current_epoch():
            self._announce(job, k)
        slots = len(self.slots.slots)
        log.info("job %d (pid %d, keep=%d) attached; %d jobs", job.id, job.pid, job.keep, len(self.ctx.jobs))
        if slots < job.keep + 3:
            log.warning("job %d keeps views for %d batches: if it stalls, suspending it frees no slot of %d "
                        "(it keeps %d), so the other jobs wait for it; serve with --slots %d or more", job.id,
                        job.keep, slots, job.keep + 2, job.keep + 3)

    def _start_group(self, group: str, resident: list[int], epoch: int) -> None:
        """Every rank of ``group`` is here; they start together at an epoch's first batch, so each
        gets the same share of whole epochs: the resident one (``resident``: its slots, oldest
        first), else the next one filled (`on_filled` calls this with [] as it announces it; until
        then they stay FORMING, and `submit` skips the rest of the epoch if nobody else reads it)."""
        ranks = self.ctx.jobs.activate(group, time.monotonic())
        for job in ranks:
            for k in resident:
                self._announce(job, k)
        log.info("group %r: its %d ranks start together at epoch %d", group, len(ranks), epoch)

    def _announce(self, job: Job, k: int) -> None:
        """Send the job slot ``k``'s batch; from then on it holds the slot until it releases it."""
        if self.ctx.jobs.get(job.id) is None:  # detached meanwhile (its group lost a rank): nobody would release it
            return
        if self.ctx.send(job, dataclasses.replace(self.slots.slots[k].batch, sent_ns=time.monotonic_ns())):
            self.slots.hold(k, job.id, time.monotonic())

    def on_release(self, job: Job, seq: int) -> None:
        self.ctx.jobs.progressed(job, time.monotonic())
        self.slots.release(job.id, seq)

    def on_resume(self, job: Job, after_seq: int) -> None:
        if not self.ctx.jobs.resume(job, time.monotonic()):
            return
        resident = self.slots.resident_after(after_seq)
        for k in resident:
            self._announce(job, k)
        log.info("job %d (pid %d) resumed after batch %d; sent it %d resident batches",
                 job.id, job.pid, after_seq, len(resident))

    def reap(self, now: float) -> None:
        """Suspend the jobs that held the others back for longer than the stall timeout (while the
        producer cannot write: no free slot, or its last epoch is served). A suspended job keeps its
        keep+2 oldest slots, the only ones it can be reading (NOTE [ Slot ownership ])."""
        if self.slots.free_slot() is not None and not self.done():
            return
        timeout = self.ctx.options.stall_timeout
        for job in self.ctx.jobs.stallers(self.slots, now, timeout):
            self.ctx.jobs.suspend(job)
            kept = self.slots.suspend(job.id, job.keep + 2)
            self.ctx.send(job, Suspended(f"held the other jobs back for more than {timeout:g} s", kept))
            log.warning("job %d (pid %d) released nothing for %.0f s and held the others back: suspended "
                        "until it resumes (it keeps slots of batches %s)", job.id, job.pid,
                        now - job.last_progress, kept)

    def forget(self, job: Job) -> None:
        self.slots.forget(job.id)

    # -- the end --------------------------------------------------------------------------------

    def done(self) -> bool:
        """The last batch of the last epoch is announced (or the rest of it was undecodable)."""
        return self._last_epoch_fed() and not self.stage.in_flight()

    def finished_with(self, job: Job) -> bool:
        """A host ring stays mapped in the job after the producer is gone, so having begun to read
        every batch it holds is enough (it may keep the last views as long as it likes); device
        memory is freed, so there the job must have released every slot."""
        if job.suspended:
            return True
        if self.ring.layout.kind == RingKind.DEVICE:
            return not self.slots.held_by(job.id)
        return not self.slots.unread(job.id, job.taken)

    def readers(self) -> int:
        """Every attached job maps a device ring until it says Bye or dies."""
        return len(self.ctx.jobs) if self.ring.layout.kind == RingKind.DEVICE else 0

    def summary(self) -> str:
        return f"{self.announced} batches announced"

    def close(self, free: bool = True) -> None:
        self.ring.close() if free else self.ring.close(free=False)  # only a device ring is kept (readers)

    # -- status ---------------------------------------------------------------------------------

    def report(self) -> dict:
        epoch, position = self.feed.position()
        return {"output": "ring", "epoch": epoch, "epoch_position": position, "epoch_size": self.feed.epoch_size,
                "cached": -1, "excluded": self.excluded(), "slots": len(self.slots.slots),
                "slots_in_use": self.slots.in_use(), "sample": describe_sample(self.shape, self.dtype)}

    def job_report(self, job: Job) -> dict:
        return {"epoch": self.feed.position()[0], "behind": len(self.slots.unread(job.id, job.taken)),
                "holds": len(self.slots.held_by(job.id)), "paces": job.id in self.slots.pacers()}
