"""`DaliShareIterator`: a training job's side of dalishare.

It attaches to a producer by name, maps the ring read-only, and turns the producer's batch
announcements into batches of the job's own size: a job batch that lies inside one producer batch
is a view of the ring (no copy); one that spans producer batches is copied into a tensor the job
owns. Slots are released by the rules of NOTE [ Slot ownership ] in ring.py: a yielded view stays
valid while it is in use, up to ``keep`` further batches (keep.py).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from typing import Callable

import torch
from ..errors import BatchHeldTooLong, ProducerLost, ProducerNotFound, ProtocolError, SlotReused
from ..shm import RingLayout, attach_ring
from ..shm import names as runtime
from ..wire.channel import JobChannel
from ..wire.messages import (Batch, Bye, Heartbeat, Hello, Reject, Release, Resume, Stop, StopKind, Suspended,
                             Welcome)
from .heartbeat import HeartbeatThread
from .keep import KeepWindow
from .releases import SlotReleases
from .views import ProducerBatch, leased_view, slot_tensors

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a waiting job checks that its producer is still alive


class DaliShareIterator:
    """Batches from a shared dalishare producer, as torch tensors.

    Each item is a dict: ``images`` (N, H, W, C) uint8 and ``labels`` (int64) where the ring is
    (the CPU, or the producer's GPU) or on ``device``, and ``indices`` (int64 on the CPU: the samples'
    stable dataset indices, for bookkeeping without a GPU sync). One pass over the iterator is one
    epoch (``loader.epoch`` says which); ``len(loader)`` is this job's batches per full epoch; the
    last batch of an epoch may be smaller than ``batch_size``. A job that attaches mid-epoch first
    gets the rest of that epoch.

    ``images`` is a view of the ring (no copy) when it lies inside one producer batch and ``device``
    is where the ring is. Never write to it (host memory is mapped read-only, so that faults). It
    stays valid while anything refers to it, up to ``keep`` further batches: a loop that takes the
    next batch before it is done with this one (a one-ahead prefetcher, Lightning's fetcher, a
    pinning thread) is safe with the default ``keep=2``. A view still referenced after ``keep``
    further batches raises `BatchHeldTooLong` instead of changing under the job: ``.clone()`` what
    you keep longer, or pass ``copy=True``. On a GPU ring a slot is given back once the work queued on
    the current CUDA stream by then has finished (an event, polled), so queue the work that reads a
    batch on the current stream (or make it wait for yours). ``augment`` is any callable applied to
    each batch dict (a `dalishare.augment.Compose`, say); its result is yielded.

    Args:
        name: the producer's ``--name``.
        batch_size: this job's batch size (default: the producer's).
        device: where batches go (default: where the ring is). Another GPU or the CPU costs one copy.
        augment: callable applied to each batch dict on this job's side.
        copy: yield tensors the job owns instead of views of the ring.
        keep: how many further batches the job may take while still using a view (default 2; 0:
            unchecked, a view is given back at the next step whatever refers to it).
        attach_timeout: seconds to wait for the producer to answer, then `ProducerNotFound`.
        batch_timeout: seconds to wait for the next batch from a live producer, then `ProducerLost`.
        reconnect: when the producer dies, fails or is stopped by a signal, wait up to
            ``reconnect_timeout`` seconds for a new producer of the same name and go on with it
            (the pass in progress ends there); without it, that is `ProducerLost` or the end.
    """

    def __init__(self, name: str = "default", batch_size: int | None = None, device=None,
                 augment: Callable | None = None, *, copy: bool = False, keep: int = 2, attach_timeout: float = 60.0,
                 batch_timeout: float = 600.0, heartbeat_interval: float = 1.0, reconnect: bool = False,
                 reconnect_timeout: float = 600.0):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.name = runtime.check_name(name)
        self.augment, self.copy, self.batch_timeout = augment, copy, batch_timeout
        self.reconnect, self.reconnect_timeout, self._heartbeat_interval = reconnect, reconnect_timeout, heartbeat_interval
        self._requested_batch_size = batch_size
        self.device = torch.device(device) if device is not None else None
        self.epoch: int | None = None
        self.stop_reason: str | None = None
        self.handoff_ns: deque[int] = deque(maxlen=100_000)  # announcement sent -> view ready
        self.excluded_samples = 0  # files the producer excluded because DALI cannot decode them
        self.missed_samples = 0    # samples skipped while this job was suspended for stalling
        self._suspensions = 0
        self._last: Batch | None = None  # the last producer batch taken from the queue
        self._pending: deque[Batch] = deque()
        self._current: ProducerBatch | None = None
        self._window = KeepWindow(keep)  # slots read and not given back yet: NOTE [ Slot ownership ]
        self._taken = -1  # seq of the newest producer batch taken from the queue; sent in heartbeats
        self._releases: SlotReleases | None = None
        self._epoch_over = True
        self._ring = self._heartbeat = self._channel = None
        self._slot_tensors: list[torch.Tensor] = []
        self.job_id: int | None = None
        self._endpoint = runtime.endpoint(name)
        self._failure: str | None = None  # the producer's own error, when it stopped by failing
        self._stop_kind: StopKind | None = None
        try:
            self._connect(attach_timeout)
        except BaseException:
            self.close()
            raise

    def _connect(self, timeout: float) -> None:
        """Attach to the producer serving ``name``: hello/welcome, map its ring, start the heartbeat."""
        self._channel = JobChannel(self._endpoint)
        welcome = self._attach(timeout)
        self.job_id, self.producer_pid = welcome.job_id, welcome.producer_pid
        self._producer_started = runtime.process_start(welcome.producer_pid)
        self.classes, self.samples_per_epoch = welcome.classes, welcome.epoch_size
        self.producer_batch_size = welcome.batch_size
        self.batch_size = self._requested_batch_size or welcome.batch_size
        self._sample_shape = tuple(welcome.sample_shape)
        self._dtype = getattr(torch, welcome.dtype)
        self._sample_bytes = math.prod(self._sample_shape) * self._dtype.itemsize
        self._ring = attach_ring(RingLayout.from_wire(welcome.ring))
        self._slot_tensors, self.ring_device = slot_tensors(self._ring)
        if self._ring.layout.slots < self._window.keep + 2:
            log.warning("producer %r has %d slots: a job that uses keep=%d views at once needs %d; it will "
                        "get BatchHeldTooLong if it does (serve with more --slots, or lower keep)", self.name,
                        self._ring.layout.slots, self._window.keep, self._window.keep + 2)
        self._target = self.device or self.ring_device
        if self._target.type == "cuda" and self._target.index is None:
            self._target = torch.device("cuda", torch.cuda.current_device())
        self._releases = SlotReleases(self._release, self.ring_device if self.ring_device.type == "cuda" else None)
        self._heartbeat = HeartbeatThread(self._channel.sibling(self._endpoint), self.job_id,
                                          self._heartbeat_interval, taken=lambda: self._taken)
        self._heartbeat.start()

    def _disconnect(self) -> None:
        """Say goodbye (if attached), stop the heartbeat, close the socket, unmap the ring."""
        if self._releases is not None:  # let the GPU finish reading the ring before leaving it
            try:
                for seq in self._window.take_all():  # the job leaves: views it still holds may change now
                    self._releases.done_reading(seq)
                self._releases.wait_below(1, timeout=self.batch_timeout)
            except Exception as exc:  # a timeout, or a CUDA error: still close everything below
                log.warning("job %s leaves with GPU reads of the ring still in flight: %s", self.job_id, exc)
            self._releases.forget()
            self._releases = None
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._channel is not None:
            if self.job_id is not None:
                self._channel.send(Bye(self.job_id, "closed"))
            self._channel.close()
            self._channel = None
        self._current, self._slot_tensors, self.job_id = None, [], None
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def _reconnect(self, why: str) -> None:
        """``reconnect=True``: forget the lost producer (its batches, views and slots) and attach
        to its successor. The pass in progress ends here."""
        log.warning("producer %r (pid %d) %s; waiting up to %.0f s for a new one", self.name,
                    self.producer_pid, why, self.reconnect_timeout)
        deadline = time.monotonic() + self.reconnect_timeout
        while runtime.pid_alive(self.producer_pid, self._producer_started) and time.monotonic() < deadline:
            time.sleep(POLL_S)  # until it is gone, its socket could swallow our hello
        self._disconnect()
        self._pending.clear()
        self._window.forget()  # their seqs mean other slots to the next producer
        self._taken = -1
        self._last = self.stop_reason = self._failure = self._stop_kind = None
        self._epoch_over, self.epoch = True, None
        try:
            self._connect(self.reconnect_timeout)
        except ProducerNotFound as exc:
            raise ProducerLost(f"producer {self.name!r} {why}, and no new one came: {exc}") from None
        log.warning("job %d attached to the new producer %r (pid %d)", self.job_id, self.name, self.producer_pid)

    # -- public API -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return math.ceil(self.samples_per_epoch / self.batch_size)

    def __iter__(self):
        self._skip_rest_of_epoch()
        self._receive_all()  # a Suspended message may void the queued head
        head = self._peek()
        if head is None:
            return
        self.epoch, self._epoch_over = head.epoch, False
        while (batch := self._next_batch()) is not None:
            if self.augment is not None:
                batch = self.augment(batch)
            yield batch
            del batch  # this frame must not be what keeps a view alive (keep.py)

    def close(self) -> None:
        """Detach from the producer, stop the heartbeat, unmap the ring. Safe to call twice."""
        self._disconnect()

    def __enter__(self) -> "DaliShareIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- rebatching ----------------------------------------------------------------------------

    def _next_batch(self) -> dict | None:
        self._give_back()
        while True:
            try:
                batch = self._assemble()
                if batch is not None:
                    self._window.stepped()
                return batch
            except SlotReused as exc:  # suspended while reading: the batch is lost, go on after it
                self._current = None
                self.missed_samples += exc.lost
                self._await_suspension()

    def _assemble(self) -> dict | None:
        if self._epoch_over:
            return None
        first = self._producer_batch()
        if first is None:
            return None
        if first.remaining >= self.batch_size or first.msg.last:  # inside one producer batch: a view
            n, offset = min(self.batch_size, first.remaining), first.offset
            images, labels, indices = first.take(n)
            if images.device != self._target:
                images = images.to(self._target)  # one copy: to the CPU (synchronous), another GPU, or a GPU
            elif self.copy:
                images = images.clone()
            else:  # a view with a storage of its own, so the window knows while it is referenced
                images, lease = leased_view(self._ring, first.msg.slot, offset * self._sample_bytes,
                                            (n, *self._sample_shape), self._dtype, self.ring_device)
                self._window.viewed(first.msg.seq, lease)
            self._finish_if_consumed(first)
        else:  # spans producer batches: assemble into a tensor this job owns, up to the epoch's end
            size = self.batch_size
            images = torch.empty((size, *self._sample_shape), dtype=self._dtype, device=self._target)
            labels, indices = torch.empty(size, dtype=torch.int64), torch.empty(size, dtype=torch.int64)
            filled = 0
            while filled < size and not self._epoch_over:
                part = self._producer_batch()
                if part is None:  # the producer stopped
                    break
                n = min(size - filled, part.remaining)
                for out, piece in zip((images, labels, indices), part.take(n)):
                    out[filled : filled + n] = piece
                # rewritten while we copied? (host rings; on a device ring the copy is only queued
                # here, and the two-slot rule of NOTE [ Slot ownership ] is what protects it)
                if not self._ring.holds(part.msg.slot, part.msg.seq):
                    raise SlotReused(filled + n + part.remaining)
                filled += n
                self._finish_if_consumed(part)
            if filled < size:  # the epoch (or the producer) ended first: a last, smaller batch
                images, labels, indices = images[:filled], labels[:filled], indices[:filled]
        if self._target.type != "cpu":  # pinned and non-blocking: a plain copy would wait for the GPU
            labels = labels.pin_memory().to(self._target, non_blocking=True)
        return {"images": images, "labels": labels, "indices": indices}

    def _producer_batch(self) -> ProducerBatch | None:
        """The producer batch to read next (blocking for it), or None once the producer stopped or
        the next batch belongs to another epoch (if the epoch's last samples could not be decoded,
        the batch before them was not marked last)."""
        if self._current is None:
            self._releases.wait_below(2, self.batch_timeout)  # at most one released slot still read by the GPU (NOTE [ Slot ownership ])
            self._receive_all()  # a Suspended message voids queued announcements: see it first
            head = self._peek()
            if head is None or head.epoch != self.epoch:
                self._epoch_over = True
                return None
            msg = self._pending.popleft()
            self._taken = msg.seq
            self._count_missed(msg)
            self.samples_per_epoch, self.excluded_samples = msg.epoch_size, msg.excluded
            images = self._slot_tensors[msg.slot][: msg.count * math.prod(self._sample_shape) * self._dtype.itemsize]
            images = images.view(self._dtype).view(msg.count, *self._sample_shape)
            self._current = ProducerBatch(msg, images)
            if not self._ring.holds(msg.slot, msg.seq):  # voided by a Suspended still on its way
                raise SlotReused(msg.count)
            self.handoff_ns.append(time.monotonic_ns() - msg.sent_ns)
        return self._current

    def _count_missed(self, msg: Batch) -> None:
        """Account for samples skipped between the last batch and ``msg`` (after a suspension)."""
        last, self._last = self._last, msg
        if last is None:
            return
        if msg.epoch == last.epoch:
            missed = msg.start - (last.start + last.count)
        else:
            missed = last.epoch_size - (last.start + last.count) + msg.start + (msg.epoch - last.epoch - 1) * msg.epoch_size
        if missed > 0:
            self.missed_samples += missed
            log.warning("job %d continues at epoch %d sample %d: it missed %d samples while suspended "
                        "(%d in all)", self.job_id, msg.epoch, msg.start, missed, self.missed_samples)

    def _finish_if_consumed(self, part: ProducerBatch) -> None:
        """All of ``part`` is taken: it is given back as soon as no view of it is in use (keep.py)."""
        if part.remaining:
            return
        if part.msg.last:
            self._epoch_over = True
        self._current = None
        self._window.consumed(part.msg.seq)
        self._give_back()

    def _skip_rest_of_epoch(self) -> None:
        """A new pass starts a new epoch: release what is left of an abandoned one."""
        self._give_back()
        while not self._epoch_over:
            part = self._producer_batch()
            if part is None:
                break
            part.take(part.remaining)
            self._finish_if_consumed(part)

    def _give_back(self) -> None:
        """Release the slots the keep rule no longer holds (after their GPU reads, on a device ring)."""
        for seq in self._window.releasable():
            self._releases.done_reading(seq)

    def _release(self, seq: int) -> None:
        self._channel.send(Release(self.job_id, seq))  # a gone producer is reported by the next wait

    # -- control channel ------------------------------------------------------------------------

    def _attach(self, timeout: float) -> Welcome:
        """NOTE [ Control protocol ] (wire/messages.py): Hello, then Welcome or Reject."""
        self._channel.send(Hello(os.getpid(), keep=self._window.keep))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._channel.wait(POLL_S * 1000):
                continue
            for msg in self._channel.receive():
                if isinstance(msg, Reject):
                    raise ProtocolError(f"producer {self.name!r} refused this job: {msg.reason}")
                if isinstance(msg, Welcome):
                    return msg
        raise ProducerNotFound(
            f"no producer named {self.name!r} answered at {self._endpoint} within {timeout:.0f} s: "
            f"start one with `dalishare serve PIPELINE --data DIR --name {self.name}`")

    def _peek(self) -> Batch | None:
        self._wait_for_batch()
        return self._pending[0] if self._pending else None

    def _wait_for_batch(self) -> None:
        """Receive until a batch is pending or the producer stopped; a dead producer raises `ProducerLost`."""
        if not self._pending and self.stop_reason is None and not self._failure:
            self._announce_waiting()
        deadline = time.monotonic() + self.batch_timeout
        while not self._pending and self.stop_reason is None and not self._failure:
            self._releases.poll()  # the producer may be waiting for a slot our GPU just finished with
            if self._channel.wait(self._poll_ms()):
                self._receive_all()
            elif not runtime.pid_alive(self.producer_pid, self._producer_started):
                if self.reconnect:
                    return self._reconnect("died")
                raise ProducerLost(
                    f"producer {self.name!r} (pid {self.producer_pid}) died; restart it with "
                    f"`dalishare serve ... --name {self.name}` and restart this job "
                    f"(or pass reconnect=True to wait for it)")
            elif time.monotonic() > deadline:
                raise ProducerLost(
                    f"producer {self.name!r} (pid {self.producer_pid}) is alive but sent no batch for "
                    f"{self.batch_timeout:.0f} s; check its log (is another job holding it back?)")
        if self.reconnect and (self._failure or self._stop_kind is StopKind.STOPPED):
            return self._reconnect(f"stopped ({self._failure or self.stop_reason})")
        if self._failure:
            raise ProducerLost(f"producer {self.name!r} (pid {self.producer_pid}) failed: {self._failure}; "
                               f"fix the cause in its log, restart it and this job")

    def _announce_waiting(self) -> None:
        """About to wait for a batch: give back what we can, fail if we hold the whole ring ourselves,
        and tell the producer we wait (for its stall policy: NOTE [ Slot ownership ])."""
        self._receive_all()
        if self._pending:
            return
        self._give_back()
        held = self._window.held  # GPU reads in flight end by themselves; views in use do not
        if held >= self._ring.layout.slots:
            raise BatchHeldTooLong(
                f"job {self.job_id} holds all {held} slots of producer {self.name!r} (views it still uses, "
                f"keep={self._window.keep}), so no new batch can come: serve with more --slots "
                f"(keep + 2 at least), hold fewer batches at once, `.clone()` them, or pass copy=True")
        self._channel.send(Heartbeat(self.job_id, self._taken))  # a gone producer is reported by the wait

    def _receive_all(self) -> None:
        """Take in every queued message: NOTE [ Control protocol ] (wire/messages.py)."""
        dropped = self._channel.dropped
        for msg in self._channel.receive():
            if isinstance(msg, Batch):
                self._pending.append(msg)
            elif isinstance(msg, Suspended):
                self._resume_after_suspension(msg)
            elif isinstance(msg, Stop):
                self.stop_reason, self._stop_kind = msg.reason, StopKind(msg.kind)
                if self._stop_kind is StopKind.FINISHED:  # only a suspended job still has some: it missed them
                    self.missed_samples += sum(m.count for m in self._pending)
                self._pending.clear()
                if self._stop_kind is StopKind.FAILED:
                    self._failure = msg.reason
                else:
                    log.warning("producer %r stopped: %s", self.name, msg.reason)
        if self._channel.dropped > dropped:
            log.warning("ignored %d malformed messages from producer %r: %s", self._channel.dropped - dropped,
                        self.name, self._channel.last_drop)

    def _await_suspension(self) -> None:
        """A slot changed under this job, so the producer suspended it: wait for that message."""
        seen, deadline = self._suspensions, time.monotonic() + self.batch_timeout
        while self._suspensions == seen and self._failure is None and self.stop_reason is None:
            if time.monotonic() > deadline:
                raise ProducerLost(f"a slot of producer {self.name!r} (pid {self.producer_pid}) changed under "
                                   f"job {self.job_id}, and no suspension came within {self.batch_timeout:.0f} s")
            self._releases.poll()
            if self._channel.wait(self._poll_ms()):
                self._receive_all()

    def _poll_ms(self) -> float:
        return 1 if self._releases.in_flight else POLL_S * 1000

    def _resume_after_suspension(self, msg: Suspended) -> None:
        """The producer suspended this job for stalling: drop the announcements it voided, say so,
        and ask to go on from the current position."""
        self._suspensions += 1
        kept = set(msg.kept)
        voided = [m for m in self._pending if m.seq not in kept]
        self._pending = deque(m for m in self._pending if m.seq in kept)
        seen = [m.seq for m in self._pending] + ([self._last.seq] if self._last else [])
        log.warning("job %d was suspended by producer %r (%s); %d queued batches voided; resuming from "
                    "the current position", self.job_id, self.name, msg.reason, len(voided))
        self._channel.send(Resume(self.job_id, max(seen, default=-1)))  # a gone producer: reported by the next wait
