"""The serve loop: start the stage worker, give it free ring slots, announce what it fills, track
jobs, reclaim slots; or, with a cache, have the worker fill the cache and let every job read it at
its own pace (NOTE [ Cache protocol ] in filling.py).

The loop is single-threaded and never runs DALI: the stage runs in a worker process (supervisor.py;
NOTE [ Stage worker protocol ] in wire/stage.py), so a decoder crash ends only the worker. Each pass
handles control messages (waking for the worker's messages too), advances start-up and the worker,
checks liveness, and hands out free slots. It only wires together the parts that decide: the slot
table (slots.py; the rules are NOTE [ Slot ownership ] in shm/__init__.py), the job registry
(jobs.py), the supervisor and the channel (wire/channel.py; the message sequence is NOTE [ Control
protocol ] in wire/messages.py).

NOTE [ Producer shutdown ]
==========================
Resources are taken in this order, each registered on one ExitStack as it is taken, so any failure
or signal releases exactly what exists, in the reverse order:

1. the name lock (one producer per name; released last, after everything it guards is gone);
2. the control channel at NAME.sock, opened first so jobs are answered during start-up; closing it
   first tells every job ``Stop`` (if that was not done yet), lingers briefly so it goes out, and
   removes the socket file;
3. the stage supervisor: its worker and probe processes are ended (``Quit``, then SIGKILL);
4. the ring (host segment or device memory), or the cache, sized by the first batch (a DIR cache
   stays; a memory or GPU cache is removed);
5. after the ring or cache: the stage worker is ended before it is freed (it may be writing a slot
   or rows), and before that every job is told ``Stop`` (finished, stopped or failed, with the
   reason) and, for device memory, given up to DEVICE_FREE_GRACE_S to release its slots or leave
   (freeing memory another process reads is undefined in CUDA).

A killed producer runs none of this: its stage processes get SIGKILL from the kernel
(PR_SET_PDEATHSIG), the kernel drops the lock, the next ``serve`` of the name or ``dalishare
cleanup`` removes the segment and socket (shm/names.py), and its jobs see it gone by its pid
(`ProducerLost`). SIGINT/SIGTERM only set the stop reason; the loop then ends normally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import threading
import time
from typing import Callable
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..intervals import (DEAD_JOB_DRAIN_MS, DEVICE_FREE_GRACE_S, IDLE_POLL_MS, REAP_INTERVAL_S, STARTING_REPEAT_S,
                         STATUS_LIVE_REFRESH_S)
from ..shm import RingKind, create_ring
from ..shm import names
from ..shm.cache import CacheLayout, Mark, cache_key, listing_digests
from ..wire.channel import ProducerChannel
from ..wire.messages import (PROTOCOL_VERSION, Batch, Bye, EpochDone, GroupLost, Heartbeat, Hello, JobStatus, Reject,
                             Release, Resume, Starting, StatusQuery, StatusReport, Stop, Suspended, Welcome)
from ..wire.order import epoch_order, share
from .cache_policy import CacheChoice, CacheMode, choose, default_limit, human, parse_cache
from .dataset import Dataset, scan
from .feed import EpochFeed
from .filling import CacheFill, ServedCache, dali_version, disk_cache_path, fingerprint, reusable_layout
from .jobs import Job, JobRegistry, JobState
from .options import ServeOptions
from .rates import Rate
from .slots import SlotTable
from .stage import parse_device
from .supervisor import Done, Lost, StageSupervisor, WorkerPhase

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    """Where the producer is. SCANNING (the dataset is listed in a thread) -> MEASURING (the worker
    decodes the first batch, whose shape sizes the ring or the cache) -> SERVING (the ring or cache
    exists: jobs are welcomed, slots or rows filled); SCANNING -> SERVING directly for a DIR cache
    found complete or resumable. Jobs that say hello before SERVING get ``Starting`` and are
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
        self.on_teardown: Callable[[], None] = lambda: None  # called once the loop ends, before the teardown
        # called with a fresh status() every STATUS_LIVE_REFRESH_S by the loop (serve's line, metrics)
        self.on_status: Callable[[StatusReport], None] = lambda report: None
        self._started_at = time.monotonic()
        self._decoded = Rate()  # samples_decoded over time
        self._feed: EpochFeed | None = None
        self._dataset: Dataset | None = None
        self.failure: str | None = None  # set when serve() ends with an exception
        self.batches_served = 0  # announced batches (the ring) or filled tasks (the cache)
        self.samples_decoded = 0  # by the stage worker, into the ring or the cache (the measured batch not counted)
        self.phase = Phase.SCANNING
        self._jobs = JobRegistry()
        self._waiting: dict[bytes, Hello] = {}  # hellos that came before SERVING, by identity
        self._channel: ProducerChannel | None = None
        self._ring = None
        self._cache: ServedCache | None = None  # set instead of the ring when serving from a cache
        self._fill: CacheFill | None = None      # with the cache: the rows still to decode
        self._read_all_epochs = False  # with a cache and --epochs N: some job has read N epochs
        self._fill_started: float | None = None  # with a cache: when the first fill task went out (for the log)
        self._fingerprint: dict = {}  # with a cache: what the ranks of a group compare (filling.fingerprint)
        self._supervisor: StageSupervisor | None = None
        self._told_jobs = False  # the farewell Stop went out
        # (epoch, position) up to which lost batches are re-made one file per task, one at a time,
        # after a failure no single file explained (two files that only fail together); None: normal
        self._careful_until: tuple[int, int] | None = None
        self._next_starting = 0.0  # when to repeat Starting to the jobs that wait

    @property
    def bad_messages(self) -> int:
        """Control messages dropped: malformed, of another version, or for no attached job."""
        return self._channel.dropped if self._channel is not None else 0

    @property
    def worker_restarts(self) -> int:
        return self._supervisor.restarts if self._supervisor else 0

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
                self._slots = SlotTable(opts.slots)
                self._seq = 0          # seq of the next task; seqs only grow (a re-made batch gets a new one)
                self._started = False  # a first batch was announced (min_consumers no longer applies)
                self._channel = ProducerChannel(names.endpoint(opts.name))
                resources.callback(names.socket_path(opts.name).unlink, missing_ok=True)
                resources.callback(self._close_channel)
                self._scan = _Scan(self.data)
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

    def _tell_jobs(self) -> None:
        """Tell every job (and every job still waiting for the start) why we stop; give a device
        ring's readers a moment to finish. Once."""
        if self._told_jobs:
            return
        self._told_jobs = True
        reason = self.failure or self.stop_reason or "producer stopped"
        if self.failure:
            stop = Stop.failed(reason)
        elif (self.stop_reason or "").startswith("finished"):
            stop = Stop.finished(reason)
        else:
            stop = Stop.stopped(reason)
        for identity in self._waiting:
            self._channel.send(identity, stop)
        for job in self._jobs:
            self._send(job, stop)
        if self._ring is not None and self._ring.layout.kind == RingKind.DEVICE or \
                self._cache is not None and self._cache.rows is not None:
            self._await_releases(DEVICE_FREE_GRACE_S)

    def _await_releases(self, timeout: float) -> None:
        """Before freeing a device ring, give jobs a moment to finish the GPU reads of the slots
        they hold: freeing memory another process still reads is undefined behaviour in CUDA."""
        deadline = time.monotonic() + timeout
        busy = (lambda: len(self._jobs)) if self._cache is not None else self._slots.held_count  # GPU cache: until they leave
        while busy() and time.monotonic() < deadline:
            self._handle_messages(timeout_ms=20, wake_for_stage=False)  # the stage's messages wait: we stop
            self._detach_dead()
        if busy():
            log.warning("freeing device memory while %d job(s) or slot(s) may still read it; they were told to stop",
                        busy())

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        next_reap = next_status = time.monotonic()
        while self.stop_reason is None:
            self._handle_messages(timeout_ms=0 if self._can_submit() else IDLE_POLL_MS)
            now = time.monotonic()
            if self.phase is Phase.SCANNING and self._scan.done():
                self._start_stage(self._scan.result())
            if self._supervisor is not None:
                for event in self._supervisor.poll(now):
                    self._on_filled(event) if isinstance(event, Done) else self._on_lost(event)
            if now >= next_reap:
                self._reap()
                next_reap = now + REAP_INTERVAL_S
            if now >= next_status:
                self.on_status(self.status())
                next_status = now + STATUS_LIVE_REFRESH_S
            while self._can_submit():
                self._submit()
            if self._done() and all(self._finished_with(job) for job in self._jobs):
                self.stop(f"finished {self.options.epochs} epochs")
        log.info("stopping %r: %s (%d batches served, %d samples decoded, %d stage worker restarts, %d control "
                 "messages dropped)", self.options.name, self.stop_reason, self.batches_served, self.samples_decoded,
                 self.worker_restarts, self.bad_messages)

    def _done(self) -> bool:
        """The last batch of the last epoch is announced (or the rest of it was undecodable); with a
        cache, some job has read the last epoch."""
        if self._cache is not None:
            return self._read_all_epochs
        return (self.phase is Phase.SERVING and self._final_epoch_fed() and not self._supervisor.in_flight())

    def _final_epoch_fed(self) -> bool:
        return self.options.epochs is not None and self._feed.next_epoch() >= self.options.epochs

    def _finished_with(self, job: Job) -> bool:
        """After the last epoch: whether the producer may stop without pulling anything from under
        the job. A host ring stays mapped in the job after the producer is gone, so having begun to
        read every batch it holds is enough (it may keep the last views as long as it likes); device
        memory is freed, so there the job must have released every slot."""
        if self._cache is not None:
            return job.epochs_read >= self.options.epochs
        if job.suspended:
            return True
        if self._ring.layout.kind == RingKind.DEVICE:
            return not self._slots.held_by(job.id)
        return not self._slots.unread(job.id, job.taken)

    # -- the stage: NOTE [ Stage worker protocol ] in wire/stage.py -------------------------------

    def _start_stage(self, scanned: tuple[Dataset, bytes, bytes]) -> None:
        """The dataset is listed: serve a DIR cache of the same key at once, or start the stage
        worker to measure the first batch."""
        opts = self.options
        self._dataset, self._listing, self._identity = scanned  # the listing with and without mtimes
        self._feed = EpochFeed(self._dataset, opts.batch_size, opts.seed, opts.shard_of)
        mode, folder = parse_cache(opts.cache)
        if mode is CacheMode.DISK:
            layout = reusable_layout(disk_cache_path(folder, self.data, self.pipeline_file), self._listing,
                                     self.pipeline_file, self._decoder())
            if layout is not None:
                self._open_cache(CacheChoice(CacheMode.DISK, f"reusing the cache of this dataset and stage in "
                                                             f"{folder}", folder), layout)
                return
        self._start_worker()
        self.phase = Phase.MEASURING

    def _start_worker(self) -> None:
        self._supervisor = StageSupervisor(self.pipeline_file, self.options, self._dataset.files)
        self._resources.callback(self._supervisor.stop, "the producer stops")

    def _can_submit(self) -> bool:
        """Whether to hand the worker a task now."""
        if self._supervisor is None or self._supervisor.room() <= 0:
            return False
        if self._cache is not None:  # fill as fast as the stage goes, once min_consumers came
            if self._fill.careful() and self._supervisor.in_flight():
                return False
            return self._fill.pending() > 0 and (self._started or len(self._jobs) >= self.options.min_consumers)
        if self.phase is Phase.MEASURING or self._careful_until is not None:
            if self._supervisor.in_flight():  # one task at a time: the one whose batch sizes the ring, or a careful one
                return False
            if self.phase is Phase.MEASURING:
                return True
        if self._final_epoch_fed() or not (self._jobs.active() or self._jobs.formed()):  # nothing more, or nobody to produce for
            return False
        if not self._started and len(self._jobs) < self.options.min_consumers:
            return False
        return self._slots.free_slot() is not None

    def _submit(self) -> None:
        if self._cache is not None:
            rows, careful = self._fill.next_rows(self.options.batch_size)
            self._supervisor.submit(self._seq, -1, rows, rows, careful=careful, rows=True)
            self._seq, self._started = self._seq + 1, True
            self._fill_started = self._fill_started or time.monotonic()
            return
        careful = self._careful_until is not None
        if self._jobs.formed() and not self._jobs.active() and not careful and \
                not any(p.start == 0 for p in self._supervisor.plans()):  # a group waits for an epoch's start
            self._feed.skip_rest_of_epoch()
            if self._final_epoch_fed():  # that was the last epoch: nothing more to start the group with
                return
        plan = self._feed.next_plan(limit=1 if careful else None)
        k = -1  # measuring: the worker writes nothing
        if self.phase is Phase.SERVING:
            k = self._slots.free_slot()
            self._slots.reserve(k, self._seq)
            self._ring.mark(k, -1)
        self._supervisor.submit(self._seq, k, plan.indices.tolist(), plan, careful=careful)
        self._seq += 1
        if careful and self._feed.position() >= self._careful_until:
            self._careful_until = None
            log.info("the batches lost without a culprit are made again; back to whole batches")

    def _on_filled(self, event: Done) -> None:
        task, plan = event.done.task, event.done.plan
        if self.phase is Phase.MEASURING:
            self._feed.rewind(plan)  # serve the measured batch again, into a slot (or its rows)
            self._open_output(event)
            return
        if event.sample_shape != self._sample_shape or event.dtype != self._dtype.name:
            raise ConfigError(f"the stage produced samples of {event.sample_shape} {event.dtype} after "
                              f"{self._sample_shape} {self._dtype.name}: it must output one fixed shape and "
                              f"type (add a crop)")
        if self._cache is not None:
            self._cache.store.mark(plan)  # after the worker's answer: the mark follows the bytes
            self.batches_served += 1
            self.samples_decoded += len(plan)
            if not self._fill.pending() and not self._supervisor.in_flight():
                self._cache_full()
            return
        k = task.slot
        if plan.start == 0:  # an epoch begins: groups whose ranks are all here start with it
            for group in self._jobs.formed():
                self._start_group(group, [], plan.epoch)
        self._ring.mark(k, task.seq)
        self._slots.fill(k, Batch(seq=task.seq, slot=k, epoch=plan.epoch, start=plan.start,
                                  count=len(plan.indices), last=plan.last, epoch_size=len(plan.order),
                                  excluded=len(self._feed.excluded), labels=plan.labels.astype("<i8").tobytes(),
                                  indices=plan.indices.astype("<i8").tobytes(),
                                  padded=plan.padded.astype(np.uint8).tobytes() if plan.padded.any() else b"",
                                  sent_ns=0))
        for job in self._jobs.active():
            self._announce(job, k)
        self._started = True
        self.batches_served += 1
        self.samples_decoded += len(plan.indices)

    def _on_lost(self, event: Lost) -> None:
        """The worker went with ``event.tasks``: exclude the files the probes blamed, free the slots,
        feed again from the oldest lost batch (the served samples keep their places)."""
        files = self._dataset.files
        for index, reason in event.culprits.items():
            self._feed.exclude(index, reason)
            log.warning("excluded %s (sample %d): %s", files[index], index, reason)
        if event.culprits:
            log.warning("%d of %d files excluded so far because they cannot be decoded",
                        len(self._feed.excluded), len(self._dataset))
        if self._cache is not None:  # excluded rows are never cached; the others are decoded again first
            self._cache.store.mark(list(event.culprits), Mark.EXCLUDED)
            rows = [i for lost in event.tasks for i in lost.plan if i not in event.culprits]
            self._fill.requeue(rows, careful=bool(event.tasks) and not event.culprits)
            if not self._fill.pending() and not self._supervisor.in_flight():
                self._cache_full()
            return
        for lost in event.tasks:
            if lost.task.slot >= 0:
                self._slots.unreserve(lost.task.slot)
        if event.tasks:
            self._feed.rewind(event.tasks[0].plan)
        if event.tasks and not event.culprits:  # no file alone explains it: maybe files together do
            last = event.tasks[-1].plan
            self._careful_until = max(self._careful_until or (0, 0), (last.epoch, last.start + len(last.indices)))
            log.warning("no file explains the failure: making the %d lost batches again one file at a time",
                        len(event.tasks))

    def _open_output(self, first: Done) -> None:
        """The first batch's shape is known: open the cache the options and the stage allow, else
        the ring. An explicit cache that cannot be had raises `ConfigError` (exit code 2)."""
        opts = self.options
        self._sample_shape, self._dtype = list(first.sample_shape), np.dtype(first.dtype)
        sample_bytes = int(np.prod(self._sample_shape)) * self._dtype.itemsize
        mode, folder = parse_cache(opts.cache)
        limit = opts.cache_limit if opts.cache_limit is not None else \
            default_limit(parse_device(opts.device) if mode is CacheMode.GPU else None)
        choice = choose(mode, folder, samples=len(self._dataset), sample_bytes=sample_bytes, limit=limit,
                        stateful_ops=self._supervisor.stateful or [])
        if choice.mode is CacheMode.OFF:
            log.info("%r: %s", opts.name, choice.reason)
        else:
            key = cache_key(self._listing, self.pipeline_file, self._sample_shape, self._dtype.name,
                            dali_version(), self._decoder())
            layout = CacheLayout(key, len(self._dataset), self._sample_shape, self._dtype.name,
                                 rows_in_file=choice.mode is not CacheMode.GPU)
            try:
                self._open_cache(choice, layout)
                return
            except ConfigError:
                raise
            except Exception as exc:  # no room on the disk, in /dev/shm or on the GPU (ENOSPC, out of memory)
                if mode in (CacheMode.MEMORY, CacheMode.GPU):  # asked for explicitly: exit 2
                    raise ConfigError(f"--cache {mode.value}: cannot allocate the cache of {human(layout.rows_bytes)} "
                                      f"({exc}); lower --cache-limit to what is free, or use --cache DIR or off") from None
                log.warning("%r: cannot create the cache (%s); serving without it (--cache off)", opts.name, exc)
        self._open_ring()

    def _decoder(self) -> str:
        return "cpu" if parse_device(self.options.device) is None else "gpu"

    def _open_cache(self, choice: CacheChoice, layout: CacheLayout) -> None:
        """Create or reopen the cache, have the worker fill what is missing, welcome the jobs that
        waited (NOTE [ Cache protocol ] in filling.py)."""
        opts = self.options
        log.info("%r: %s", opts.name, choice.reason)
        path = disk_cache_path(choice.folder, self.data, self.pipeline_file) if choice.mode is CacheMode.DISK \
            else ServedCache.memory_path(opts.name)
        self._cache = ServedCache(choice.mode, path, layout, self._dataset.labels, opts.name, parse_device(opts.device))
        self._resources.callback(self._cache.close)
        self._resources.callback(self._stop_worker, "the producer stops")  # before the cache is freed
        self._resources.callback(self._tell_jobs)  # before the worker is stopped and the cache freed
        self._sample_shape, self._dtype = list(layout.sample_shape), np.dtype(layout.dtype)
        store = self._cache.store
        store.mark(list(self._feed.excluded), Mark.EXCLUDED)  # found while measuring
        first = epoch_order(len(self._dataset), opts.seed, 0)
        if opts.shard_of[1] > 1:  # this node's share of epoch 0 first: its jobs read it first
            mine = share(first, *opts.shard_of)[0]
            first = np.concatenate([mine, first[~np.isin(first, mine)]])
        self._fill = CacheFill(store.marks, first)
        log.info("%r: cache %s: %d of %d samples decoded%s, %d excluded; %s", opts.name, store.path,
                 store.valid_count(), layout.samples, " (resumed)" if store.resumed else "", len(store.excluded()),
                 f"{self._fill.pending()} to decode" if self._fill.pending() else "nothing to decode")
        if self._fill.pending():
            if self._supervisor is None:
                self._start_worker()
            self._supervisor.map_cache(self._cache.wire())
        else:
            self._stop_worker("the cache is full")
        self._enter_serving(f"{human(layout.rows_bytes)} cache in {choice.mode.value} ({store.path})")

    def _cache_full(self) -> None:
        took = time.monotonic() - (self._fill_started or time.monotonic())
        store = self._cache.store
        log.info("%r: the cache is full: %d samples decoded in %.1f s (%.0f/s), %d valid, %d excluded; no more "
                 "decoding", self.options.name, self.samples_decoded, took, self.samples_decoded / max(took, 1e-9),
                 store.valid_count(), len(store.excluded()))
        self._stop_worker("the cache is full")

    def _stop_worker(self, reason: str) -> None:
        if self._supervisor is not None:
            self._supervisor.stop(reason)

    def _open_ring(self) -> None:
        """Create the ring, give it to the worker, welcome the jobs that waited."""
        opts = self.options
        sample_bytes = int(np.prod(self._sample_shape)) * self._dtype.itemsize
        self._ring = create_ring(opts.name, opts.slots, opts.batch_size * sample_bytes, gpu=parse_device(opts.device))
        self._resources.callback(self._ring.close)
        self._resources.callback(self._supervisor.stop, "the producer stops")  # before the ring is freed
        self._resources.callback(self._tell_jobs)  # before the worker is stopped and the ring freed
        self._supervisor.map_ring(self._ring.layout.to_wire())
        self._enter_serving(f"{opts.slots} slots in {opts.device} memory")

    def _enter_serving(self, where: str) -> None:
        opts = self.options
        self._fingerprint = fingerprint(self._identity, self.pipeline_file, opts, len(self._dataset),
                                        self._sample_shape, self._dtype.name, "cache" if self._cache else "ring")
        self.phase = Phase.SERVING
        log.info("serving %r: %d samples in %d classes, batches of %d %s %s, %s, at %s", opts.name,
                 len(self._dataset), len(self._dataset.classes), opts.batch_size, self._sample_shape, self._dtype,
                 where, names.endpoint(opts.name))
        waiting, self._waiting = self._waiting, {}
        for identity, hello in waiting.items():
            if names.pid_alive(hello.pid, None):
                self._attach(identity, hello)

    def _starting_reason(self) -> str:
        if self.phase is Phase.SCANNING:
            return f"scanning {self.data}"
        if self._supervisor.phase in (WorkerPhase.PROBING, WorkerPhase.WAITING):
            return "restarting its stage worker after a failure"
        return "decoding the first batch (its shape sizes the ring)"

    def _announce(self, job: Job, k: int) -> None:
        """Send the job slot ``k``'s batch; from then on it holds the slot until it releases it."""
        if self._jobs.get(job.id) is None:  # detached meanwhile (its group lost a rank): nobody would release it
            return
        if self._send(job, dataclasses.replace(self._slots.slots[k].batch, sent_ns=time.monotonic_ns())):
            self._slots.hold(k, job.id, time.monotonic())

    # -- control messages: NOTE [ Control protocol ] in wire/messages.py --------------------------

    def _handle_messages(self, timeout_ms: int, wake_for_stage: bool = True) -> None:
        wake = self._supervisor.links() if self._supervisor is not None and wake_for_stage else ()
        for identity, msg in self._channel.receive(timeout_ms, wake):
            self._dispatch(identity, msg)

    def _dispatch(self, identity: bytes, msg) -> None:
        if isinstance(msg, Hello):
            self._attach(identity, msg)
            return
        if isinstance(msg, StatusQuery):
            self._channel.send(identity, self.status() if msg.version == PROTOCOL_VERSION else Reject(
                f"protocol version {msg.version} is not the producer's {PROTOCOL_VERSION}: use the dalishare "
                f"version of the producer"))
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
            job.reads.update(msg.read, now)
        elif isinstance(msg, Resume):
            self._resume(job, msg.after_seq)
        elif isinstance(msg, EpochDone):
            job.epochs_read = max(job.epochs_read, msg.epochs)
            if self.options.epochs is not None and job.epochs_read >= self.options.epochs:
                self._read_all_epochs = True
        elif isinstance(msg, Bye):
            self._detach(job, f"left: {msg.reason}", lost=msg.failed)
        else:
            self._channel.drop(f"unexpected {type(msg).__name__} from job {job.id}")

    def _attach(self, identity: bytes, hello: Hello) -> None:
        if hello.version != PROTOCOL_VERSION:
            self._channel.send(identity, Reject(
                f"protocol version {hello.version} is not the producer's {PROTOCOL_VERSION}: "
                f"install the same dalishare version in the job and the producer"))
            self._channel.drop(f"hello with protocol version {hello.version}")
            return
        if self.phase is not Phase.SERVING:
            if identity not in self._waiting:
                log.info("a job (pid %d) waits for the start: %s", hello.pid, self._starting_reason())
            self._waiting[identity] = hello
            self._channel.send(identity, Starting(os.getpid(), self._starting_reason()))
            return
        refusal = self._group_refusal(hello)
        if refusal:
            self._channel.send(identity, Reject(refusal))
            log.warning("refused a job (pid %d): %s", hello.pid, refusal)
            return
        forming = bool(hello.group) and self._cache is None  # on the ring a group starts at an epoch's start
        job = self._jobs.add(hello.pid, identity, hello.keep, time.monotonic(), hello.group, hello.rank, hello.world,
                             JobState.FORMING if forming else JobState.ACTIVE, hello.batch_size or self.options.batch_size)
        opts = self.options
        if not self._send(job, Welcome(job_id=job.id, producer_pid=os.getpid(),
                                       ring=self._ring.layout.to_wire() if self._ring else {},
                                       cache=self._cache.wire() if self._cache else {},
                                       sample_shape=self._sample_shape, dtype=self._dtype.name,
                                       epoch_size=self._epoch_size(), batch_size=opts.batch_size,
                                       classes=self._dataset.classes, seed=opts.seed, epochs=opts.epochs or 0,
                                       shard=list(opts.shard_of), fingerprint=self._fingerprint)):
            return
        if self._cache is not None:
            rank = f" as rank {job.rank} of {job.world} of group {job.group!r}" if job.group else ""
            log.info("job %d (pid %d) attached%s; it reads the cache at its own pace; %d jobs", job.id, job.pid,
                     rank, len(self._jobs))
            return
        if forming:
            ranks = self._jobs.group(job.group)
            log.info("job %d (pid %d) attached as rank %d of %d of group %r (%d of its ranks here)", job.id, job.pid,
                     job.rank, job.world, job.group, len(ranks))
            resident = self._slots.epoch_from_start()
            if job.group in self._jobs.formed() and resident:
                self._start_group(job.group, resident, self._slots.slots[resident[0]].batch.epoch)
            return
        for k in self._slots.resident_of_current_epoch():
            self._announce(job, k)
        log.info("job %d (pid %d, keep=%d) attached; %d jobs", job.id, job.pid, job.keep, len(self._jobs))
        if len(self._slots.slots) < job.keep + 3:
            log.warning("job %d keeps views for %d batches: if it stalls, suspending it frees no slot of %d "
                        "(it keeps %d), so the other jobs wait for it; serve with --slots %d or more", job.id,
                        job.keep, len(self._slots.slots), job.keep + 2, job.keep + 3)

    def _group_refusal(self, hello: Hello) -> str | None:
        if not hello.group:
            return None
        return self._jobs.group_refusal(hello.group, hello.rank, hello.world)

    def _start_group(self, group: str, resident: list[int], epoch: int) -> None:
        """Every rank of ``group`` is here; on the ring they start together at an epoch's first
        batch, so each gets the same share of whole epochs: the resident one (``resident``: its
        slots, oldest first), else the next one filled (`_on_filled` calls this with [] as it
        announces it; until then they stay FORMING, and `_submit` skips the rest of the epoch if
        nobody else reads it)."""
        ranks = self._jobs.activate(group, time.monotonic())
        for job in ranks:
            for k in resident:
                self._announce(job, k)
        log.info("group %r: its %d ranks start together at epoch %d", group, len(ranks), epoch)

    # -- status: NOTE [ Control protocol ] (Status) ---------------------------------------------------

    def status(self) -> StatusReport:
        """The producer's figures now: what ``dalishare status``, --metrics-port and serve's line show."""
        now, opts = time.monotonic(), self.options
        self._decoded.update(self.samples_decoded, now)
        dataset, ring, cache, feed = self._dataset, self._ring, self._cache, self._feed
        serving = self.phase is Phase.SERVING
        epoch, position = feed.position() if feed is not None and ring is not None else (-1, 0)
        if cache is not None:
            output = f"cache {cache.mode.value}"
        else:
            output = "ring" if ring is not None else ""
        pacers = self._slots.pacers() if ring is not None else set()
        jobs = []
        for job in self._jobs:
            held = self._slots.held_by(job.id) if ring is not None else []
            jobs.append(dataclasses.asdict(JobStatus(
                id=job.id, pid=job.pid, group=job.group, rank=job.rank, world=job.world, state=job.state.value,
                batch_size=job.batch_size, epoch=job.epochs_read if cache is not None else epoch,
                read=job.reads.total, images_per_s=float(job.reads.per_s(now)),
                behind=len(self._slots.unread(job.id, job.taken)) if ring is not None else 0, holds=len(held),
                paces=job.id in pacers,
                attached_s=float(now - job.attached_at))))
        return StatusReport(
            version=PROTOCOL_VERSION, name=opts.name, pid=os.getpid(), phase=self.phase.value,
            uptime_s=float(now - self._started_at), stage=str(self.pipeline_file), device=str(opts.device),
            data=str(self.data), samples=len(dataset) if dataset is not None else -1,
            classes=len(dataset.classes) if dataset is not None else -1, batch_size=opts.batch_size,
            sample=f"{list(self._sample_shape)} {self._dtype.name}" if serving else "", output=output,
            epoch=epoch, epoch_position=position, epoch_size=self._epoch_size() if serving else -1,
            epochs=opts.epochs or 0, cached=cache.store.valid_count() if cache is not None else -1,
            excluded=(len(cache.store.excluded()) if cache is not None else len(feed.excluded)) if feed else 0,
            slots=opts.slots if ring is not None else 0, slots_in_use=self._slots.in_use() if ring is not None else 0,
            decoded=self.samples_decoded, decode_per_s=float(self._decoded.per_s(now)),
            worker_restarts=self.worker_restarts, dropped_messages=self.bad_messages, jobs=jobs)

    def _epoch_size(self) -> int:
        if self._cache is not None:  # its marks also know the files a previous producer excluded
            return len(self._dataset) - len(self._cache.store.excluded())
        return self._feed.epoch_size

    def _send(self, job: Job, msg) -> bool:
        """Send to a job; a job that cannot be reached is detached (and False returned)."""
        if not self._channel.send(job.identity, msg):
            self._detach(job, "unreachable (its socket is gone or full)", lost=True)
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
        if self._waiting and now >= self._next_starting:
            self._repeat_starting(now)
        if self._ring is not None:  # with a cache nobody holds anybody back
            self._suspend_stallers(now)
        self._detach_dead()
        for job in self._jobs.to_probe(now, self.options.heartbeat_timeout):
            if self._send(job, Heartbeat(job.id)) and not job.silent:
                job.silent = True
                log.warning("job %d (pid %d) is alive but sent no heartbeat for %.0f s; "
                            "the jobs wait for it", job.id, job.pid, now - job.last_seen)

    def _repeat_starting(self, now: float) -> None:
        """Tell the jobs waiting for the start that we still start (each re-arms their attach
        timeout); forget those whose process is gone."""
        self._next_starting = now + STARTING_REPEAT_S
        for identity, hello in list(self._waiting.items()):
            if not names.pid_alive(hello.pid, None) or \
                    not self._channel.send(identity, Starting(os.getpid(), self._starting_reason())):
                del self._waiting[identity]

    def _detach_dead(self) -> None:
        if not self._jobs.dead():
            return
        # what a job sent just before it exited (its last EpochDone, its Bye) counts: take it in first
        self._handle_messages(timeout_ms=DEAD_JOB_DRAIN_MS, wake_for_stage=False)
        for job in self._jobs.dead():
            self._detach(job, "died (its process is gone)", lost=True)

    def _suspend_stallers(self, now: float) -> None:
        """Suspend the jobs that held the others back for longer than the stall timeout (while the
        producer cannot write: no free slot, or its last epoch is served). A suspended job keeps its
        keep+2 oldest slots, the only ones it can be reading (NOTE [ Slot ownership ])."""
        if self._slots.free_slot() is not None and not self._done():
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

    def _detach(self, job: Job, why: str, lost: bool = False) -> None:
        """Forget the job and free what it holds. ``lost``: it died or cannot be reached, so the other
        ranks of its group cannot go on: they are told (``GroupLost``) and detached too."""
        if not self._jobs.remove(job):
            return
        self._slots.forget(job.id)
        log.info("job %d (pid %d) %s; %d jobs left", job.id, job.pid, why, len(self._jobs))
        if lost and job.group:
            reason = f"rank {job.rank} of group {job.group!r} (pid {job.pid}) {why}"
            for mate in self._jobs.group(job.group):
                self._channel.send(mate.identity, GroupLost(reason))
                self._detach(mate, f"told that {reason}")


class _Scan:
    """The dataset scan, in a thread so the loop answers jobs meanwhile (a big folder takes a while).
    Daemonic: a producer stopped during the scan does not wait for it."""

    def __init__(self, data: Path):
        self._result: tuple[Dataset, bytes, bytes] | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(data,), name="dalishare-scan", daemon=True)
        self._thread.start()

    def _run(self, data: Path) -> None:
        try:  # the listing digest (a stat per file) keys a cache and tells ranks' datasets apart
            dataset = scan(data)
            self._result = (dataset, *listing_digests(dataset.root, dataset.files))
        except BaseException as exc:  # handed to the loop, which raises it
            self._result = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> tuple[Dataset, bytes, bytes]:
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result
