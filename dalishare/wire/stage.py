"""Messages between a producer and its stage processes (the worker that decodes, the probes that
test single files), and the `StageLink` that carries them.

The link is one end of a Unix socket pair, framed by `multiprocessing.connection.Connection`
(length-prefixed, any size); each frame is one msgpack map checked as strictly as the control
messages (messages.py). Never pickle.

NOTE [ Stage worker protocol ]
==============================
Cited from the producer's supervisor (producer/supervisor.py) and the stage processes
(producer/worker.py). The producer never runs DALI; a worker's crash ends only the worker.

- Start. Producer: spawns ``python -m dalishare.producer.worker FD`` with one end of a socket pair
  and sends ``Setup`` (stage file, device, batch size, threads, seed; the ring or the cache, once it
  exists). Worker: dies with the producer (PR_SET_PDEATHSIG), ignores SIGINT (the producer stops
  it), imports the stage and builds its pipeline, answers ``Ready(pid, stateful)`` (the stage's
  random operators: such a stage is not cached); a stage that does not import or build answers
  ``Fatal(reason)`` and exits.
- Tasks. Producer: ``Task(seq, slot, files)``, at most STAGE_TASKS_IN_FLIGHT unanswered per worker;
  slot -1 asks only for the batch's shape (the first batch sizes the ring, which the producer then
  creates and sends in ``MapRing``, or the cache, sent in ``MapCache``). Before sending a task it
  marks the slot's header -1 (being written). Worker: decodes tasks in the order received, copies
  each batch into its slot, or each sample into its cache row when the task has ``rows`` (the copy
  has finished, also on a GPU, when it answers) and answers ``Filled(seq, slot, shape, dtype)``.
  Producer: marks the header with the seq and announces the slot to the jobs, or marks the rows
  valid (NOTE [ Cache protocol ] in producer/filling.py).
- Bad data. Worker: DALI's exception on a task becomes ``Failed(seq, reason)``, then the worker exits
  (a pipeline that failed is not reused: the native state that broke may be corrupt). A batch of
  another shape than the ring's is ``Fatal``.
- Death. The producer notices a worker gone (its socket reads EOF: any signal, exit, OOM kill) or
  silent with tasks outstanding for ``--stage-timeout`` (then it kills it) within one loop pass. It
  frees the slots of the tasks in flight and has their files probed: probe processes (the same
  module) get ``Probe(stage, device, files)`` and answer ``Probing(i)`` before file i and
  ``Probed(i, error)`` after it. A probe that dies or hangs blames the file it was on, if that was
  its first (else a fresh probe starts at that file, so an earlier file cannot be blamed wrongly).
  Control files go first (one the stage decoded before, else a few from elsewhere in the dataset):
  if none decodes, the stage is at fault, not the files. Then the producer excludes the culprits,
  rewinds its feed to the oldest lost task and starts a fresh worker (after a backoff when no file
  explained the failure: producer/restarts.py). After such a failure it makes the lost batches
  again one file per task, one task at a time (files that fail only together then pass); a careful
  task that still fails the worker blames its file, unless the worker was SIGKILLed from outside.
- Sizes. A task's files travel in the message (``LINK_BUFFER_BYTES`` of socket buffer, so a send
  does not wait for a busy worker); the stage timeout of a worker starts when it gets work after
  being idle.
- Stop. Producer: ``Quit``, waits WORKER_QUIT_S for the exit, then SIGKILL; always before it frees
  the ring (a worker may be writing to it).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from multiprocessing.connection import Connection

from .messages import check_fields, encode, parse


@dataclass(frozen=True)
class Setup:
    stage: str          # path of the stage file
    device: str         # "cpu", "gpu" or "gpu:K"
    batch_size: int
    num_threads: int    # 0: all cores
    seed: int
    ring: dict          # RingLayout.to_wire(), or {} before the ring exists (or with a cache)
    cache: dict         # ServedCache.wire(), or {} (no cache, or before it exists)


@dataclass(frozen=True)
class MapRing:
    """The ring now exists: write into it from now on."""

    ring: dict


@dataclass(frozen=True)
class MapCache:
    """The cache now exists: tasks with rows write into it."""

    cache: dict


@dataclass(frozen=True)
class Task:
    seq: int
    slot: int           # ring slot to write; -1: write no slot (only rows, if any; or only report the shape)
    files: list         # paths, in batch order
    rows: list          # cache rows (sample indices) to write, one per file; [] for none


@dataclass(frozen=True)
class Quit:
    reason: str


@dataclass(frozen=True)
class Ready:
    pid: int
    stateful: list      # the stage's operators whose output changes from run to run (`stage.stateful_ops`)


@dataclass(frozen=True)
class Filled:
    seq: int
    slot: int
    sample_shape: list
    dtype: str          # numpy dtype name


@dataclass(frozen=True)
class Failed:
    """DALI raised on task ``seq``; the worker exits after sending this."""

    seq: int
    reason: str


@dataclass(frozen=True)
class Fatal:
    """The stage itself is wrong (does not import, varying shapes): no restart can help."""

    reason: str


@dataclass(frozen=True)
class Probe:
    stage: str
    device: str
    files: list


@dataclass(frozen=True)
class Probing:
    index: int          # into Probe.files: about to decode it


@dataclass(frozen=True)
class Probed:
    index: int
    error: str          # "" if it decoded
    unreadable: bool    # the error came from reading the file (gone, empty), before the stage ran


SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # Linux's value; Python does not name it
LINK_BUFFER_BYTES = 4 << 20  # a Task of ~40,000 paths; without root the kernel may cap it (wmem_max)

STAGE_MESSAGES = {cls.__name__.lower(): cls for cls in
                  (Setup, MapRing, MapCache, Task, Quit, Ready, Filled, Failed, Fatal, Probe, Probing, Probed)}


class StageLink:
    """One end of the producer <-> stage process socket pair. ``send`` never raises (a gone peer is
    found by ``receive``); ``receive`` raises `EOFError` once the peer is gone."""

    def __init__(self, fd: int):
        self._conn = Connection(fd)

    @classmethod
    def pair(cls) -> tuple["StageLink", int]:
        """The producer's end, and the fd of the other end for the child (close it after the spawn)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (mine, theirs):  # room for a whole task or probe list, so a send does not wait for the reader
            try:
                end.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, LINK_BUFFER_BYTES)  # root may exceed wmem_max
            except OSError:
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LINK_BUFFER_BYTES)
        return cls(mine.detach()), theirs.detach()

    def fileno(self) -> int:
        return self._conn.fileno()

    def send(self, msg) -> bool:
        try:
            self._conn.send_bytes(encode(msg))
            return True
        except OSError:
            return False

    def receive(self, timeout: float = 0.0):
        """The next message, or None if none came within ``timeout`` seconds."""
        try:
            if not self._conn.poll(timeout):
                return None
            data = self._conn.recv_bytes()
        except OSError as exc:  # reset: the peer died with data we sent unread
            raise EOFError(str(exc)) from None
        body, cls = parse(data, STAGE_MESSAGES)
        check_fields(cls, body)
        return cls(**body)

    def close(self) -> None:
        self._conn.close()


__all__ = ["STAGE_MESSAGES", "StageLink"] + [c.__name__ for c in STAGE_MESSAGES.values()]
