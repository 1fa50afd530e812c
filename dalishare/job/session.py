"""One attachment of a job to one producer: its channel, ring (or cache) mapping, releases,
heartbeat, queue of announcements and place in the stream. A reconnect opens a new session; nothing
is reset by hand.

The message sequence is NOTE [ Control protocol ] (wire/messages.py); when a slot may be given back
is NOTE [ Slot ownership ] (shm/__init__.py) and keep.py.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..intervals import CACHE_POLL_S, STARTING_SILENCE_S, GPU_EVENT_POLL_MS, PRODUCER_POLL_S
from ..errors import BatchHeldTooLong, GroupBroken, ProducerLost, ProducerNotFound, ProtocolError, SlotReused
from ..shm import RingLayout, attach_ring
from ..shm import names
from ..wire.channel import JobChannel
from ..shm.cache import Mark
from ..wire.messages import (Batch, Bye, EpochDone, GroupLost, Heartbeat, Hello, Reject, Release, Resume, Starting,
                             Stop, StopKind, Suspended, Welcome)
from .cached import CachedSamples
from .group import Membership
from .heartbeat import HeartbeatThread
from .keep import KeepWindow
from .rebatch import Rebatcher
from .releases import SlotReleases
from .views import slot_tensors

log = logging.getLogger(__name__)



@dataclass
class Counters:
    """What a job counts across sessions (the iterator's public figures)."""

    excluded: int = 0  # files the producer excluded because DALI cannot decode them
    missed: int = 0    # samples skipped while this job was suspended for stalling
    handoff_ns: deque = field(default_factory=lambda: deque(maxlen=100_000))  # announcement sent -> view ready


class Session:
    """Attached to the producer at ``endpoint``, or `ProducerNotFound` after ``timeout`` seconds."""

    def __init__(self, name: str, endpoint: str, *, keep: int, batch_size: int | None, timeout: float,
                 heartbeat_interval: float, counters: Counters, member: Membership | None = None):
        self.name, self.endpoint, self.counters, self.member = name, endpoint, counters, member
        self.group_lost: str | None = None  # set by the producer's GroupLost: a rank of our group is gone
        self.window = KeepWindow(keep)  # slots read and not given back yet
        self.pending: deque[Batch] = deque()  # announcements not yet begun, in seq order
        self.taken = -1  # seq of the newest producer batch begun; sent in heartbeats
        self.read = 0    # samples handed to the training loop in this session; sent in heartbeats (status)
        self._asked_batch_size = batch_size or 0
        self.stop_reason: str | None = None   # set by the producer's Stop
        self.stop_kind: StopKind | None = None
        self.failure: str | None = None       # the producer's own error, when it stopped by failing
        self.suspensions = 0
        self.job_id: int | None = None
        self.releases: SlotReleases | None = None
        self.heartbeat: HeartbeatThread | None = None
        self.ring = None
        self.cache: CachedSamples | None = None  # set instead of the ring when the producer serves a cache
        self.channel = JobChannel(endpoint)
        try:
            welcome = self._attach(timeout)
            self.job_id, self.producer_pid = welcome.job_id, welcome.producer_pid
            self.producer_started = names.process_start(welcome.producer_pid)
            self.classes, self.samples_per_epoch = welcome.classes, welcome.epoch_size
            self.producer_batch_size = welcome.batch_size
            self.rebatcher = Rebatcher(batch_size or welcome.batch_size)
            self.sample_shape = tuple(welcome.sample_shape)
            self.dtype = getattr(torch, welcome.dtype)
            self.producer_seed, self.producer_epochs = welcome.seed, welcome.epochs
            self.shard, self.fingerprint = tuple(welcome.shard), welcome.fingerprint
            if welcome.cache:
                self.cache = CachedSamples(welcome.cache)
                self.slot_tensors, self.ring_device = [], self.cache.device
            else:
                self.ring = attach_ring(RingLayout.from_wire(welcome.ring))
                self.slot_tensors, self.ring_device = slot_tensors(self.ring)
            if self.ring is not None and self.ring.layout.slots < keep + 2:
                log.warning("producer %r has %d slots: a job that uses keep=%d views at once needs %d; it will "
                            "get BatchHeldTooLong if it does (serve with more --slots, or lower keep)", name,
                            self.ring.layout.slots, keep, keep + 2)
            gpu = self.ring_device if self.ring_device.type == "cuda" else None
            self.releases = SlotReleases(self._release, gpu)
            self.heartbeat = HeartbeatThread(self.channel.sibling(endpoint), self.job_id, heartbeat_interval,
                                             taken=lambda: self.taken, read=lambda: self.read)
            self.heartbeat.start()
        except BaseException:
            self.close(timeout=0)
            raise

    def close(self, timeout: float, failure: str = "") -> None:
        """Give back what is held (after its GPU reads, up to ``timeout`` s), say goodbye, stop the
        heartbeat, close the channel, unmap the ring. Views the job still holds may change after."""
        if self.releases is not None:
            try:
                for seq in self.window.take_all():
                    self.releases.done_reading(seq)
                self.releases.wait_below(1, timeout=timeout)
            except Exception as exc:  # a timeout, or a CUDA error: still close everything below
                log.warning("job %s leaves with GPU reads of the ring still in flight: %s", self.job_id, exc)
            self.releases.forget()
            self.releases = None
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.channel is not None:
            if self.job_id is not None:
                self.channel.send(Bye(self.job_id, f"failed: {failure}" if failure else "closed", bool(failure)))
            self.channel.close()
            self.channel = None
        if self.ring is not None:
            self.slot_tensors = []
            self.ring.close()
            self.ring = None
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def producer_alive(self) -> bool:
        return names.pid_alive(self.producer_pid, self.producer_started)

    # -- slots ----------------------------------------------------------------------------------

    def give_back(self) -> None:
        """Release the slots the keep rule no longer holds (after their GPU reads, on a device ring)."""
        for seq in self.window.releasable():
            self.releases.done_reading(seq)

    def _release(self, seq: int) -> None:
        self.channel.send(Release(self.job_id, seq))  # a gone producer is reported by the next wait

    def begin_next(self, epoch: int, batch_timeout: float, reconnect: bool) -> Batch | None:
        """Begin reading the next producer batch of ``epoch`` (waiting for it), or None when there is
        none: the producer stopped, or the next batch is of another epoch."""
        self.releases.wait_below(2, batch_timeout)  # at most one given-back slot still read by the GPU
        self.receive_all()  # a Suspended message voids queued announcements: see it first
        head = self.peek(batch_timeout, reconnect)
        if head is None or head.epoch != epoch:
            return None
        msg = self.pending.popleft()
        self.taken = msg.seq
        missed = self.rebatcher.start(msg)
        if missed:
            self.counters.missed += missed
            log.warning("job %d continues at epoch %d sample %d: it missed %d samples while suspended "
                        "(%d in all)", self.job_id, msg.epoch, msg.start, missed, self.counters.missed)
        self.samples_per_epoch, self.counters.excluded = msg.epoch_size, msg.excluded
        if not self.ring.holds(msg.slot, msg.seq):  # voided by a Suspended still on its way
            raise SlotReused(msg.count)
        self.counters.handoff_ns.append(time.monotonic_ns() - msg.sent_ns)
        return msg

    # -- control channel: NOTE [ Control protocol ] in wire/messages.py -------------------------

    def _attach(self, timeout: float) -> Welcome:
        """Hello, then wait for the Welcome; a starting producer's ``Starting`` re-arms the timeout
        (NOTE [ Control protocol ])."""
        member = self.member
        self.channel.send(Hello(os.getpid(), keep=self.window.keep, group=member.name if member else "",
                                rank=member.rank if member else 0, world=member.world if member else 1,
                                batch_size=self._asked_batch_size))
        deadline = time.monotonic() + timeout
        starting: tuple[int, int | None] | None = None  # (pid, start time) of a producer that said it starts
        while time.monotonic() < deadline:
            if starting and not names.pid_alive(*starting):
                raise ProducerLost(f"producer {self.name!r} (pid {starting[0]}) died while it was starting; "
                                   f"see its log")
            if not self.channel.wait(PRODUCER_POLL_S * 1000):
                continue
            for msg in self.channel.receive():
                if isinstance(msg, Reject):
                    raise ProtocolError(f"producer {self.name!r} refused this job: {msg.reason}")
                if isinstance(msg, Welcome):
                    return msg
                if isinstance(msg, Starting):
                    if starting is None:
                        log.info("producer %r (pid %d) is starting (%s); waiting for it", self.name,
                                 msg.producer_pid, msg.reason)
                        starting = (msg.producer_pid, names.process_start(msg.producer_pid))
                    deadline = time.monotonic() + max(timeout, STARTING_SILENCE_S)
                elif isinstance(msg, Stop):
                    raise ProducerLost(f"producer {self.name!r} stopped before it served a batch: {msg.reason}")
        raise ProducerNotFound(
            f"no producer named {self.name!r} answered at {self.endpoint} within {timeout:.0f} s: "
            f"start one with `dalishare serve PIPELINE --data DIR --name {self.name}`")

    def peek(self, batch_timeout: float, reconnect: bool) -> Batch | None:
        """The next announcement (waiting for it), or None once the producer stopped. Raises
        `ProducerLost` when it died or failed, unless ``reconnect`` (then the caller reconnects:
        `lost` says why)."""
        self.wait_for_batch(batch_timeout, reconnect)
        return self.pending[0] if self.pending else None

    @property
    def lost(self) -> str | None:
        """Why this session's producer is gone for good (died, failed or stopped by a signal), if it is."""
        if self.failure:
            return f"stopped ({self.failure})"
        if self.stop_kind is StopKind.STOPPED:
            return f"stopped ({self.stop_reason})"
        return self._died

    _died: str | None = None

    def wait_for_batch(self, batch_timeout: float, reconnect: bool) -> None:
        """Receive until a batch is pending or the producer stopped; a dead producer raises
        `ProducerLost` (or, with ``reconnect``, sets `lost` and returns)."""
        if not self.pending and self.stop_reason is None and not self.failure:
            self._announce_waiting()
        # a group's rank before its first batch waits for its peers and an epoch's start: as long as it takes
        deadline = time.monotonic() + (float("inf") if self.member is not None and self.taken < 0 else batch_timeout)
        while not self.pending and self.stop_reason is None and not self.failure:
            self.releases.poll()  # the producer may be waiting for a slot our GPU just finished with
            if self.channel.wait(self._poll_ms()):
                self.receive_all()
            elif not self.producer_alive():
                if reconnect:
                    self._died = "died"
                    return
                raise self._died_error()
            elif time.monotonic() > deadline:
                raise ProducerLost(
                    f"producer {self.name!r} (pid {self.producer_pid}) is alive but sent no batch for "
                    f"{batch_timeout:.0f} s; check its log (is another job holding it back?)")
        if self.failure and not reconnect:
            raise self._failed_error()

    def _died_error(self) -> ProducerLost:
        return ProducerLost(f"producer {self.name!r} (pid {self.producer_pid}) died; restart it with "
                            f"`dalishare serve ... --name {self.name}` and restart this job "
                            f"(or pass reconnect=True to wait for it)")

    def _failed_error(self) -> ProducerLost:
        return ProducerLost(f"producer {self.name!r} (pid {self.producer_pid}) failed: {self.failure}; "
                            f"fix the cause in its log, restart it and this job")

    # -- reading a cache: NOTE [ Cache protocol ] in producer/filling.py ---------------------------

    def producer_serves(self, reconnect: bool) -> bool:
        """Take in the producer's messages; False once it stopped (the pass ends) or, with
        ``reconnect``, died or failed (`lost` says why); else those raise `ProducerLost`."""
        self.receive_all()  # raises GroupBroken for a group that lost a rank
        if self.failure:
            if reconnect:
                return False
            raise self._failed_error()
        if self.stop_reason is not None:
            return False
        if not self.producer_alive():
            if reconnect:
                self._died = "died"
                return False
            raise self._died_error()
        return True

    def await_sample(self, index: int, batch_timeout: float, reconnect: bool) -> bool:
        """Wait until the cache has sample ``index`` (or has excluded it); False if the producer
        stopped meanwhile (see `producer_serves`). A fill that makes no progress for
        ``batch_timeout`` seconds raises `ProducerLost`."""
        marks, valid = self.cache.marks, self.cache.valid()
        deadline = next_check = time.monotonic()
        deadline += batch_timeout
        while marks[index] == Mark.MISSING:
            now = time.monotonic()
            if now >= next_check:
                if not self.producer_serves(reconnect):
                    return False
                filled = self.cache.valid()
                if filled != valid:
                    valid, deadline = filled, now + batch_timeout
                elif now > deadline:
                    raise ProducerLost(
                        f"producer {self.name!r} (pid {self.producer_pid}) is alive but filled no sample of its "
                        f"cache for {batch_timeout:.0f} s (job {self.job_id} waits for sample {index}); check its log")
                next_check = now + PRODUCER_POLL_S
            time.sleep(CACHE_POLL_S)
        return True

    def epoch_done(self, epochs: int) -> None:
        if self.channel is not None:
            self.channel.send(EpochDone(self.job_id, epochs))  # a gone producer is reported by the next wait

    def _announce_waiting(self) -> None:
        """About to wait for a batch: give back what we can, fail if we hold the whole ring ourselves,
        and tell the producer we wait (for its stall policy: NOTE [ Slot ownership ])."""
        self.receive_all()
        if self.pending:
            return
        self.give_back()
        held = self.window.held  # GPU reads in flight end by themselves; views in use do not
        if held >= self.ring.layout.slots:
            raise BatchHeldTooLong(
                f"job {self.job_id} holds all {held} slots of producer {self.name!r} (views it still uses, "
                f"keep={self.window.keep}), so no new batch can come: serve with more --slots "
                f"(keep + 2 at least), hold fewer batches at once, `.clone()` them, or pass copy=True")
        self.channel.send(Heartbeat(self.job_id, self.taken, self.read))  # a gone producer is reported by the wait

    def receive_all(self) -> None:
        """Take in every queued message. Raises `GroupBroken` once the producer said a rank of this
        job's group is gone (every read and wait passes here)."""
        dropped = self.channel.dropped
        for msg in self.channel.receive():
            if isinstance(msg, Batch):
                self.pending.append(msg)
            elif isinstance(msg, Suspended):
                self._resume_after_suspension(msg)
            elif isinstance(msg, GroupLost):
                self.group_lost = msg.reason
            elif isinstance(msg, Stop):
                self.stop_reason, self.stop_kind = msg.reason, StopKind(msg.kind)
                if self.stop_kind is StopKind.FINISHED:  # only a suspended job still has some: it missed them
                    self.counters.missed += sum(m.count for m in self.pending)
                self.pending.clear()
                if self.stop_kind is StopKind.FAILED:
                    self.failure = msg.reason
                else:
                    log.warning("producer %r stopped: %s", self.name, msg.reason)
        if self.channel.dropped > dropped:
            log.warning("ignored %d malformed messages from producer %r: %s", self.channel.dropped - dropped,
                        self.name, self.channel.last_drop)
        if self.group_lost:
            raise GroupBroken(f"job {self.job_id} (rank {self.member.rank} of group {self.member.name!r}) cannot go "
                              f"on: {self.group_lost}; restart the whole DDP job")

    def await_suspension(self, batch_timeout: float) -> None:
        """A slot changed under this job, so the producer suspended it: wait for that message."""
        seen, deadline = self.suspensions, time.monotonic() + batch_timeout
        while self.suspensions == seen and self.failure is None and self.stop_reason is None:
            if time.monotonic() > deadline:
                raise ProducerLost(f"a slot of producer {self.name!r} (pid {self.producer_pid}) changed under "
                                   f"job {self.job_id}, and no suspension came within {batch_timeout:.0f} s")
            self.releases.poll()
            if self.channel.wait(self._poll_ms()):
                self.receive_all()

    def _poll_ms(self) -> float:
        return GPU_EVENT_POLL_MS if self.releases.in_flight else PRODUCER_POLL_S * 1000

    def _resume_after_suspension(self, msg: Suspended) -> None:
        """The producer suspended this job for stalling: drop the announcements it voided, say so,
        and ask to go on from the current position."""
        self.suspensions += 1
        kept = set(msg.kept)
        voided = [m for m in self.pending if m.seq not in kept]
        self.pending = deque(m for m in self.pending if m.seq in kept)
        last = self.rebatcher.last
        seen = [m.seq for m in self.pending] + ([last.seq] if last else [])
        log.warning("job %d was suspended by producer %r (%s); %d queued batches voided; resuming from "
                    "the current position", self.job_id, self.name, msg.reason, len(voided))
        self.channel.send(Resume(self.job_id, max(seen, default=-1)))  # a gone producer: reported by the next wait
