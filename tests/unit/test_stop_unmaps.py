"""A job told to stop drops its mappings of the producer's GPU memory once its GPU reads are done,
and says Bye so the producer may free it (NOTE [ Producer shutdown ] in producer/server.py)."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from dalishare.job.keep import KeepWindow
from dalishare.job.session import Counters, Session
from dalishare.wire.messages import Bye, Stop


class Recorder:
    """The session's channel, releases and reader, writing what happens to one list, in order."""

    def __init__(self, unmapped: bool):
        self.events, self.unmapped = [], unmapped

    def send(self, msg) -> None:
        self.events.append(type(msg).__name__)
        self.sent = msg

    def done_reading(self, seq: int) -> None:
        self.events.append(f"given back {seq}")

    def wait_below(self, limit: int, timeout: float) -> None:
        self.events.append("GPU reads done")

    def unmap_device_memory(self) -> bool:
        self.events.append("unmapped" if self.unmapped else "still mapped by a view")
        return self.unmapped


def stopping_session(data_device: str, unmapped: bool = True) -> tuple[Session, Recorder]:
    session = Session.__new__(Session)  # attached, as far as a Stop is concerned
    recorder = Recorder(unmapped)
    session.name, session.job_id, session.counters, session.pending = "t", 3, Counters(), deque()
    session.window = KeepWindow(2)
    session.window.consumed(5)
    session.channel = session.releases = session.reader = recorder
    session.data_device, session._batch_timeout, session.said_bye, session.failure = torch.device(data_device), 1.0, False, None
    return session, recorder


@pytest.mark.parametrize("stop", [Stop.stopped("SIGTERM"), Stop.finished("finished 1 epochs"), Stop.failed("boom")])
def test_a_gpu_job_told_to_stop_waits_for_its_gpu_then_unmaps_then_says_bye(stop):
    session, recorder = stopping_session("cuda:0")
    session._on_stop(stop)
    assert recorder.events == ["given back 5", "GPU reads done", "unmapped", "Bye"]
    assert session.said_bye and isinstance(recorder.sent, Bye) and not recorder.sent.failed


def test_a_view_the_user_still_holds_keeps_the_mapping_and_the_bye_waits_for_close():
    session, recorder = stopping_session("cuda:0", unmapped=False)
    session._on_stop(Stop.stopped("SIGTERM"))
    assert recorder.events[-1] == "still mapped by a view" and not session.said_bye


def test_a_job_of_host_memory_keeps_reading_what_it_holds_after_a_stop():
    session, recorder = stopping_session("cpu")
    session._on_stop(Stop.finished("finished 1 epochs"))
    assert recorder.events == [] and session.stop_reason == "finished 1 epochs"
