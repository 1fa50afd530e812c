"""The stage processes: ``python -m dalishare.producer.worker FD PARENT_PID``.

The producer starts one as its stage worker (first message ``Setup``: decode tasks into ring slots)
and others as throwaway probes (first message ``Probe``: decode files one by one and say which
fail). Both run DALI, so both may crash; neither owns anything the producer or a job needs. The
message sequence is NOTE [ Stage worker protocol ] in wire/stage.py.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import sys
from collections import deque

import numpy as np

from ..errors import ConfigError, StageError
from ..intervals import STAGE_IDLE_POLL_S, STAGE_SETUP_WAIT_S
from ..shm import RingLayout, open_cache_writer, open_writer
from ..wire.stage import (Failed, Fatal, Filled, MapCache, MapRing, Probe, Probed, Probing, Quit, Ready, Setup,
                          StageLink, Task)
from .stage import StageBatch, build_fed_pipeline, build_pipeline, load_stage, one_line, read_encoded, stateful_ops

PR_SET_PDEATHSIG = 1


def die_with(parent_pid: int) -> None:
    """Be SIGKILLed when the producer dies, however it dies (a killed producer runs no teardown)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the prctl
        os._exit(1)


def serve_tasks(link: StageLink, setup: Setup) -> None:
    """The worker: decode each `Task` into its slot or its cache rows, in order, with up to the
    producer's tasks in flight scheduled in DALI at once (so decoding one overlaps the copy and answer
    of another)."""
    try:
        stage = load_stage(setup.stage)
        pipe = build_fed_pipeline(stage, batch_size=setup.batch_size, device=setup.device,
                                  num_threads=setup.num_threads or None, seed=setup.seed)
    except StageError as exc:  # the stage file does not import or defines no stage
        link.send(Fatal(str(exc)))
        return
    except Exception as exc:  # its graph does not build
        link.send(Fatal(f"the stage's pipeline does not build: {one_line(exc)}"))
        return
    try:
        writer = open_writer(RingLayout.from_wire(setup.ring)) if setup.ring else None
        rows = open_cache_writer(setup.cache) if setup.cache else None
    except Exception as exc:  # the segment is gone, or the GPU cannot open the IPC handle
        link.send(Failed(-1, f"cannot map the ring or the cache: {one_line(exc)}"))
        return
    try:
        stateful = stateful_ops(pipe)
    except Exception as exc:  # it reads DALI internals: if they change, take the stage as not deterministic
        stateful = [f"(its operators cannot be listed: {one_line(exc)})"]
    link.send(Ready(os.getpid(), stateful))
    scheduled: deque[Task] = deque()  # fed to DALI, output not taken yet; in the order received
    while True:
        msg = link.receive(timeout=0 if scheduled else STAGE_IDLE_POLL_S)  # EOFError: the producer is gone
        while msg is not None:
            if isinstance(msg, Quit):
                return
            if isinstance(msg, (MapRing, MapCache)):
                try:
                    if isinstance(msg, MapRing):
                        writer = open_writer(RingLayout.from_wire(msg.ring))
                    else:
                        rows = open_cache_writer(msg.cache)
                except Exception as exc:
                    link.send(Failed(-1, f"cannot map the ring or the cache: {one_line(exc)}"))
                    return
            elif isinstance(msg, Task):
                try:
                    pipe.feed_input("encoded", read_encoded(msg.files))
                    pipe.schedule_run()
                except Exception as exc:  # a file that cannot be read; DALI is not reused after an error
                    link.send(Failed(msg.seq, one_line(exc)))
                    return
                scheduled.append(msg)
            msg = link.receive(timeout=0)
        if scheduled and not _fill(link, pipe, writer, rows, scheduled.popleft()):
            return


def _fill(link: StageLink, pipe, writer, rows, task: Task) -> bool:
    """Take the oldest output, write it to the task's slot or cache rows, answer; False if the worker
    must end."""
    try:
        (out,) = pipe.outputs()
    except Exception as exc:  # DALI: a file it cannot decode
        link.send(Failed(task.seq, one_line(exc)))
        return False
    try:
        batch = StageBatch.of(out)
        if task.slot >= 0:
            writer.write(task.slot, batch)
        if task.rows:
            rows.write(task.rows, batch)
    except (ConfigError, ValueError) as exc:  # varying shapes, or a batch bigger than the ring's slots
        link.send(Fatal(str(exc)))
        return False
    except Exception as exc:  # the copy failed (a CUDA error): this worker is done
        link.send(Failed(task.seq, f"writing slot {task.slot} or its cache rows failed: {one_line(exc)}"))
        return False
    pipe.release_outputs()
    return link.send(Filled(task.seq, task.slot, list(batch.sample_shape), batch.dtype.name))


def probe_files(link: StageLink, probe: Probe) -> None:
    """The probe: run the stage on each file alone and say which fail. After a failure the pipeline
    is rebuilt; a crash ends the process, and the producer goes on with a fresh probe."""
    try:
        stage = load_stage(probe.stage)
    except StageError as exc:
        link.send(Fatal(str(exc)))
        return
    current: list[np.ndarray] = []
    pipe = None
    for index, path in enumerate(probe.files):
        link.send(Probing(index))
        try:
            current[:] = read_encoded([path])
            if not current[0].size:
                raise ValueError("empty file")
        except Exception as exc:
            link.send(Probed(index, one_line(exc), unreadable=True))
            continue
        error = ""
        try:
            if pipe is None:
                pipe = build_pipeline(stage, lambda: list(current), batch_size=1, device=probe.device,
                                      num_threads=1, prefetch=1, exec_async=False, exec_pipelined=False)
            pipe.run()
        except Exception as exc:  # DALI reports decoding errors as RuntimeError
            error, pipe = one_line(exc), None
        link.send(Probed(index, error, unreadable=False))


def main(argv: list[str]) -> int:
    fd, parent_pid = int(argv[0]), int(argv[1])
    die_with(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the producer stops us
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dalishare-stage %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    link = StageLink(fd)
    try:
        first = link.receive(timeout=STAGE_SETUP_WAIT_S)
        if isinstance(first, Setup):
            faulthandler.enable()  # a native crash prints where it happened to the producer's log
            serve_tasks(link, first)
        elif isinstance(first, Probe):
            probe_files(link, first)
    except EOFError:
        pass  # the producer closed the link: it is stopping or gone
    finally:
        link.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
