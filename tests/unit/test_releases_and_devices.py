"""The GPU path's logic that needs no GPU: release ordering with events, the device ring's wire form,
and the one-line errors where no GPU is visible. The GPU itself is exercised by test_gpu.py."""

from __future__ import annotations

import threading
import time

import pytest

from dalishare.wire import messages as protocol
from helpers import gpu_count
from dalishare.errors import ConfigError, ProtocolError
from dalishare.errors import GpuWorkTimeout
from dalishare.job.releases import SlotReleases
from dalishare.shm import RingLayout, attach_ring
from dalishare.producer.stage import parse_device


class FakeEvent:
    """Stands in for a CUDA event: completes when the test says so."""

    def __init__(self):
        self.done = False

    def query(self) -> bool:
        return self.done


def releases_with_fake_events():
    released, events = [], []

    def record():
        events.append(FakeEvent())
        return events[-1]

    return SlotReleases(released.append, device="cuda:0", record=record), released, events


def test_host_ring_slots_are_released_at_once():
    released = []
    releases = SlotReleases(released.append, device=None)
    releases.done_reading(3)
    releases.done_reading(4)
    assert released == [3, 4] and releases.in_flight == 0


def test_device_ring_slots_are_released_only_after_their_gpu_work_in_order():
    releases, released, events = releases_with_fake_events()
    releases.done_reading(1)
    releases.done_reading(2)
    assert released == [] and releases.in_flight == 2
    events[1].done = True  # a later event cannot overtake: the stream completes work in order
    releases.poll()
    assert released == []
    events[0].done = True
    releases.poll()
    assert released == [1, 2] and releases.in_flight == 0


def test_reading_a_third_slot_waits_for_the_gpu_to_finish_the_oldest():
    releases, released, events = releases_with_fake_events()
    releases.done_reading(1)
    releases.wait_below(2, timeout=1)  # one in flight: no wait
    releases.done_reading(2)
    timer = threading.Timer(0.3, lambda: setattr(events[0], "done", True))
    timer.start()
    start = time.monotonic()
    releases.wait_below(2, timeout=5)
    assert 0.25 < time.monotonic() - start < 3
    assert released == [1] and releases.in_flight == 1
    timer.join()


def test_gpu_work_that_never_finishes_is_a_clear_error_not_a_hang():
    releases, released, _ = releases_with_fake_events()
    releases.done_reading(1)
    with pytest.raises(GpuWorkTimeout, match="has not finished after 0 s"):
        releases.wait_below(1, timeout=0.2)
    releases.forget()
    assert releases.in_flight == 0 and released == []


def test_a_device_ring_layout_survives_the_wire_and_a_malformed_one_is_a_protocol_error():
    layout = RingLayout("device", "dalishare.t.1", 4, 1024, gpu="0000:19:00.0", handle=bytes(range(64)))
    welcome = protocol.Welcome(job_id=1, producer_pid=2, ring=layout.to_wire(), cache={}, sample_shape=[2, 2, 3],
                               dtype="uint8", epoch_size=30, batch_size=8, classes=["a"], seed=0, epochs=0, shard=[0, 1],
                               fingerprint={})
    assert RingLayout.from_wire(protocol.decode(protocol.encode(welcome)).ring) == layout
    assert RingLayout.from_wire({"kind": "host", "segment": "s", "slots": 2, "slot_bytes": 8}).handle == b""
    with pytest.raises(ProtocolError, match="malformed ring layout"):
        RingLayout.from_wire({"kind": "device", "slots": 2})
    with pytest.raises(ProtocolError, match="64-byte IPC handle"):
        RingLayout.from_wire({**layout.to_wire(), "handle": b"short"})
    with pytest.raises(ProtocolError, match="cannot map"):
        attach_ring(RingLayout("tape", "s", 1, 8))


@pytest.mark.skipif(gpu_count(torch_too=False) > 0, reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["gpu", "gpu:0", "gpu:3"])
def test_without_a_gpu_gpu_devices_fail_in_one_line(device):
    with pytest.raises(ConfigError) as info:
        parse_device(device)
    assert "\n" not in str(info.value) and ("CuPy" in str(info.value) or "--device cpu" in str(info.value))


@pytest.mark.parametrize("device", ["tpu", "gpu:", "gpu:x", "cuda"])
def test_unknown_devices_are_refused(device):
    with pytest.raises(ConfigError, match="use 'cpu', 'gpu' or 'gpu:K'"):
        parse_device(device)


@pytest.mark.skipif(gpu_count(torch_too=False) > 0, reason="this machine has a GPU")
def test_without_a_gpu_a_job_cannot_open_a_device_ring_and_says_why():
    pytest.importorskip("cupy")
    layout = RingLayout("device", "dalishare.none.1", 2, 512, gpu="0000:19:00.0", handle=bytes(64))
    with pytest.raises(ConfigError, match="run the job where that GPU is visible"):
        attach_ring(layout)


def test_a_heartbeat_thread_stopped_before_it_started_closes_its_channel(tmp_path):
    from dalishare.job.heartbeat import HeartbeatThread
    from dalishare.wire.channel import JobChannel

    main = JobChannel(f"ipc://{tmp_path}/nobody.sock")
    beat = HeartbeatThread(main.sibling(f"ipc://{tmp_path}/nobody.sock"), job_id=1, interval=1.0, taken=lambda: -1,
                            read=lambda: 0)
    beat.stop()  # never started: must not raise, and must leave the context free to terminate
    done = threading.Event()
    closer = threading.Thread(target=lambda: (main.close(), done.set()), daemon=True)
    closer.start()
    assert done.wait(5), "the ZeroMQ context hangs on a socket the heartbeat never closed"
