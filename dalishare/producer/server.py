"""The serve loop: run the shared stage, fill ring slots, announce them, track jobs, reclaim slots.

The loop is single-threaded: DALI decodes ahead in its own threads (prefetch), while this thread
alternates between control messages and copying finished batches into free slots. The rules for
when a slot may be written are NOTE [ Slot ownership ] in ring.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from ..errors import ConfigError, ProtocolError
from ..shm import create_ring
from ..shm import names as runtime
from ..wire import messages as protocol
from ..wire.messages import Batch, Bye, Heartbeat, Hello, Reject, Release, Resume, Stop, Suspended, Welcome
from .dataset import scan
from .feed import EpochFeed, Plan
from .options import ServeOptions
from .stage import StageBatch, build_pipeline, find_undecodable, load_stage, parse_device

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 0.25  # how often to look for dead jobs and stalls
DEVICE_FREE_GRACE_S = 2.0  # how long a stopping producer waits for jobs to release device slots


@dataclass
class _Job:
    id: int
    pid: int
    identity: bytes
    last_seen: float
    started: int | None = None  # the job process's start time, to tell it from a later one with its pid
    keep: int = 2             # from its Hello: it may be reading its keep+2 oldest held slots
    taken: int = -1           # newest seq it has begun to read (its heartbeats); held seqs above are unread
    silent: bool = False      # warned about a missing heartbeat
    suspended: bool = False   # stalled: gets no announcements until it resumes
    last_progress: float = field(default_factory=time.monotonic)  # its last release (or attach, resume)
    next_probe: float = 0.0   # when to check a silent job's socket again


@dataclass
class _Slot:
    batch: Batch | None = None  # what the slot holds now
    holders: dict[int, float] = field(default_factory=dict)  # job id -> when sent; not yet released


class Producer:
    """One shared stage served under one name. Build it, then call `serve()`; `stop()` ends it."""

    def __init__(self, pipeline_file: str | Path, data: str | Path, options: ServeOptions | None = None):
        self.options = options or ServeOptions()
        self.options.check()
        self.pipeline_file, self.data = Path(pipeline_file), Path(data)
        self.stop_reason: str | None = None
        self.failure: str | None = None  # set when serve() ends with an exception
        self.batches_served = 0
        self.bad_messages = 0
        self._jobs: dict[int, _Job] = {}
        self._pipe = None

    def stop(self, reason: str = "stopped") -> None:
        """Ask the serve loop to end; safe to call from a signal handler."""
        self.stop_reason = self.stop_reason or reason

    def serve(self) -> None:
        opts = self.options
        lock = runtime.ServeLock(opts.name)
        ring = sock = ctx = None
        try:
            runtime.clean_stale(opts.name)
            runtime.socket_path(opts.name).unlink(missing_ok=True)
            self._dataset = dataset = scan(self.data)
            self._stage = load_stage(self.pipeline_file)
            self._feed = EpochFeed(dataset, opts.batch_size, opts.seed)
            self._build_pipeline()
            self._ready = self._next_output()
            first = self._ready[0]
            self._sample_shape, self._dtype = list(first.sample_shape), first.dtype
            ring = create_ring(opts.name, opts.slots, opts.batch_size * first.nbytes // first.count,
                               gpu=parse_device(opts.device))
            ctx = zmq.Context()
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)  # bigger: the sender is cut off
            sock.bind(runtime.endpoint(opts.name))
            self._ring, self._sock = ring, sock
            self._slots = [_Slot() for _ in range(opts.slots)]
            self._seq, self._started, self._done = 0, False, False
            log.info("serving %r: %d samples in %d classes, batches of %d %s %s, %d slots in %s memory, at %s",
                     opts.name, len(dataset), len(dataset.classes), opts.batch_size, self._sample_shape,
                     self._dtype, opts.slots, opts.device, runtime.endpoint(opts.name))
            self._loop()
        except BaseException as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if sock is not None:
                finished = (self.stop_reason or "").startswith("finished")
                self._broadcast(Stop(self.failure or self.stop_reason or "producer stopped",
                                     kind="failed" if self.failure else "finished" if finished else "stopped"))
                if ring is not None and ring.layout.kind == "device":
                    self._await_releases(DEVICE_FREE_GRACE_S)
                sock.close(linger=500)
            if ctx is not None:
                ctx.term()
            if ring is not None:
                ring.close()
            runtime.socket_path(opts.name).unlink(missing_ok=True)
            lock.release()
            self._pipe = None

    def _await_releases(self, timeout: float) -> None:
        """Before freeing a device ring, give jobs a moment to finish the GPU reads of the slots
        they hold: freeing memory another process still reads is undefined behaviour in CUDA."""
        deadline = time.monotonic() + timeout
        while any(slot.holders for slot in self._slots) and time.monotonic() < deadline:
            self._handle_messages(timeout_ms=20)
            self._detach_dead()
        held = sum(len(slot.holders) for slot in self._slots)
        if held:
            log.warning("freeing the device ring while jobs still hold %d slot(s); they were told to stop", held)

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        next_reap = time.monotonic()
        while self.stop_reason is None:
            can_produce = self._can_produce()
            self._handle_messages(timeout_ms=0 if can_produce else 50)
            if time.monotonic() >= next_reap:
                self._reap()
                next_reap = time.monotonic() + REAP_INTERVAL_S
            if self._can_produce():
                self._produce()
            elif self._done and all(self._finished_with(job) for job in self._jobs.values()):
                self.stop(f"finished {self.options.epochs} epochs")
        log.info("stopping %r: %s (%d batches served, %d control messages dropped)",
                 self.options.name, self.stop_reason, self.batches_served, self.bad_messages)

    def _unread(self, job: _Job) -> list[int]:
        """Seqs the job holds and has not begun to read (as far as its last heartbeat says)."""
        return [s.batch.seq for s in self._slots if job.id in s.holders and s.batch.seq > job.taken]

    def _finished_with(self, job: _Job) -> bool:
        """After the last epoch: whether the producer may stop without pulling anything from under
        the job. A host ring stays mapped in the job after the producer is gone, so having begun to
        read every batch it holds is enough (it may keep the last views as long as it likes); device
        memory is freed, so there the job must have released every slot."""
        if job.suspended:
            return True
        if self._ring.layout.kind == "device":
            return not any(job.id in s.holders for s in self._slots)
        return not self._unread(job)

    def _can_produce(self) -> bool:
        if self._done or all(job.suspended for job in self._jobs.values()):  # nobody to produce for
            return False
        if not self._started and len(self._jobs) < self.options.min_consumers:
            return False
        return self._free_slot() is not None

    def _free_slot(self) -> int | None:
        """The free slot holding the oldest batch (the newest stay resident for late jobs), or None."""
        free = [k for k, s in enumerate(self._slots) if not s.holders]
        return min(free, key=lambda k: self._slots[k].batch.seq if self._slots[k].batch else -1, default=None)

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
        slot_index = self._free_slot()
        self._ring.write(slot_index, images, self._seq)
        slot = self._slots[slot_index]
        slot.batch = Batch(seq=self._seq, slot=slot_index, epoch=plan.epoch, start=plan.start,
                           count=len(plan.indices), last=plan.last, epoch_size=len(plan.order),
                           excluded=len(self._feed.excluded), labels=plan.labels.astype("<i8").tobytes(),
                           indices=plan.indices.astype("<i8").tobytes(), sent_ns=0)
        for job in list(self._jobs.values()):
            if not job.suspended:
                self._announce(job, slot)
        self._seq += 1
        self._started = True
        self.batches_served += 1
        if plan.last and self.options.epochs is not None and plan.epoch + 1 >= self.options.epochs:
            self._done = True

    def _announce(self, job: _Job, slot: _Slot) -> None:
        if self._send(job, dataclasses.replace(slot.batch, sent_ns=time.monotonic_ns())):
            slot.holders[job.id] = time.monotonic()

    # -- control messages -----------------------------------------------------------------------

    def _handle_messages(self, timeout_ms: int) -> None:
        if not self._sock.poll(timeout_ms):
            return
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self._drop(f"{len(frames)} frames")
                continue
            try:
                msg = protocol.decode(frames[1])
            except ProtocolError as exc:
                self._drop(str(exc))
                continue
            self._dispatch(frames[0], msg)

    def _drop(self, why: str) -> None:
        self.bad_messages += 1
        log.debug("dropped a control message: %s", why)

    def _dispatch(self, identity: bytes, msg) -> None:
        if isinstance(msg, Hello):
            self._attach(identity, msg)
            return
        job = self._jobs.get(getattr(msg, "job_id", -1))
        if job is None:
            self._drop(f"{type(msg).__name__} for unknown job")
            return
        job.last_seen, job.silent = time.monotonic(), False
        if isinstance(msg, Release):
            job.last_progress = job.last_seen
            for slot in self._slots:
                if slot.batch is not None and slot.batch.seq == msg.seq:
                    slot.holders.pop(job.id, None)
        elif isinstance(msg, Resume):
            self._resume(job, msg.after_seq)
        elif isinstance(msg, Bye):
            self._detach(job, f"left: {msg.reason}")
        elif isinstance(msg, Heartbeat):
            job.taken = max(job.taken, msg.taken)
        else:
            self._drop(f"unexpected {type(msg).__name__} from job {job.id}")

    def _attach(self, identity: bytes, hello: Hello) -> None:
        if hello.version != protocol.PROTOCOL_VERSION:
            self._send_to(identity, Reject(
                f"protocol version {hello.version} is not the producer's {protocol.PROTOCOL_VERSION}: "
                f"install the same dalishare version in the job and the producer"))
            self._drop(f"hello with protocol version {hello.version}")
            return
        # random ids: messages a job sent to an earlier producer of this name match no job here
        job_id = secrets.randbits(31)
        while job_id in self._jobs:
            job_id = secrets.randbits(31)
        job = _Job(job_id, hello.pid, identity, time.monotonic(), runtime.process_start(hello.pid), keep=hello.keep)
        self._jobs[job.id] = job
        if not self._send(job, Welcome(job_id=job.id, producer_pid=os.getpid(), ring=self._ring.layout.to_wire(),
                                sample_shape=self._sample_shape, dtype=self._dtype.name,
                                epoch_size=self._feed.epoch_size, batch_size=self.options.batch_size,
                                classes=self._dataset.classes)):
            return
        for slot in self._resident_of_current_epoch():
            self._announce(job, slot)
        log.info("job %d (pid %d, keep=%d) attached; %d jobs", job.id, job.pid, job.keep, len(self._jobs))
        if len(self._slots) < job.keep + 3:
            log.warning("job %d keeps views for %d batches: with %d slots it cannot be suspended if it stalls "
                        "(it would keep %d); serve with --slots %d or more", job.id, job.keep, len(self._slots),
                        job.keep + 2, job.keep + 3)

    def _resident_of_current_epoch(self) -> list[_Slot]:
        """Slots still holding batches of an unfinished epoch, oldest first: what a late job may still read."""
        filled = sorted((s for s in self._slots if s.batch is not None), key=lambda s: s.batch.seq)
        if not filled or filled[-1].batch.last:
            return []
        return [s for s in filled if s.batch.epoch == filled[-1].batch.epoch]

    def _send(self, job: _Job, msg) -> bool:
        """Send to a job; a job that cannot be reached is detached (and False returned)."""
        if not self._send_to(job.identity, msg):
            self._detach(job, "unreachable (its socket is gone or full)")
            return False
        return True

    def _send_to(self, identity: bytes, msg) -> bool:
        try:
            self._sock.send_multipart([identity, protocol.encode(msg)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # EHOSTUNREACH: the peer's socket is gone; EAGAIN: it stopped reading
            return False

    def _broadcast(self, msg) -> None:
        for job in list(self._jobs.values()):
            self._send(job, msg)

    # -- liveness -------------------------------------------------------------------------------

    def _reap(self) -> None:
        """Detach jobs whose process or socket is gone.

        A job silent for ``heartbeat_timeout`` is probed with a heartbeat of ours: if its socket is
        closed the send fails and it is detached. A job whose process and socket live on (stopped,
        frozen, in a debugger) keeps its slots: detaching it would let the producer overwrite views
        it may still read.
        """
        now = time.monotonic()
        self._suspend_stallers(now)
        self._detach_dead()
        for job in list(self._jobs.values()):
            if now - job.last_seen > self.options.heartbeat_timeout and now >= job.next_probe:
                job.next_probe = now + self.options.heartbeat_timeout
                if self._send(job, Heartbeat(job.id)) and not job.silent:
                    job.silent = True
                    log.warning("job %d (pid %d) is alive but sent no heartbeat for %.0f s; "
                                "the jobs wait for it", job.id, job.pid, now - job.last_seen)

    def _detach_dead(self) -> None:
        for job in list(self._jobs.values()):
            if not runtime.pid_alive(job.pid, job.started):
                self._detach(job, "died (its process is gone)")

    def _suspend_stallers(self, now: float) -> None:
        """Suspend the jobs that held the others back for longer than the stall timeout.

        A job stalls when it released nothing for ``stall_timeout`` while holding slots that another
        job waits for: the producer has no free slot (or has served its last epoch) and some other
        active job waits, having begun to read every batch it holds (its heartbeats say how far it
        got). A suspended job keeps its keep+2 oldest slots (the only ones it can be reading: it
        consumes in order and looks for a `Suspended` before each new batch); its other slots are
        freed. See NOTE [ Slot ownership ].
        """
        if self._free_slot() is not None and not self._done:
            return
        self._handle_messages(timeout_ms=0)  # count releases already sent: they change what a job holds
        held = {job.id: sorted(((s.batch.seq, k) for k, s in enumerate(self._slots) if job.id in s.holders))
                for job in self._jobs.values()}
        active = [job for job in self._jobs.values() if not job.suspended]
        if all(self._unread(job) for job in active):  # nobody waits
            return
        for job in active:
            if not held[job.id] or now - job.last_progress < self.options.stall_timeout:
                continue
            job.suspended = True
            for _, k in held[job.id][job.keep + 2:]:
                self._slots[k].holders.pop(job.id)
            kept = [seq for seq, _ in held[job.id][:job.keep + 2]]
            self._send(job, Suspended(f"held the other jobs back for more than {self.options.stall_timeout:g} s",
                                      kept))
            log.warning("job %d (pid %d) released nothing for %.0f s and held the others back: suspended "
                        "until it resumes (it keeps slots of batches %s)", job.id, job.pid,
                        now - job.last_progress, kept)

    def _resume(self, job: _Job, after_seq: int) -> None:
        if not job.suspended:
            return
        job.suspended, job.last_progress = False, time.monotonic()
        resident = sorted((s for s in self._slots if s.batch is not None and s.batch.seq > after_seq),
                          key=lambda s: s.batch.seq)
        for slot in resident:
            self._announce(job, slot)
        log.info("job %d (pid %d) resumed after batch %d; sent it %d resident batches",
                 job.id, job.pid, after_seq, len(resident))

    def _detach(self, job: _Job, why: str) -> None:
        if self._jobs.pop(job.id, None) is None:
            return
        for slot in self._slots:
            slot.holders.pop(job.id, None)
        log.info("job %d (pid %d) %s; %d jobs left", job.id, job.pid, why, len(self._jobs))
