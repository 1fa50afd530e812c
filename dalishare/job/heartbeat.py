"""A job's heartbeat: tells the producer the job is alive, even while its training thread is busy."""

from __future__ import annotations

import threading
from typing import Callable

import zmq

from ..wire import messages as protocol
from ..wire.messages import Heartbeat


class HeartbeatThread(threading.Thread):
    """Tells the producer this job is alive, even while the training thread is busy elsewhere."""

    def __init__(self, ctx: zmq.Context, endpoint: str, job_id: int, interval: float, taken: Callable[[], int]):
        super().__init__(name=f"dalishare-heartbeat-{job_id}", daemon=True)
        self._ctx, self._endpoint, self._job_id, self._interval = ctx, endpoint, job_id, interval
        self._taken = taken  # the newest batch the job has begun to read (protocol.Heartbeat)
        self._stopped = threading.Event()

    def run(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self._endpoint)
        try:
            while not self._stopped.wait(self._interval):
                try:
                    sock.send(protocol.encode(Heartbeat(self._job_id, self._taken())), zmq.NOBLOCK)
                except zmq.Again:
                    pass  # producer busy or gone: the training thread notices a gone producer
        finally:
            sock.close()

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=5)
