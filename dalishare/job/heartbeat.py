"""A job's heartbeat: tells the producer the job is alive, even while its training thread is busy.
NOTE [ Control protocol ] (wire/messages.py) says what a heartbeat carries and what the producer does."""

from __future__ import annotations

import threading
from typing import Callable

from ..intervals import HEARTBEAT_JOIN_S
from ..wire.channel import JobChannel
from ..wire.messages import Heartbeat



class HeartbeatThread(threading.Thread):
    """Sends ``Heartbeat`` every ``interval`` seconds on its own ``channel`` (ZeroMQ sockets are not
    thread-safe), which it closes when stopped."""

    def __init__(self, channel: JobChannel, job_id: int, interval: float, taken: Callable[[], int],
                 read: Callable[[], int]):
        super().__init__(name=f"dalishare-heartbeat-{job_id}", daemon=True)
        self._channel, self._job_id, self._interval = channel, job_id, interval
        self._taken = taken  # the newest batch the job has begun to read (messages.Heartbeat)
        self._read = read    # samples the job has read (messages.Heartbeat)
        self._stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self._stopped.wait(self._interval):
                self._channel.send(Heartbeat(self._job_id, self._taken(), self._read()))  # a gone producer: the job notices
        finally:
            self._channel.close(linger_ms=0)

    def stop(self) -> None:
        self._stopped.set()
        if self.ident is None:  # never started: its channel is still ours to close
            self._channel.close(linger_ms=0)
            return
        self.join(timeout=HEARTBEAT_JOIN_S)
