"""The producer's side of its stage processes: one worker that decodes into ring slots or cache
rows, the probes that find the files that broke it, restarts. Never runs DALI itself and never
blocks: the serve loop calls `poll()` each pass and sleeps on `links()` with its control socket. The message sequence is
NOTE [ Stage worker protocol ] in wire/stage.py.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StageError, StageFailed
from ..intervals import STAGE_REAP_S, WORKER_QUIT_S
from ..wire.stage import Failed, Fatal, Filled, MapCache, MapRing, Probe, Probed, Probing, Quit, Ready, Setup, StageLink, Task
from .options import ServeOptions
from .restarts import CrashLoop, judge

log = logging.getLogger(__name__)

STAGE_TASKS_IN_FLIGHT = 3
"""Tasks a worker holds at once: DALI decodes one while another waits its turn and a third is copied
and announced (2 measured ~3 % slower than the single-process producer, 3 as fast: bench/results)."""


class StageProcess:
    """One ``python -m dalishare.producer.worker`` child and its link. It dies with the producer."""

    def __init__(self, first: Setup | Probe):
        self.link, child_end = StageLink.pair()
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "dalishare.producer.worker", str(child_end), str(os.getpid())],
                pass_fds=[child_end], stdin=subprocess.DEVNULL)
        except BaseException:
            self.link.close()
            raise
        finally:
            os.close(child_end)
        self.pid = self.popen.pid
        self.heard = time.monotonic()  # when it last sent something (or started)
        self.link.send(first)

    def messages(self):
        """Yield what it sent; raises `EOFError` once it is gone."""
        while (msg := self.link.receive()) is not None:
            self.heard = time.monotonic()
            yield msg

    def end(self, reason: str = "", grace: float = 0.0) -> str:
        """Make sure it is gone (``Quit`` and ``grace`` s to leave, then SIGKILL); how it ended."""
        if grace and self.popen.poll() is None:
            self.link.send(Quit(reason))
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        if self.popen.poll() is None:
            self.popen.kill()
        self.link.close()
        try:
            code = self.popen.wait(STAGE_REAP_S)
        except subprocess.TimeoutExpired:  # stuck in the kernel (a GPU driver call): reaped when it returns
            log.warning("stage process pid %d does not die after SIGKILL; going on without it", self.pid)
            return "stuck after SIGKILL"
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"


class WorkerPhase(enum.Enum):
    """Where the stage worker is. STARTING -> READY (its ``Ready``); STARTING/READY -> PROBING (it
    died, failed or hung; the files of its tasks are probed) -> WAITING (until its restart time; no
    pause when files explained the failure) -> STARTING; any -> STOPPED (final)."""

    STARTING = "starting"
    READY = "ready"
    PROBING = "probing"
    WAITING = "waiting"
    STOPPED = "stopped"


@dataclass
class InFlight:
    task: Task
    indices: list[int]  # dataset indices of task.files
    plan: object        # the server's plan of the batch, handed back in `Done` / `Lost`
    careful: bool = False  # a one-file task re-made after a failure no file explained


@dataclass
class Done:
    """A task's batch is in its slot."""

    done: InFlight
    sample_shape: list
    dtype: str


@dataclass
class Lost:
    """The worker is gone with these tasks (oldest first); ``culprits`` are the files to exclude
    (dataset index -> reason), empty when no file explained the failure."""

    tasks: list[InFlight]
    culprits: dict[int, str]
    reason: str


class ProbeRun:
    """Decode ``controls`` then ``suspects`` one by one in throwaway processes. A suspect that raises,
    crashes its probe or hangs it for the stage timeout fails. A probe that dies on a file other than
    its first does not blame it: the next probe starts at that file, so only a file decoded first in
    a fresh process is blamed for a crash, and for a SIGKILL (an OOM kill, or someone else's) only
    if it happens twice. The controls are files the stage should decode (one it
    decoded before, or a few others when none is known yet): the first that decodes proves the stage
    works (``control``); if none does, the stage is at fault and the run stops before the suspects."""

    def __init__(self, stage: str, device: str, files: list[Path], suspects: list[int], controls: list[int],
                 timeout: float):
        self.stage, self.device, self.files, self.timeout = stage, device, files, timeout
        self.controls = [c for c in controls if c not in suspects] if suspects else []
        self.indices = self.controls + list(dict.fromkeys(suspects))
        self.failures: dict[int, str] = {}  # suspect's dataset index -> why it failed alone
        self.unreadable: set[int] = set()   # those of them that could not even be read
        self.control: int | None = None     # a control that decoded: the stage works
        self.position = 0   # indices[position] is the first not yet decided
        self.broken = ""    # set when the run proves nothing about the files (why)
        self.process: StageProcess | None = None
        self._first = 0     # position of the running probe's first file
        self._current: int | None = None  # position of the file it is decoding
        self._killed: set[int] = set()  # positions whose probe was SIGKILLed once (probed once more)
        self._control_failure = ""      # why a control that could be read failed to decode
        self.processes = 0

    @property
    def done(self) -> bool:
        return self.process is None and (self.position >= len(self.indices) or bool(self.broken))

    @property
    def probed(self) -> list[int]:
        """The suspects decided so far."""
        return [i for i in self.indices[len(self.controls) : self.position]]

    def poll(self, now: float) -> None:
        if self.done:
            return
        if self.process is None:
            self._first, self._current = self.position, None
            self.process = StageProcess(Probe(self.stage, self.device,
                                              [str(self.files[i]) for i in self.indices[self.position:]]))
            self.processes += 1
        try:
            for msg in self.process.messages():
                if isinstance(msg, Probing):
                    self._current = self._first + msg.index
                elif isinstance(msg, Probed):
                    self._decided(self._first + msg.index, msg.error, msg.unreadable)
                elif isinstance(msg, Fatal):
                    raise StageError(f"the stage failed in a probe process: {msg.reason}")
            if self.done or self.position >= len(self.indices):
                self._end_process()
            elif now - self.process.heard > self.timeout:
                self._end_process(f"hung the decoder for more than {self.timeout:g} s")
        except EOFError:
            self._end_process()

    def _decided(self, position: int, error: str, unreadable: bool = False) -> None:
        index = self.indices[position]
        self.position, self._current = position + 1, None
        if position < len(self.controls):
            if not error and self.control is None:
                self.control = index
            elif error and not unreadable:  # a control that cannot be read proves nothing
                self._control_failure = error
            if self.position == len(self.controls) and self.control is None and self._control_failure:
                self.broken = f"the stage failed on the file(s) it should decode ({self._control_failure})"
            return
        if error:
            self.failures[index] = error
            if unreadable:
                self.unreadable.add(index)

    def _end_process(self, hung: str = "") -> None:
        if self.process is None:
            return
        how = self.process.end()
        self.process, current = None, self._current
        if current is None:  # it ended between files
            if self.position == self._first and self.position < len(self.indices) and not self.broken:
                self.broken = f"a probe {hung or how} before it decoded any file"
        elif current == self._first and (hung or how != "killed by SIGKILL" or current in self._killed):
            self._decided(current, hung or f"crashed the decoder: {how.removeprefix('killed by ')}")
        else:  # a fresh probe starts at it, so a crash can only be its own
            if how == "killed by SIGKILL" and not hung:  # an OOM kill is its own; someone's kill is not: once more
                self._killed.add(current)
            self.position = current


@dataclass
class _Worker:
    process: StageProcess
    tasks: deque = field(default_factory=deque)  # InFlight, oldest first: sent and not answered
    failure: str = ""  # the worker's own report of why it ends (Failed)


class StageSupervisor:
    """Runs the stage in a worker process, restarts it, and says which files broke it."""

    def __init__(self, stage_file: Path, options: ServeOptions, files: list[Path]):
        self.stage, self.options, self.files = str(stage_file), options, files
        self.ring: dict = {}  # the ring's layout once it exists (new workers get it in Setup)
        self.cache: dict = {}  # the cache's ServedCache.wire() once it exists (likewise)
        self.stateful: list[str] | None = None  # the stage's random operators, once a worker said (Ready)
        self.phase = WorkerPhase.WAITING
        self.crash_loop = CrashLoop()
        self.restarts = 0    # workers started after the first
        self.cleared: set[int] = set()   # files a probe decoded alone: not probed again
        self.control: int | None = None  # a file the stage decoded (in a filled batch or a probe): probed first
        self._lost_by_kill = False  # the worker was SIGKILLed by someone else: an OOM kill, an operator
        self._worker: _Worker | None = None
        self._probes: ProbeRun | None = None
        self._lost: list[InFlight] = []   # tasks of the lost worker while its files are probed; [] once in a `Lost`
        self._lost_reason = ""
        self._restart_at = 0.0  # when the phase is WAITING: when the next worker starts
        self._events: list = []

    # -- the serve loop's side ----------------------------------------------------------------------

    def room(self) -> int:
        """How many more tasks the worker takes now."""
        if self.phase not in (WorkerPhase.STARTING, WorkerPhase.READY):
            return 0
        return STAGE_TASKS_IN_FLIGHT - len(self._worker.tasks)

    def in_flight(self) -> int:
        """Tasks sent and not handed back yet: with the worker, or lost with it and not yet in a `Lost`."""
        return (len(self._worker.tasks) if self._worker else 0) + len(self._lost)

    def plans(self) -> list:
        """The plans of the tasks in flight (with the worker, or lost with it), oldest first."""
        return [t.plan for t in (self._worker.tasks if self._worker else [])] + [t.plan for t in self._lost]

    def submit_batch(self, seq: int, slot: int, plan, careful: bool = False) -> None:
        """Send the worker task ``seq``: decode ``plan``'s samples into ring slot ``slot`` (-1: the
        first batch, measured and written nowhere). ``careful``: one file, re-made after a failure no
        file explained; if it fails the worker, that file is blamed even if it decodes alone."""
        self._send(seq, slot, plan.indices.tolist(), plan, careful, to_rows=False)

    def submit_rows(self, seq: int, rows: list[int], careful: bool = False) -> None:
        """Send the worker task ``seq``: decode samples ``rows`` into their rows of the cache
        (``careful`` as for `submit_batch`). `Done.done.plan` is ``rows``."""
        self._send(seq, -1, rows, rows, careful, to_rows=True)

    def _send(self, seq: int, slot: int, indices: list[int], plan, careful: bool, to_rows: bool) -> None:
        task = Task(seq, slot, [str(self.files[i]) for i in indices], list(indices) if to_rows else [])
        if not self._worker.tasks:
            self._worker.process.heard = time.monotonic()  # idle until now: the stage timeout starts here
        self._worker.tasks.append(InFlight(task, list(indices), plan, careful))
        self._worker.process.link.send(task)  # a worker gone meanwhile is found by poll()

    def map_ring(self, ring: dict) -> None:
        self.ring = ring
        if self._worker:
            self._worker.process.link.send(MapRing(ring))

    def map_cache(self, cache: dict) -> None:
        self.cache = cache
        if self._worker:
            self._worker.process.link.send(MapCache(cache))

    def links(self) -> list:
        """What the serve loop should wake up for."""
        running = [self._worker.process.link] if self._worker else []
        probe = self._probes.process if self._probes else None
        return running + ([probe.link] if probe else [])

    def poll(self, now: float) -> list:
        """Advance; the `Done` and `Lost` events since the last call, in order. Raises `StageError`
        for a stage that cannot work (does not import, varying shapes) and `StageFailed` when the
        crash loop gives up."""
        if self.phase == WorkerPhase.WAITING and now >= self._restart_at:
            self._start()
        if self._worker:
            self._read_worker(now)
        if self.phase == WorkerPhase.PROBING:
            self._probes.poll(now)
            if self._probes.done:
                self._after_probes()
        events, self._events = self._events, []
        return events

    def stop(self, reason: str) -> None:
        """End every stage process (``Quit`` first to the worker). Idempotent."""
        if self._worker:
            how = self._worker.process.end(reason, grace=WORKER_QUIT_S)
            log.debug("stage worker pid %d %s", self._worker.process.pid, how)
            self._worker = None
        if self._probes and self._probes.process:
            self._probes.process.end()
            self._probes.process = None
        self.phase = WorkerPhase.STOPPED

    # -- the worker ----------------------------------------------------------------------------

    def _start(self) -> None:
        opts = self.options
        process = StageProcess(Setup(self.stage, opts.device, opts.batch_size, opts.num_threads or 0, opts.seed,
                                     self.ring, self.cache))
        if self._lost_reason:  # a worker was lost before
            self.restarts += 1
            log.warning("stage worker restarted (pid %d; %d restarts so far)", process.pid, self.restarts)
        else:
            log.info("stage worker started (pid %d)", process.pid)
        self._worker, self.phase = _Worker(process), WorkerPhase.STARTING

    def _read_worker(self, now: float) -> None:
        worker = self._worker
        try:
            for msg in worker.process.messages():
                if isinstance(msg, Ready):
                    self.phase, self.stateful = WorkerPhase.READY, msg.stateful
                elif isinstance(msg, Filled):
                    self._filled(worker, msg)
                elif isinstance(msg, Failed):
                    worker.failure = msg.reason
                elif isinstance(msg, Fatal):
                    raise StageError(f"{self.stage}: {msg.reason}")
        except EOFError:
            self._worker_lost(worker.failure or "the stage worker {how}", died=not worker.failure)
            return
        busy = worker.tasks or self.phase == WorkerPhase.STARTING
        if busy and now - worker.process.heard > self.options.stage_timeout:
            self._worker_lost(f"the stage worker sent nothing for {self.options.stage_timeout:g} s (hung; {{how}})")

    def _filled(self, worker: _Worker, msg: Filled) -> None:
        head = worker.tasks.popleft()
        if head.task.seq != msg.seq:  # one worker answers in order; several would need a lookup here
            raise StageError(f"the stage worker answered task {msg.seq} before {head.task.seq}")
        self.crash_loop.succeeded()
        self.control = head.indices[0] if head.indices else self.control
        self._events.append(Done(head, msg.sample_shape, msg.dtype))

    def _worker_lost(self, reason: str, died: bool = False) -> None:
        """``reason`` may say ``{how}`` it ended; ``died``: it ended by itself (no report, no hang)."""
        worker, self._worker = self._worker, None
        how = worker.process.end()
        self._lost, self._lost_reason = list(worker.tasks), reason.replace("{how}", how)
        self._lost_by_kill = died and how == "killed by SIGKILL"
        log.warning("stage worker pid %d lost with %d batches in flight: %s", worker.process.pid,
                    len(self._lost), self._lost_reason)
        lost = {i for t in self._lost for i in t.indices}
        suspects = [i for t in self._lost for i in t.indices if i not in self.cleared]
        self._probes = ProbeRun(self.stage, self.options.device, self.files, suspects,
                                self._controls(lost), self.options.stage_timeout)
        self.phase = WorkerPhase.PROBING

    def _controls(self, lost: set[int], count: int = 3) -> list[int]:
        """Files to probe first, to tell a broken stage from bad files: the last one the stage
        decoded, else a few spread over the dataset outside the lost batches."""
        if self.control is not None and self.control not in lost:
            return [self.control]
        stride = max(1, len(self.files) // (4 * count))
        spread = [i for i in range(0, len(self.files), stride) if i not in lost]
        return list(dict.fromkeys([i for i in self.cleared if i not in lost][:count] + spread[:count]))

    def _after_probes(self) -> None:
        run, self._probes = self._probes, None
        culprits = {} if run.broken else judge(run.probed, run.failures, run.control is not None, run.unreadable)
        self.cleared.update(i for i in run.probed if i not in run.failures)
        if run.control is not None:
            self.control = run.control
        if not run.broken and not self._lost_by_kill:  # a careful task's file failed the worker alone
            for lost in self._lost:
                if lost.careful and lost.indices[0] not in culprits:
                    culprits[lost.indices[0]] = f"{self._lost_reason} (in a batch of its own; it decodes in a fresh process)"
        if run.indices:
            log.info("probed %d files in %d processes: %d to exclude%s", len(run.probed), run.processes,
                     len(culprits), f" ({run.broken})" if run.broken else "")
        self._events.append(Lost(self._lost, culprits, self._lost_reason))
        self._lost = []
        pause = self.crash_loop.failed(explained=bool(culprits))
        if pause is None:
            self.phase = WorkerPhase.STOPPED
            raise StageFailed(
                f"the stage worker failed {self.crash_loop.in_a_row} times in a row and no file explains it; "
                f"last: {run.broken or self._lost_reason}. Check the stage ({self.stage}), the device "
                f"({self.options.device}) and free memory")
        if pause:
            log.warning("no file explains the failure; restarting the stage worker in %.1f s", pause)
        self._restart_at, self.phase = time.monotonic() + pause, WorkerPhase.WAITING
