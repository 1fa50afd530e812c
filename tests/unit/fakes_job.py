"""Fakes for the job side's unit tests: a session that replays a scripted producer, a ring of plain
NumPy slots, a cache of plain arrays. No DALI, no sockets, no shared memory, no subprocess.

Sample ``i`` has every pixel equal to ``i % 256`` and label ``i % 3``, so a test reads back which
sample a batch holds from its pixels as well as from its indices.
"""

from __future__ import annotations

import math
import time
from collections import deque
from types import SimpleNamespace

import numpy as np
import torch

from dalishare.job.keep import KeepWindow
from dalishare.job.session import Counters
from dalishare.shm.cache import Mark
from dalishare.wire.messages import Batch

SHAPE = (2, 2, 1)  # a sample: 4 bytes
SAMPLE_BYTES = math.prod(SHAPE)


def pixels(indices) -> np.ndarray:
    return np.repeat(np.asarray(indices, dtype=np.int64) % 256, SAMPLE_BYTES).astype(np.uint8)


class FakeSession:
    """What a reader uses of a `Session`. ``stream``: the announcements the producer sends, in
    order; once they are all taken the producer says it stopped (``stop_reason``)."""

    name, job_id, producer_pid = "t", 7, 4242

    def __init__(self, *, batch_size: int = 4, epoch_size: int = 10, shard=(0, 1), seed: int = 0, epochs: int = 0,
                 keep: int = 2, stream=()):
        self.producer_batch_size, self.samples_per_epoch = batch_size, epoch_size
        self.sample_shape, self.dtype = SHAPE, torch.uint8
        self.shard, self.producer_seed, self.producer_epochs = tuple(shard), seed, epochs
        self.window, self.counters = KeepWindow(keep), Counters()
        self.pending, self.stream = deque(), deque(stream)
        self.taken, self.read = -1, 0
        self.stop_reason, self.failure, self.lost = None, None, None
        self.releases = SimpleNamespace(wait_below=lambda limit, timeout: None)
        self.released: list[int] = []   # seqs given back, in order
        self.epochs_done: list[int] = []  # EpochDone counts sent
        self.heartbeats = self.polls = self.suspension_waits = 0
        self.on_poll = None  # called at each poll_producer: a test fills or stops the cache there
        self.on_announce = None  # called with each announcement as it is sent: the ring is written then

    ended = property(lambda self: self.stop_reason is not None or bool(self.failure))

    def receive_all(self) -> None:
        pass

    def wait_for_batch(self, batch_timeout: float, reconnect: bool) -> None:
        if not self.pending and self.stop_reason is None:
            if self.stream:
                self.pending.append(self.stream.popleft())
                if self.on_announce is not None:
                    self.on_announce(self.pending[-1])
            else:
                self.stop_reason = "stopped by the test"

    def give_back(self) -> None:
        self.released += self.window.releasable()

    def heartbeat_now(self) -> None:
        self.heartbeats += 1

    def await_suspension(self, batch_timeout: float) -> None:
        self.suspension_waits += 1

    def poll_producer(self, reconnect: bool) -> bool:
        self.polls += 1
        if self.on_poll is not None:
            self.on_poll()
        return self.stop_reason is None

    def epoch_done(self, epochs: int) -> None:
        self.epochs_done.append(epochs)


class FakeRing:
    """A host ring as a job maps it: slots of plain NumPy memory and the seq each holds."""

    device = None

    def __init__(self, slots: int = 16, slot_samples: int = 8):
        self.layout = SimpleNamespace(slots=slots)
        self.memory = [np.zeros(slot_samples * SAMPLE_BYTES, dtype=np.uint8) for _ in range(slots)]
        self.seqs = [-1] * slots
        self.overwritten: set[int] = set()
        self.closed = False

    def slot(self, k: int) -> memoryview:
        return memoryview(self.memory[k])

    def lease(self, k: int, offset: int, nbytes: int):
        array = self.memory[k][offset : offset + nbytes]  # a new array object: the lease lives with its views
        return array, array

    def holds(self, k: int, seq: int) -> bool:
        return self.seqs[k] == seq

    def write(self, msg: Batch) -> None:
        """The producer fills slot ``msg.slot`` with ``msg``'s samples (then announces it); a seq in
        ``overwritten`` is rewritten at once, as a suspension would let the producer do."""
        self.memory[msg.slot][: msg.count * SAMPLE_BYTES] = pixels(np.frombuffer(msg.indices, dtype="<i8"))
        self.seqs[msg.slot] = -2 if msg.seq in self.overwritten else msg.seq

    def close(self) -> None:
        self.closed = True

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a view of this ring's memory (not a copy)."""
        pointer = tensor.data_ptr()
        return any(m.ctypes.data <= pointer < m.ctypes.data + m.nbytes for m in self.memory)


def epoch_stream(ring: "FakeRing", epoch: int, samples: list[int], producer_batch: int, seq: int = 0,
                 padded: list[int] | None = None) -> list[Batch]:
    """The producer's announcements of one epoch whose order is ``samples``, batch ``seq`` in slot
    ``seq % slots`` of ``ring``; the fake session writes each into its slot as it announces it."""
    out = []
    for start in range(0, len(samples), producer_batch):
        part = samples[start : start + producer_batch]
        flags = b"" if padded is None else bytes(padded[start : start + len(part)])
        out.append(Batch(seq=seq, slot=seq % ring.layout.slots, epoch=epoch, start=start, count=len(part),
                         last=start + producer_batch >= len(samples), epoch_size=len(samples), excluded=0,
                         labels=(np.asarray(part) % 3).astype("<i8").tobytes(),
                         indices=np.asarray(part).astype("<i8").tobytes(), sent_ns=time.monotonic_ns(),
                         padded=flags))
        seq += 1
    return out


class FakeCache:
    """A producer's cache as a job maps it: marks, labels and rows in plain arrays."""

    device = torch.device("cpu")

    def __init__(self, samples: int, marks=None):
        self.layout = SimpleNamespace(samples=samples)
        self.marks = np.full(samples, Mark.VALID, dtype=np.uint8) if marks is None else np.asarray(marks, np.uint8)
        self.labels = (np.arange(samples) % 3).astype(np.int64)
        self.rows = pixels(np.arange(samples)).reshape(samples, SAMPLE_BYTES)
        self.gathered: list[list[int]] = []
        self.closed = False

    def excluded(self) -> int:
        return int(np.count_nonzero(self.marks == Mark.EXCLUDED))

    def valid(self) -> int:
        return int(np.count_nonzero(self.marks == Mark.VALID))

    def gather(self, indices, shape, dtype, target) -> torch.Tensor:
        assert (self.marks[indices] == Mark.VALID).all(), "gathered a sample that is not cached"
        self.gathered.append(list(indices))
        return torch.from_numpy(self.rows[indices].reshape(len(indices), *shape).copy())

    def close(self) -> None:
        self.closed = True


def samples_of(batch: dict) -> list[int]:
    """The sample each image of ``batch`` holds, read from its pixels."""
    return batch["images"].reshape(len(batch["images"]), -1)[:, 0].tolist()
