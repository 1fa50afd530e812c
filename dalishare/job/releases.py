"""When a job may give a slot back: at once for host memory, after its GPU work for device memory.

A job's GPU work is asynchronous: when the training loop asks for the next batch, kernels queued in
earlier steps may still be reading a slot. So for a ring in GPU memory each slot the job is done
with (by the keep rule, keep.py: no view of it in use any more) gets a CUDA event recorded on the
job's current stream, and the slot is released only once that event has completed. Events are
polled (``query``), never waited on, except when the job would otherwise read a new slot while two
released slots still have GPU reads in flight: the rules of NOTE [ Slot ownership ] in shm/__init__.py let a
job read only its keep+2 oldest held slots, so the training thread then waits (bounded) until its
GPU has caught up.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

import torch

from ..errors import GpuWorkTimeout
from ..intervals import GPU_WAIT_POLL_S



class SlotReleases:
    """Releases slots (``release(seq)``) once the work that read them is done.

    ``device`` is the CUDA device whose current stream reads the ring, or None for a host ring.
    ``record`` makes the event (injectable so the logic is testable without a GPU).
    """

    def __init__(self, release: Callable[[int], None], device: torch.device | None,
                 record: Callable[[], object] | None = None):
        self._release, self._device = release, device
        self._record = record or self._record_on_current_stream
        self._in_flight: deque[tuple[int, object]] = deque()  # (seq, event), oldest first

    def done_reading(self, seq: int) -> None:
        """The job has queued all its reads of the slot holding ``seq``."""
        if self._device is None:
            self._release(seq)
        else:
            self._in_flight.append((seq, self._record()))
            self.poll()

    def poll(self) -> None:
        """Release, in order, the slots whose GPU reads have finished."""
        while self._in_flight and self._in_flight[0][1].query():
            self._release(self._in_flight.popleft()[0])

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def wait_below(self, limit: int, timeout: float) -> None:
        """Poll until fewer than ``limit`` slots have GPU reads in flight; `GpuWorkTimeout` after ``timeout`` s."""
        self.poll()
        deadline = time.monotonic() + timeout
        while len(self._in_flight) >= limit:
            if time.monotonic() > deadline:
                raise GpuWorkTimeout(
                    f"this job's GPU work reading ring slots has not finished after {timeout:.0f} s "
                    f"({len(self._in_flight)} slots in flight on {self._device}); is a kernel hung?")
            time.sleep(GPU_WAIT_POLL_S)
            self.poll()

    def forget(self) -> None:
        """Drop what is in flight without releasing it (the producer is gone)."""
        self._in_flight.clear()

    def _record_on_current_stream(self):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self._device))
        return event
