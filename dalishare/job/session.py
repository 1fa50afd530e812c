"""One attachment of a job to one producer: its channel, its reader (of the ring or the cache,
chosen once from the ``Welcome``: `open_reader`), releases, heartbeat, queue of announcements and
the producer's liveness. A reconnect opens a new session; nothing is reset by hand.

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

from ..intervals import STARTING_SILENCE_S, GPU_EVENT_POLL_MS, PRODUCER_POLL_S
from ..errors import ConfigError, GroupBroken, ProducerLost, ProducerNotFound, ProtocolError
from ..shm import RingLayout, attach_ring
from ..shm import names
from ..wire.channel import JobChannel
from ..wire.messages import (Batch, Bye, EpochDone, GroupLost, Heartbeat, Hello, Reject, Release, Resume, Starting,
                             Stop, StopKind, Suspended, Welcome)
from .cache_reader import CacheReader
from .cached import CachedSamples
from .heartbeat import HeartbeatThread
from .keep import KeepWindow
from .reading import ReadOptions, Reader
from .releases import SlotReleases
from .ring_reader import RingReader

log = logging.getLogger(__name__)


def open_reader(session: "Session", welcome: Welcome, options: ReadOptions) -> Reader:
    """The reader for what the producer serves, chosen once. A ``Welcome`` with a cache: each job
    reads whole epochs at its own pace, in the producer's order or its own (NOTE [ Cache protocol ],
    producer/filling.py). Otherwise the ring: one stream, paced by the producer for all its jobs
    (NOTE [ Slot ownership ], shm/__init__.py), so a job cannot have an order of its own."""
    if welcome.cache:
        kind, mapping = CacheReader, CachedSamples(welcome.cache)
    elif options.seed is not None:
        raise ConfigError(f"seed={options.seed}: producer {session.name!r} streams one shared order through its "
                          f"ring; a job's own order needs a producer with a cache (serve with --cache "
                          f"memory, gpu or DIR), or drop seed=")
    else:
        kind, mapping = RingReader, attach_ring(RingLayout.from_wire(welcome.ring))
    try:
        return kind(session, mapping, options)
    except BaseException:  # the session closes its reader, which does not exist yet
        mapping.close()
        raise


@dataclass
class Counters:
    """What a job counts across sessions (the iterator's public figures)."""

    excluded: int = 0  # files the producer excluded because DALI cannot decode them
    missed: int = 0    # samples skipped while this job was suspended for stalling
    handoff_ns: deque = field(default_factory=lambda: deque(maxlen=100_000))  # announcement sent -> view ready


class Session:
    """Attached to the producer at ``endpoint``, or `ProducerNotFound` after ``timeout`` seconds."""

    def __init__(self, name: str, endpoint: str, options: ReadOptions, *, keep: int, timeout: float,
                 heartbeat_interval: float, counters: Counters):
        self.name, self.endpoint, self.counters, self.member = name, endpoint, counters, options.member
        self.group_lost: str | None = None  # set by the producer's GroupLost: a rank of our group is gone
        self.window = KeepWindow(keep)  # slots read and not given back yet
        self.pending: deque[Batch] = deque()  # announcements not yet begun, in seq order
        self.taken = -1  # seq of the newest producer batch begun (set by the ring reader); sent in heartbeats
        self.read = 0    # samples handed to the training loop in this session; sent in heartbeats (status)
        self._asked_batch_size = options.batch_size or 0
        self.stop_reason: str | None = None   # set by the producer's Stop
        self.stop_kind: StopKind | None = None
        self.failure: str | None = None       # the producer's own error, when it stopped by failing
        self.suspensions = 0
        self._batch_timeout = options.batch_timeout  # how long a stopping job waits for its GPU reads
        self.said_bye = False  # Bye went out: at close(), or once told to stop with the GPU memory unmapped
        self.job_id: int | None = None
        self.releases: SlotReleases | None = None
        self.heartbeat: HeartbeatThread | None = None
        self.reader: Reader | None = None  # the ring's or the cache's, from the Welcome
        self.data_device = torch.device("cpu")  # where the ring, or the cache, is: the reader's, from the Welcome
        self.channel = JobChannel(endpoint)
        self.lifeline: names.Lifeline | None = None  # held from the Hello until closed: NOTE [ Lifelines ]
        self.producer_lock: str | None = None  # its name lock's text when it welcomed us: tells it from a successor
        try:
            self.lifeline = names.Lifeline(name)
            welcome = self._attach(timeout)
            self.job_id, self.producer_pid = welcome.job_id, welcome.producer_pid  # pid: in its own namespace
            self.producer_lock = names.lock_text(name)
            self.classes = welcome.classes
            self.samples_per_epoch = welcome.epoch_size  # as the Welcome said; the reader knows it since
            self.producer_batch_size = welcome.batch_size
            self.sample_shape = tuple(welcome.sample_shape)
            self.dtype = getattr(torch, welcome.dtype)
            self.producer_seed, self.producer_epochs = welcome.seed, welcome.epochs
            self.shard, self.fingerprint = tuple(welcome.shard), welcome.fingerprint
            self.reader = open_reader(self, welcome, options)
            self.data_device = self.reader.device
            gpu = self.data_device if self.data_device.type == "cuda" else None
            self.releases = SlotReleases(self._release, gpu)
            self.heartbeat = HeartbeatThread(self.channel.sibling(endpoint), self.job_id, heartbeat_interval,
                                             taken=lambda: self.taken, read=lambda: self.read)
            self.heartbeat.start()
        except BaseException:
            self.close(timeout=0)
            raise

    def close(self, timeout: float, failure: str = "") -> None:
        """Give back what is held (after its GPU reads, up to ``timeout`` s), stop the heartbeat, unmap
        the ring, say goodbye, close the channel. Views the job still holds may change after (in GPU
        memory, a ``copy=False`` view held past close() may be freed under it)."""
        try:
            if self.releases is not None:
                self._give_back_all(timeout)
                self.releases.forget()
                self.releases = None
            if self.heartbeat is not None:
                self.heartbeat.stop()
                self.heartbeat = None
            if self.reader is not None:  # before the Bye: the producer may free GPU memory once it has it
                self.reader.close()     # (the reader is kept: its figures stay readable)
            if self.channel is not None:
                if self.job_id is not None and not self.said_bye:
                    self.channel.send(Bye(self.job_id, f"failed: {failure}" if failure else "closed", bool(failure)))
                self.channel.close()
                self.channel = None
        finally:
            if self.lifeline is not None:  # last: until here the producer must not take us for dead
                self.lifeline.release()
                self.lifeline = None

    def _give_back_all(self, timeout: float) -> bool:
        """Give back every slot held, and wait up to ``timeout`` s for the GPU work that reads them;
        whether it finished."""
        try:
            for seq in self.window.take_all():
                self.releases.done_reading(seq)
            self.releases.wait_below(1, timeout=timeout)
            return True
        except Exception as exc:  # a timeout, or a CUDA error: whoever called goes on
            log.warning("job %s leaves with GPU reads of the ring still in flight: %s", self.job_id, exc)
            return False

    def _unmap_device_memory(self) -> None:
        """Told to stop: once this job's GPU is done reading the producer's GPU memory, unmap it and
        say Bye, so the producer may free it (NOTE [ Producer shutdown ]). A view the user still
        holds (``copy=False``) keeps the mapping; the Bye then waits for close()."""
        if not self._give_back_all(self._batch_timeout):
            return  # kernels may still read it: the mapping stays until close(); the producer waits or leaves it
        if self.reader.unmap_device_memory():
            self.channel.send(Bye(self.job_id, "unmapped the producer's GPU memory after its Stop", False))
            self.said_bye = True  # from here on the producer knows this job no more: nothing more is sent

    def producer_alive(self) -> bool:
        """By its name lock (NOTE [ Lifelines ], shm/names.py), whatever pid namespace it runs in."""
        return self.producer_lock is not None and names.held(names.lock_path(self.name), self.producer_lock)

    # -- slots ----------------------------------------------------------------------------------

    def give_back(self) -> None:
        """Release the slots the keep rule no longer holds (after their GPU reads, on a device ring)."""
        for seq in self.window.releasable():
            self.releases.done_reading(seq)

    def _release(self, seq: int) -> None:
        if not self.said_bye:
            self.channel.send(Release(self.job_id, seq))  # a gone producer is reported by the next wait

    # -- control channel: NOTE [ Control protocol ] in wire/messages.py -------------------------

    def _attach(self, timeout: float) -> Welcome:
        """Hello, then wait for the Welcome; a starting producer's ``Starting`` re-arms the timeout
        (NOTE [ Control protocol ])."""
        member = self.member
        self.channel.send(Hello(os.getpid(), keep=self.window.keep, group=member.name if member else "",
                                rank=member.rank if member else 0, world=member.world if member else 1,
                                batch_size=self._asked_batch_size, lifeline=self.lifeline.token))
        deadline = time.monotonic() + timeout
        starting: tuple[int, str | None] | None = None  # (pid, its name lock's text) of a producer that said it starts
        while time.monotonic() < deadline:
            if starting and not names.held(names.lock_path(self.name), starting[1]):
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
                        starting = (msg.producer_pid, names.lock_text(self.name))
                    deadline = time.monotonic() + max(timeout, STARTING_SILENCE_S)
                elif isinstance(msg, Stop):
                    raise ProducerLost(f"producer {self.name!r} stopped before it served a batch: {msg.reason}")
        raise ProducerNotFound(
            f"no producer named {self.name!r} answered at {self.endpoint} within {timeout:.0f} s: "
            f"start one with `dalishare serve PIPELINE --data DIR --name {self.name}`")

    @property
    def lost(self) -> str | None:
        """Why this session's producer is gone for good (died, failed or stopped by a signal), if it is."""
        if self.failure:
            return f"stopped ({self.failure})"
        if self.stop_kind is StopKind.STOPPED:
            return f"stopped ({self.stop_reason})"
        return self._died

    _died: str | None = None  # set once the producer's process was found gone

    @property
    def ended(self) -> bool:
        """Whether the producer said it stopped (finished, stopped or failed)."""
        return self.stop_reason is not None or bool(self.failure)

    def wait_for_batch(self, batch_timeout: float, reconnect: bool) -> None:
        """Receive until a batch is pending or the producer stopped; a dead producer raises
        `ProducerLost` (or, with ``reconnect``, sets `lost` and returns)."""
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

    def poll_producer(self, reconnect: bool) -> bool:
        """Take in the producer's messages and check that it lives: True while it serves; False
        once it stopped (the pass ends) or, with ``reconnect``, died or failed (`lost` says why);
        else those raise `ProducerLost`. A cache reader calls it while it reads at its own pace."""
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

    def epoch_done(self, epochs: int) -> None:
        if self.channel is not None and not self.said_bye:
            self.channel.send(EpochDone(self.job_id, epochs))  # a gone producer is reported by the next wait

    def heartbeat_now(self) -> None:
        """Tell the producer this job waits for a batch (its stall policy: NOTE [ Slot ownership ])."""
        if not self.said_bye:
            self.channel.send(Heartbeat(self.job_id, self.taken, self.read))  # a gone producer is reported by the wait

    def receive_all(self) -> None:
        """Take in every queued message. Raises `GroupBroken` once the producer said a rank of this
        job's group is gone (every read and wait passes here)."""
        dropped = self.channel.dropped
        for msg in self.channel.receive():
            handler = self._handlers.get(type(msg))
            if handler is not None:  # anything else is not for a job that attached: ignored
                handler(self, msg)
        if self.channel.dropped > dropped:
            log.warning("ignored %d malformed messages from producer %r: %s", self.channel.dropped - dropped,
                        self.name, self.channel.last_drop)
        if self.group_lost:
            raise GroupBroken(f"job {self.job_id} (rank {self.member.rank} of group {self.member.name!r}) cannot go "
                              f"on: {self.group_lost}; restart the whole DDP job")

    def _on_batch(self, msg: Batch) -> None:
        self.pending.append(msg)

    def _on_group_lost(self, msg: GroupLost) -> None:
        self.group_lost = msg.reason

    def _on_stop(self, msg: Stop) -> None:
        self.stop_reason, self.stop_kind = msg.reason, StopKind(msg.kind)
        if self.stop_kind is StopKind.FINISHED:  # only a suspended job still has some: it missed them
            self.counters.missed += sum(m.count for m in self.pending)
        self.pending.clear()
        if self.stop_kind is StopKind.FAILED:
            self.failure = msg.reason
        else:
            log.warning("producer %r stopped: %s", self.name, msg.reason)
        if self.data_device.type == "cuda":
            self._unmap_device_memory()

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
        seen = [m.seq for m in self.pending] + [self.taken]  # taken: -1 before the first batch begun
        log.warning("job %d was suspended by producer %r (%s); %d queued batches voided; resuming from "
                    "the current position", self.job_id, self.name, msg.reason, len(voided))
        self.channel.send(Resume(self.job_id, max(seen, default=-1)))  # a gone producer: reported by the next wait

    # the messages a producer sends an attached job, and what each does (NOTE [ Control protocol ])
    _handlers = {Batch: _on_batch, Suspended: _resume_after_suspension, GroupLost: _on_group_lost, Stop: _on_stop}
