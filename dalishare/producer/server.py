"""The serve loop: run the shared stage, fill ring slots, announce them, track jobs, reclaim slots.

The loop is single-threaded: DALI decodes ahead in its own threads (prefetch), while this thread
alternates between control messages and copying finished batches into free slots. It only wires
together the parts that decide: the slot table (slots.py; the rules are NOTE [ Slot ownership ] in
shm/__init__.py), the job registry (jobs.py) and the channel (wire/channel.py; the message sequence
is NOTE [ Control protocol ] in wire/messages.py).

NOTE [ Producer shutdown ]
==========================
Resources are taken in this order, each registered on one ExitStack as it is taken, so any failure
or signal releases exactly what exists, in the reverse order:

1. the name lock (one producer per name; released last, after everything it guards is gone);
2. the stage: the DALI pipeline, dropped before the lock so its threads end first;
3. the ring (host segment or device memory); freed after the channel: jobs are told first;
4. the control channel at NAME.sock; on the way out it first sends every job ``Stop`` (finished,
   stopped or failed, with the reason), then, for a device ring, waits up to DEVICE_FREE_GRACE_S
   for the jobs to release their slots (freeing memory another process reads is undefined in CUDA),
   then closes, lingering briefly so the ``Stop`` messages go out; the socket file is removed.

A killed producer runs none of this: the kernel drops the lock, the next ``serve`` of the name or
``dalishare cleanup`` removes the segment and socket (shm/names.py), and its jobs see it gone by its
pid (`ProducerLost`). SIGINT/SIGTERM only set the stop reason; the loop then ends normally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path

from ..errors import ConfigError
from ..intervals import DEVICE_FREE_GRACE_S, IDLE_POLL_MS, REAP_INTERVAL_S
from ..shm import RingKind, create_ring
from ..shm import names
from ..wire.channel import ProducerChannel
from ..wire.messages import (PROTOCOL_VERSION, Batch, Bye, Heartbeat, Hello, Reject, Release, Resume, Stop,
                             Suspended, Welcome)
from .dataset import scan
from .feed import EpochFeed, Plan
from .jobs import Job, JobRegistry
from .options import ServeOptions
from .slots import SlotTable
from .stage import StageBatch, build_pipeline, find_undecodable, load_stage, parse_device

log = logging.getLogger(__name__)



class Producer:
    """One shared stage served under one name. Build it, then call `serve()`; `stop()` ends it."""

    def __init__(self, pipeline_file: str | Path, data: str | Path, options: ServeOptions | None = None):
        self.options = options or ServeOptions()
        self.options.check()
        self.pipeline_file, self.data = Path(pipeline_file), Path(data)
        self.stop_reason: str | None = None  # set once, by stop(): the loop ends when it is
        self.failure: str | None = None  # set when serve() ends with an exception
        self.batches_served = 0
        self._jobs = JobRegistry()
        self._pipe = None  # the DALI pipeline; None before serve() and after it
        self._channel: ProducerChannel | None = None

    @property
    def bad_messages(self) -> int:
        """Control messages dropped: malformed, of another version, or for no attached job."""
        return self._channel.dropped if self._channel is not None else 0

    def stop(self, reason: str = "stopped") -> None:
        """Ask the serve loop to end; safe to call from a signal handler."""
        self.stop_reason = self.stop_reason or reason

    def serve(self) -> None:
        """Serve until stopped or done. Teardown: NOTE [ Producer shutdown ]."""
        opts = self.options
        with contextlib.ExitStack() as resources:
            lock = names.ServeLock(opts.name)
            resources.callback(lock.release)
            try:
                names.clean_stale(opts.name)
                names.socket_path(opts.name).unlink(missing_ok=True)
                self._dataset = dataset = scan(self.data)
                self._stage = load_stage(self.pipeline_file)
                self._feed = EpochFeed(dataset, opts.batch_size, opts.seed)
                resources.callback(setattr, self, "_pipe", None)
                self._build_pipeline()
                self._ready = self._next_output()  # the first batch: its shape sizes the ring
                first = self._ready[0]
                self._sample_shape, self._dtype = list(first.sample_shape), first.dtype
                self._ring = create_ring(opts.name, opts.slots, opts.batch_size * first.nbytes // first.count,
                                         gpu=parse_device(opts.device))
                resources.callback(self._ring.close)
                self._slots = SlotTable(opts.slots)
                self._seq = 0          # seq of the next batch written; seqs only grow
                self._started = False  # a first batch was announced (min_consumers no longer applies)
                self._done = False     # the last batch of the last epoch is written (or undecodable)
                self._channel = ProducerChannel(names.endpoint(opts.name))
                resources.callback(names.socket_path(opts.name).unlink, missing_ok=True)
                resources.callback(self._close_channel)
                log.info("serving %r: %d samples in %d classes, batches of %d %s %s, %d slots in %s memory, at %s",
                         opts.name, len(dataset), len(dataset.classes), opts.batch_size, self._sample_shape,
                         self._dtype, opts.slots, opts.device, names.endpoint(opts.name))
                self._loop()
            except BaseException as exc:
                self.failure = f"{type(exc).__name__}: {exc}"
                raise

    def _close_channel(self) -> None:
        """Tell every job why we stop, let a device ring's readers finish, close the socket."""
        reason = self.failure or self.stop_reason or "producer stopped"
        if self.failure:
            stop = Stop.failed(reason)
        elif (self.stop_reason or "").startswith("finished"):
            stop = Stop.finished(reason)
        else:
            stop = Stop.stopped(reason)
        try:
            for job in self._jobs:
                self._send(job, stop)
            if self._ring.layout.kind == RingKind.DEVICE:
                self._await_releases(DEVICE_FREE_GRACE_S)
        finally:
            self._channel.close()

    def _await_releases(self, timeout: float) -> None:
        """Before freeing a device ring, give jobs a moment to finish the GPU reads of the slots
        they hold: freeing memory another process still reads is undefined behaviour in CUDA."""
        deadline = time.monotonic() + timeout
        while self._slots.held_count() and time.monotonic() < deadline:
            self._handle_messages(timeout_ms=20)
            self._detach_dead()
        if self._slots.held_count():
            log.warning("freeing the device ring while jobs still hold %d slot(s); they were told to stop",
                        self._slots.held_count())

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        next_reap = time.monotonic()
        while self.stop_reason is None:
            self._handle_messages(timeout_ms=0 if self._can_produce() else IDLE_POLL_MS)
            if time.monotonic() >= next_reap:
                self._reap()
                next_reap = time.monotonic() + REAP_INTERVAL_S
            if self._can_produce():
                self._produce()
            elif self._done and all(self._finished_with(job) for job in self._jobs):
                self.stop(f"finished {self.options.epochs} epochs")
        log.info("stopping %r: %s (%d batches served, %d control messages dropped)",
                 self.options.name, self.stop_reason, self.batches_served, self.bad_messages)

    def _finished_with(self, job: Job) -> bool:
        """After the last epoch: whether the producer may stop without pulling anything from under
        the job. A host ring stays mapped in the job after the producer is gone, so having begun to
        read every batch it holds is enough (it may keep the last views as long as it likes); device
        memory is freed, so there the job must have released every slot."""
        if job.suspended:
            return True
        if self._ring.layout.kind == RingKind.DEVICE:
            return not self._slots.held_by(job.id)
        return not self._slots.unread(job.id, job.taken)

    def _can_produce(self) -> bool:
        if self._done or not self._jobs.active():  # nobody to produce for
            return False
        if not self._started and len(self._jobs) < self.options.min_consumers:
            return False
        return self._slots.free_slot() is not None

    # -- the stage ------------------------------------------------------------------------------

    def _build_pipeline(self) -> None:
        opts = self.options
        self._pipe = None  # release the old pipeline's threads and buffers first
        self._pipe = build_pipeline(self._stage, self._feed, batch_size=opts.batch_size, device=opts.device,
                                    num_threads=opts.num_threads, seed=opts.seed)

    def _next_output(self) -> tuple[StageBatch, Plan]:
        """The next batch of the stage, with the files DALI cannot decode taken out of the feed."""
        while True:
            try:
                (out,) = self._pipe.run()
                return StageBatch.of(out), self._feed.plans.popleft()
            except Exception as exc:  # DALI raises RuntimeError for bad images, the feed OSError
                self._exclude_undecodable(exc)

    def _exclude_undecodable(self, exc: Exception) -> None:
        """After a failed batch: find the files among those in flight that fail alone, exclude and
        report each once, rebuild the pipeline and feed again from the failed batch. A failure that
        no single file explains is re-raised."""
        in_flight = list(self._feed.plans)
        indices = [int(i) for plan in in_flight for i in plan.indices]
        bad = find_undecodable(self._stage, [self._dataset.files[i] for i in indices], device=self.options.device)
        if not bad:
            raise exc
        for position, reason in bad.items():
            self._feed.exclude(indices[position], reason)
            log.warning("excluded %s (sample %d): %s", self._dataset.files[indices[position]], indices[position], reason)
        log.warning("%d of %d files excluded so far because they cannot be decoded",
                    len(self._feed.excluded), len(self._dataset))
        self._build_pipeline()
        self._feed.rewind(in_flight[0])

    def _produce(self) -> None:
        images, plan = self._ready if self._ready is not None else self._next_output()
        self._ready = None
        if self.options.epochs is not None and plan.epoch >= self.options.epochs:
            self._done = True  # the last epoch's tail was undecodable, so no batch was marked last
            return
        if list(images.sample_shape) != self._sample_shape:
            raise ConfigError(f"the stage produced samples of shape {list(images.sample_shape)} after "
                              f"{self._sample_shape}: it must output one fixed shape (add a crop)")
        k = self._slots.free_slot()
        self._ring.write(k, images, self._seq)
        self._slots.fill(k, Batch(seq=self._seq, slot=k, epoch=plan.epoch, start=plan.start,
                                  count=len(plan.indices), last=plan.last, epoch_size=len(plan.order),
                                  excluded=len(self._feed.excluded), labels=plan.labels.astype("<i8").tobytes(),
                                  indices=plan.indices.astype("<i8").tobytes(), sent_ns=0))
        for job in self._jobs.active():
            self._announce(job, k)
        self._seq += 1
        self._started = True
        self.batches_served += 1
        if plan.last and self.options.epochs is not None and plan.epoch + 1 >= self.options.epochs:
            self._done = True

    def _announce(self, job: Job, k: int) -> None:
        """Send the job slot ``k``'s batch; from then on it holds the slot until it releases it."""
        if self._send(job, dataclasses.replace(self._slots.slots[k].batch, sent_ns=time.monotonic_ns())):
            self._slots.hold(k, job.id, time.monotonic())

    # -- control messages: NOTE [ Control protocol ] in wire/messages.py --------------------------

    def _handle_messages(self, timeout_ms: int) -> None:
        for identity, msg in self._channel.receive(timeout_ms):
            self._dispatch(identity, msg)

    def _dispatch(self, identity: bytes, msg) -> None:
        if isinstance(msg, Hello):
            self._attach(identity, msg)
            return
        job = self._jobs.get(getattr(msg, "job_id", -1))
        if job is None:
            self._channel.drop(f"{type(msg).__name__} for unknown job")
            return
        now = time.monotonic()
        self._jobs.heard_from(job, now)
        if isinstance(msg, Release):
            self._jobs.progressed(job, now)
            self._slots.release(job.id, msg.seq)
        elif isinstance(msg, Heartbeat):
            job.taken = max(job.taken, msg.taken)
        elif isinstance(msg, Resume):
            self._resume(job, msg.after_seq)
        elif isinstance(msg, Bye):
            self._detach(job, f"left: {msg.reason}")
        else:
            self._channel.drop(f"unexpected {type(msg).__name__} from job {job.id}")

    def _attach(self, identity: bytes, hello: Hello) -> None:
        if hello.version != PROTOCOL_VERSION:
            self._channel.send(identity, Reject(
                f"protocol version {hello.version} is not the producer's {PROTOCOL_VERSION}: "
                f"install the same dalishare version in the job and the producer"))
            self._channel.drop(f"hello with protocol version {hello.version}")
            return
        job = self._jobs.add(hello.pid, identity, hello.keep, time.monotonic())
        if not self._send(job, Welcome(job_id=job.id, producer_pid=os.getpid(), ring=self._ring.layout.to_wire(),
                                       sample_shape=self._sample_shape, dtype=self._dtype.name,
                                       epoch_size=self._feed.epoch_size, batch_size=self.options.batch_size,
                                       classes=self._dataset.classes)):
            return
        for k in self._slots.resident_of_current_epoch():
            self._announce(job, k)
        log.info("job %d (pid %d, keep=%d) attached; %d jobs", job.id, job.pid, job.keep, len(self._jobs))
        if len(self._slots.slots) < job.keep + 3:
            log.warning("job %d keeps views for %d batches: with %d slots it cannot be suspended if it stalls "
                        "(it would keep %d); serve with --slots %d or more", job.id, job.keep,
                        len(self._slots.slots), job.keep + 2, job.keep + 3)

    def _send(self, job: Job, msg) -> bool:
        """Send to a job; a job that cannot be reached is detached (and False returned)."""
        if not self._channel.send(job.identity, msg):
            self._detach(job, "unreachable (its socket is gone or full)")
            return False
        return True

    # -- liveness -------------------------------------------------------------------------------

    def _reap(self) -> None:
        """Act on the registry's decisions: suspend stallers, detach the dead, probe the silent.

        A job silent for ``heartbeat_timeout`` is probed with a heartbeat of ours: if its socket is
        closed the send fails and it is detached. A job whose process and socket live on (stopped,
        frozen, in a debugger) keeps its slots: detaching it would let the producer overwrite views
        it may still read.
        """
        now = time.monotonic()
        self._suspend_stallers(now)
        self._detach_dead()
        for job in self._jobs.to_probe(now, self.options.heartbeat_timeout):
            if self._send(job, Heartbeat(job.id)) and not job.silent:
                job.silent = True
                log.warning("job %d (pid %d) is alive but sent no heartbeat for %.0f s; "
                            "the jobs wait for it", job.id, job.pid, now - job.last_seen)

    def _detach_dead(self) -> None:
        for job in self._jobs.dead():
            self._detach(job, "died (its process is gone)")

    def _suspend_stallers(self, now: float) -> None:
        """Suspend the jobs that held the others back for longer than the stall timeout (while the
        producer cannot write: no free slot, or its last epoch is served). A suspended job keeps its
        keep+2 oldest slots, the only ones it can be reading (NOTE [ Slot ownership ])."""
        if self._slots.free_slot() is not None and not self._done:
            return
        self._handle_messages(timeout_ms=0)  # count releases already sent: they change what a job holds
        for job in self._jobs.stallers(self._slots, now, self.options.stall_timeout):
            self._jobs.suspend(job)
            kept = self._slots.suspend(job.id, job.keep + 2)
            self._send(job, Suspended(f"held the other jobs back for more than {self.options.stall_timeout:g} s",
                                      kept))
            log.warning("job %d (pid %d) released nothing for %.0f s and held the others back: suspended "
                        "until it resumes (it keeps slots of batches %s)", job.id, job.pid,
                        now - job.last_progress, kept)

    def _resume(self, job: Job, after_seq: int) -> None:
        if not self._jobs.resume(job, time.monotonic()):
            return
        resident = self._slots.resident_after(after_seq)
        for k in resident:
            self._announce(job, k)
        log.info("job %d (pid %d) resumed after batch %d; sent it %d resident batches",
                 job.id, job.pid, after_seq, len(resident))

    def _detach(self, job: Job, why: str) -> None:
        if not self._jobs.remove(job):
            return
        self._slots.forget(job.id)
        log.info("job %d (pid %d) %s; %d jobs left", job.id, job.pid, why, len(self._jobs))
