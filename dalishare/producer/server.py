"""The serve loop: the producer's lifecycle, phases, jobs' liveness and teardown.

The loop is single-threaded and never runs DALI: the stage runs in a worker process (supervisor.py;
NOTE [ Stage worker protocol ] in wire/stage.py), so a decoder crash ends only the worker. What is
served is one object, chosen once (output.py): the ring (ring_serving.py; its rules are NOTE [ Slot
ownership ] in shm/__init__.py) or the cache (cache_serving.py; NOTE [ Cache protocol ] in
filling.py). Each pass takes in control messages (waking for the worker's too) and dispatches them
by type (NOTE [ Control protocol ] in wire/messages.py), advances start-up and the worker, runs the
liveness pass, and hands the worker tasks while the mode wants them.

NOTE [ Producer shutdown ]
==========================
Resources are taken in this order, each registered on one ExitStack as it is taken, so any failure
or signal releases exactly what exists, in the reverse order:

1. the name lock (one producer per name; released last, after everything it guards is gone);
2. the control channel at NAME.sock, opened first so jobs are answered during start-up; closing it
   first tells every job ``Stop`` (if that was not done yet), lingers briefly so it goes out, and
   removes the socket file;
3. the stage supervisor: its worker and probe processes are ended (``Quit``, then SIGKILL);
4. the output, the ring or the cache, opened once the first batch (or a DIR cache found complete)
   gave the sample shape (a DIR cache stays; a memory or GPU cache is removed);
5. after the output: the stage worker is ended before it is freed (it may be writing a slot or
   rows), and before that every job is told ``Stop`` (finished, stopped or failed, with the reason)
   and, for device memory, given up to DEVICE_UNMAP_LIMIT_S to unmap it (a job told to stop drops its
   mappings and says ``Bye``) or die: freeing memory another process maps is undefined in CUDA, so
   memory still mapped then is not freed but left to the driver, which reclaims it when this process ends.

A killed producer runs none of this: its stage processes get SIGKILL from the kernel
(PR_SET_PDEATHSIG), the kernel drops the lock, the next ``serve`` of the name or ``dalishare
cleanup`` removes the segment and socket (shm/names.py), and its jobs see it gone by its lock
(NOTE [ Lifelines ]: `ProducerLost`). SIGINT/SIGTERM only set the stop reason; the loop then ends normally.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError
from ..intervals import (DEAD_JOB_DRAIN_MS, DEVICE_UNMAP_LIMIT_S, IDLE_POLL_MS, REAP_INTERVAL_S, STATUS_LIVE_REFRESH_S)
from ..shm import names
from ..wire.channel import ProducerChannel
from ..wire.messages import (PROTOCOL_VERSION, Bye, EpochDone, GroupLost, Heartbeat, Hello, Reject,
                             Release, Resume, StatusQuery, StatusReport, Stop, Welcome)
from .dataset import Dataset, ScanThread
from .filling import fingerprint
from .jobs import Job, JobRegistry, job_status
from .lobby import Lobby
from .cache_policy import parse_cache
from .options import ServeOptions
from .output import open_output, reopen_disk_cache
from .rates import Rate
from .serving import Context, Measuring, Serving
from .supervisor import Done, StageSupervisor, WorkerPhase

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    """Where the producer is. SCANNING (the dataset is listed in a thread) -> MEASURING (the worker
    decodes the first batch, whose shape decides the output and sizes it) -> SERVING (the ring or
    cache exists: jobs are welcomed, slots or rows filled); SCANNING -> SERVING directly for a DIR
    cache found complete or resumable. Jobs that say hello before SERVING get ``Starting`` and are
    welcomed on entering it. The loop may end in any phase."""

    SCANNING = "scanning"
    MEASURING = "measuring"
    SERVING = "serving"


class Producer:
    """One shared stage served under one name. Build it, then call `serve()`; `stop()` ends it."""

    def __init__(self, pipeline_file: str | Path, data: str | Path, options: ServeOptions | None = None):
        self.options = options or ServeOptions()
        self.options.check()
        self.pipeline_file, self.data = Path(pipeline_file), Path(data)
        self.stop_reason: str | None = None  # set once, by stop(): the loop ends when it is
        self._stop_as = Stop.stopped  # the farewell's constructor: Stop.finished once --epochs are read
        self.failure: str | None = None  # set when serve() ends with an exception
        self.on_teardown: Callable[[], None] = lambda: None  # called once the loop ends, before the teardown
        # called with a fresh status() every STATUS_LIVE_REFRESH_S by the loop (serve's line, metrics)
        self.on_status: Callable[[StatusReport], None] = lambda report: None
        self.phase = Phase.SCANNING
        self.serving = Serving()  # what is served: nothing while scanning, then Measuring, then ring or cache
        self._ctx: Context | None = None  # what the modes share; set once the dataset is listed
        self._jobs = JobRegistry()
        self._lobby: Lobby | None = None  # the jobs that came before SERVING; set with the channel
        self._channel: ProducerChannel | None = None
        self._supervisor: StageSupervisor | None = None
        self._resources: contextlib.ExitStack | None = None  # the teardown (NOTE [ Producer shutdown ]), during serve()
        self._fingerprint: dict = {}  # what the ranks of a group compare (filling.fingerprint); set on SERVING
        self._told_jobs = False  # the farewell Stop went out
        self._keep_device_memory = False  # jobs still mapped it DEVICE_UNMAP_LIMIT_S after the Stop: never freed
        self._started_at = time.monotonic()
        self._decoded = Rate()  # Context.decoded over time, for status
        self._scan: ScanThread | None = None
        # the messages anyone may send, and those of an attached job, by type: NOTE [ Control protocol ]
        self._anyone_handlers: dict[type, Callable[[bytes, object], None]] = {
            Hello: self._attach,
            StatusQuery: lambda identity, query: self._channel.send(identity, self.status() if query.version ==
                PROTOCOL_VERSION else Reject.other_version(query.version, "use the dalishare version of the producer"))}
        self._job_handlers: dict[type, Callable[[Job, object], None]] = {
            Release: lambda job, msg: self.serving.on_release(job, msg.seq),
            Heartbeat: lambda job, msg: self._jobs.reported(job, msg.taken, msg.read, time.monotonic()),
            Resume: lambda job, msg: self.serving.on_resume(job, msg.after_seq),
            EpochDone: self._on_epoch_done,
            Bye: lambda job, msg: self._detach(job, f"left: {msg.reason}", lost=msg.failed),
        }

    def stop(self, reason: str = "stopped") -> None:
        """Ask the serve loop to end; safe to call from a signal handler."""
        self.stop_reason = self.stop_reason or reason

    def serve(self) -> None:
        """Serve until stopped or done. Teardown: NOTE [ Producer shutdown ]."""
        opts = self.options
        with contextlib.ExitStack() as resources:
            self._resources = resources
            lock = names.ServeLock(opts.name)
            resources.callback(lock.release)
            try:
                names.clean_stale(opts.name)
                names.socket_path(opts.name).unlink(missing_ok=True)
                self._channel = ProducerChannel(names.endpoint(opts.name))
                self._lobby = Lobby(self._channel, opts.name, self._starting_reason)
                resources.callback(names.socket_path(opts.name).unlink, missing_ok=True)
                resources.callback(self._close_channel)
                self._scan = ScanThread(self.data, parse_cache(opts.cache)[1])  # a DIR cache keeps a shard index
                log.info("%r: scanning %s; jobs may attach at %s", opts.name, self.data, names.endpoint(opts.name))
                self._loop()
            except BaseException as exc:
                self.failure = f"{type(exc).__name__}: {exc}"
                raise
            finally:  # the teardown below is bounded: one that hangs prints where, and the process ends
                self.on_teardown()

    def _close_channel(self) -> None:
        try:
            self._tell_jobs()
        finally:
            self._channel.close()
            names.remove_lifelines(self.options.name)  # told to stop, no job is checked any more

    def _tell_jobs(self) -> None:
        """Tell every job (and every job still waiting for the start) why we stop; wait, boundedly, for
        the jobs that map device memory (a GPU ring or cache) to unmap it or die. Once."""
        if self._told_jobs:
            return
        self._told_jobs = True
        reason = self.failure or self.stop_reason or "producer stopped"
        stop = Stop.failed(reason) if self.failure else self._stop_as(reason)
        self._lobby.tell(stop)
        for job in self._jobs:
            self._send(job, stop)
        deadline = time.monotonic() + DEVICE_UNMAP_LIMIT_S
        while self.serving.readers() and time.monotonic() < deadline:
            self._handle_messages(timeout_ms=20, wake_for_stage=False)  # the stage's messages wait: we stop
            self._detach_dead()
        if self.serving.readers():
            self._keep_device_memory = True
            log.warning("%d job(s) still map this producer's GPU memory %.0f s after the Stop: it is left to the "
                        "driver, which frees it when this process ends", self.serving.readers(), DEVICE_UNMAP_LIMIT_S)

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        next_reap = next_status = time.monotonic()
        while self.stop_reason is None:
            self._handle_messages(timeout_ms=0 if self.serving.can_submit() else IDLE_POLL_MS)
            now = time.monotonic()
            if self.phase is Phase.SCANNING and self._scan.done():
                self._start(*self._scan.result())
            if self._supervisor is not None:
                for event in self._supervisor.poll(now):
                    self._on_filled(event) if isinstance(event, Done) else self.serving.on_lost(event)
            if now >= next_reap:
                self._reap()
                next_reap = now + REAP_INTERVAL_S
            if now >= next_status:
                self.on_status(self.status())
                next_status = now + STATUS_LIVE_REFRESH_S
            while self.serving.can_submit():
                self.serving.submit()
            if self.serving.done() and all(self.serving.finished_with(job) for job in self._jobs):
                reason = f"finished {self.options.epochs} epochs"
                self.stop(reason)
                self._stop_as = Stop.finished if self.stop_reason is reason else self._stop_as  # not after a signal
        report = self.status()
        log.info("stopping %r: %s (%s, %d samples decoded, %d stage worker restarts, %d control messages "
                 "dropped)", self.options.name, self.stop_reason, self.serving.summary(), report.decoded,
                 report.worker_restarts, report.dropped_messages)

    # -- start-up: NOTE [ Stage worker protocol ] in wire/stage.py ---------------------------------

    def _start(self, dataset: Dataset, listing: bytes, identity: bytes) -> None:
        """The dataset is listed: serve a DIR cache of the same key at once, or start the stage
        worker to measure the first batch."""
        self._ctx = Context(self.options, self.pipeline_file, self.data, dataset, listing, identity, self._jobs,
                            self._send, self._start_stage)
        cache = reopen_disk_cache(self._ctx)
        if cache is not None:
            self._serve(cache)
            return
        self.serving = Measuring(self._ctx, self._start_stage())
        self.phase = Phase.MEASURING

    def _start_stage(self) -> StageSupervisor:
        if self._supervisor is None:
            self._supervisor = StageSupervisor(self.pipeline_file, self.options, self._ctx.dataset.files)
            self._resources.callback(self._supervisor.stop, "the producer stops")
        return self._supervisor

    def _on_filled(self, event: Done) -> None:
        if self.phase is Phase.MEASURING:  # the first batch: its shape decides the output
            self.serving.on_filled(event)
            output = open_output(self._ctx, self.serving.feed, self._supervisor, event.sample_shape,
                                 np.dtype(event.dtype))
            self._serve(output)
            return
        serving = self.serving
        if list(event.sample_shape) != serving.shape or event.dtype != serving.dtype.name:
            raise ConfigError(f"the stage produced samples of {event.sample_shape} {event.dtype} after "
                              f"{serving.shape} {serving.dtype.name}: it must output one fixed shape and type "
                              f"(add a crop)")
        self.serving.on_filled(event)

    def _serve(self, output: Serving) -> None:
        """The output exists: register its teardown, start it, welcome the jobs that waited."""
        resources, opts, dataset = self._resources, self.options, self._ctx.dataset
        resources.callback(lambda: output.close(free=not self._keep_device_memory))
        resources.callback(self._stop_stage, "the producer stops")  # before the output is freed
        self.serving = output
        output.begin()  # may start the stage worker (a DIR cache with rows missing): registered after
        resources.callback(self._tell_jobs)  # first of all: before the worker is stopped and the output freed
        welcome = output.welcome()
        self._fingerprint = fingerprint(self._ctx.identity, self.pipeline_file, opts, len(dataset),
                                        welcome["sample_shape"], welcome["dtype"], output.source)
        self.phase = Phase.SERVING
        log.info("serving %r: %d samples in %d classes, batches of %d %s %s, %s, at %s", opts.name, len(dataset),
                 len(dataset.classes), opts.batch_size, welcome["sample_shape"], welcome["dtype"], output.where,
                 names.endpoint(opts.name))
        for identity, hello in self._lobby.leave():
            self._attach(identity, hello)

    def _stop_stage(self, reason: str) -> None:
        if self._supervisor is not None:
            self._supervisor.stop(reason)

    def _starting_reason(self) -> str:
        if self.phase is Phase.SCANNING:
            return f"scanning {self.data}"
        if self._supervisor.phase in (WorkerPhase.PROBING, WorkerPhase.WAITING):
            return "restarting its stage worker after a failure"
        return "decoding the first batch (its shape decides the ring or cache and sizes it)"

    # -- control messages: NOTE [ Control protocol ] in wire/messages.py --------------------------

    def _handle_messages(self, timeout_ms: int, wake_for_stage: bool = True) -> None:
        wake = self._supervisor.links() if self._supervisor is not None and wake_for_stage else ()
        for identity, msg in self._channel.receive(timeout_ms, wake):
            handler = self._anyone_handlers.get(type(msg))
            handler(identity, msg) if handler is not None else self._from_job(msg)

    def _from_job(self, msg) -> None:
        job = self._jobs.get(getattr(msg, "job_id", -1))
        if job is None:
            self._channel.drop(f"{type(msg).__name__} for unknown job")
            return
        self._jobs.heard_from(job, time.monotonic())  # any message proves life
        handler = self._job_handlers.get(type(msg))
        handler(job, msg) if handler is not None else self._channel.drop(
            f"unexpected {type(msg).__name__} from job {job.id}")

    def _on_epoch_done(self, job: Job, msg: EpochDone) -> None:
        job.epochs_read = max(job.epochs_read, msg.epochs)
        self.serving.on_epoch_done(job)

    def _attach(self, identity: bytes, hello: Hello) -> None:
        if hello.version != PROTOCOL_VERSION:
            self._channel.send(identity, Reject.other_version(
                hello.version, "install the same dalishare version in the job and the producer"))
            self._channel.drop(f"hello with protocol version {hello.version}")
            return
        if self.phase is not Phase.SERVING:
            self._lobby.wait(identity, hello)
            return
        refusal = "the producer is stopping" if self._told_jobs else self._jobs.refusal(self.options.name, hello)
        if refusal:
            self._channel.send(identity, Reject(refusal))
            log.warning("refused a job (pid %d): %s", hello.pid, refusal)
            return
        opts, dataset = self.options, self._ctx.dataset
        job = self._jobs.add(hello.pid, identity, hello.keep, time.monotonic(), hello.group, hello.rank, hello.world,
                             self.serving.initial_state(hello), hello.batch_size or opts.batch_size,
                             names.lifeline_path(opts.name, hello.lifeline))
        if self._send(job, Welcome(job_id=job.id, producer_pid=os.getpid(), **self.serving.welcome(),
                                   batch_size=opts.batch_size, classes=dataset.classes, seed=opts.seed,
                                   epochs=opts.epochs or 0, shard=list(opts.shard_of), fingerprint=self._fingerprint)):
            self.serving.attach(job)

    def _send(self, job: Job, msg) -> bool:
        """Send to a job; a job that cannot be reached is detached (and False returned)."""
        if not self._channel.send(job.identity, msg):
            self._detach(job, "unreachable (its socket is gone or full)", lost=True)
            return False
        return True

    # -- status: NOTE [ Control protocol ] (Status) ---------------------------------------------------

    def status(self) -> StatusReport:
        """The producer's figures now: what ``dalishare status``, --metrics-port and serve's line show."""
        now, opts, dataset = time.monotonic(), self.options, self._ctx.dataset if self._ctx else None
        decoded = self._ctx.decoded if self._ctx is not None else 0  # the measured first batch not counted
        self._decoded.update(decoded, now)
        jobs = [job_status(job, now, self.serving.job_report(job)) for job in self._jobs]
        return StatusReport(
            version=PROTOCOL_VERSION, name=opts.name, pid=os.getpid(), phase=self.phase.value,
            uptime_s=float(now - self._started_at), stage=str(self.pipeline_file), device=str(opts.device),
            data=dataset.source if dataset is not None else str(self.data), samples=len(dataset) if dataset is not None else -1,
            classes=len(dataset.classes) if dataset is not None else -1, batch_size=opts.batch_size,
            epochs=opts.epochs or 0, decoded=decoded, decode_per_s=float(self._decoded.per_s(now)),
            worker_restarts=self._supervisor.restarts if self._supervisor else 0,
            dropped_messages=self._channel.dropped if self._channel else 0, jobs=jobs,
            **self.serving.report())

    # -- liveness -------------------------------------------------------------------------------

    def _reap(self) -> None:
        """Act on the registry's decisions: detach the dead, suspend stallers (the mode's policy),
        probe the silent. Every message already sent is taken in first and the dead are detached
        before stalls are judged (their slots are free then), so no message is received in the
        middle of these decisions.

        A job silent for ``heartbeat_timeout`` is probed with a heartbeat of ours: if its socket is
        closed the send fails and it is detached. A job whose process and socket live on (stopped,
        frozen, in a debugger) keeps its slots: detaching it would let the producer overwrite views
        it may still read.
        """
        self._detach_dead()
        now = time.monotonic()
        self._lobby.repeat(now)
        self.serving.reap(now)
        for job in self._jobs.to_probe(now, self.options.heartbeat_timeout):
            if self._send(job, Heartbeat(job.id)) and not job.silent:
                job.silent = True
                log.warning("job %d (pid %d) is alive but sent no heartbeat for %.0f s; "
                            "the jobs wait for it", job.id, job.pid, now - job.last_seen)

    def _detach_dead(self) -> None:
        """Take in the messages sent so far (for a job found dead, also those still on their way: a
        job that sent its last EpochDone and Bye and exited left, it did not die), then detach the
        jobs whose process is gone."""
        self._handle_messages(timeout_ms=DEAD_JOB_DRAIN_MS if self._jobs.dead() else 0, wake_for_stage=False)
        for job in self._jobs.dead():
            self._detach(job, "died (its process is gone)", lost=True)

    def _detach(self, job: Job, why: str, lost: bool = False) -> None:
        """Forget the job and free what it holds. ``lost``: it died or cannot be reached, so the other
        ranks of its group cannot go on: they are told (``GroupLost``) and detached too."""
        if not self._jobs.remove(job):
            return
        self.serving.forget(job)
        log.info("job %d (pid %d) %s; %d jobs left", job.id, job.pid, why, len(self._jobs))
        if lost and job.group:
            reason = f"rank {job.rank} of group {job.group!r} (pid {job.pid}) {why}"
            for mate in self._jobs.group(job.group):
                self._channel.send(mate.identity, GroupLost(reason))
                self._detach(mate, f"told that {reason}")
