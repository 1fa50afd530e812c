"""The GPU path's device calls, over a recording fake of CuPy: no process gets a CUDA context on a GPU
other than the ring's (NOTE [ One GPU per process ] in shm/device.py), a job's own current context is
put back exactly, and the attach-time errors where CUDA IPC cannot work. Runs without a GPU; the same
rules on a real GPU are tests/gpu/test_gpu.py's."""

from __future__ import annotations

import ast
import gc
import sys
import types
from pathlib import Path

import pytest

from dalishare.errors import ConfigError
from dalishare.shm import RingKind, RingLayout, device, names

PACKAGE = Path(device.__file__).resolve().parents[1]


class FakeCuda:
    """CUDA as CuPy shows it, reduced to what creates contexts: ``setDevice(k)`` makes one on k (CUDA
    12+), any call that needs a context makes one on device 0 if none is current (the runtime's
    implicit start), and the driver's ctxGetCurrent/ctxSetCurrent save and restore the current one."""

    class CUDARuntimeError(RuntimeError):
        pass

    def __init__(self, refuse_ipc: bool = False):
        self.contexts: set[int] = set()   # GPUs this process holds a context on
        self.current: int | None = None   # the current context's GPU; None: no context current
        self.refuse_ipc = refuse_ipc
        self.opened = 0  # IPC handles opened
        self._next_ptr = 0x1000
        runtime = types.SimpleNamespace(
            CUDARuntimeError=self.CUDARuntimeError, setDevice=self.set_device, getDeviceCount=lambda: 2,
            getDevice=lambda: self.current or 0,
            malloc=self.malloc, free=self.needs_context, ipcGetMemHandle=lambda ptr: self.needs_context() or b"h" * 64,
            ipcOpenMemHandle=self.open, ipcCloseMemHandle=self.needs_context, memGetInfo=lambda: (self.needs_context(), 8, 16)[1:],
            deviceGetPCIBusId=lambda k: f"0000:0{k}:00.0", deviceGetByPCIBusId=lambda bus: int(bus[6]))
        driver = types.SimpleNamespace(ctxGetCurrent=lambda: 0 if self.current is None else self.current + 100,
                                       ctxSetCurrent=self.set_context)
        cuda = types.SimpleNamespace(runtime=runtime, driver=driver, Stream=self.stream, UnownedMemory=self.memory,
                                     MemoryPointer=lambda memory, offset: types.SimpleNamespace(ptr=memory.ptr + offset, mem=memory))
        self.module = types.SimpleNamespace(cuda=cuda, uint8="uint8", ndarray=self.ndarray)

    def set_device(self, k: int) -> None:
        self.contexts.add(k)
        self.current = k

    def set_context(self, handle: int) -> None:
        self.current = None if handle == 0 else handle - 100

    def needs_context(self, *_) -> None:
        if self.current is None:
            self.set_device(0)

    def malloc(self, size: int) -> int:
        self.needs_context()
        self._next_ptr += size
        return self._next_ptr

    def open(self, handle: bytes) -> int:
        self.needs_context()
        if self.refuse_ipc:
            raise self.CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
        self.opened += 1
        return self.malloc(1 << 20)

    def stream(self, non_blocking: bool = False):
        self.needs_context()
        return types.SimpleNamespace(synchronize=self.needs_context)

    @staticmethod
    def memory(ptr, size, owner, device_id):
        return types.SimpleNamespace(ptr=ptr, size=size, owner=owner, device_id=device_id)

    @staticmethod
    def ndarray(shape, dtype, memptr):
        class Array:  # what DeviceRingView uses of a CuPy array
            data = memptr

            def __getitem__(self, k):
                return ("slot", k, memptr)
        return Array()


@pytest.fixture
def cuda(monkeypatch):
    """A fresh process's CUDA: the fake as ``cupy``, and no GPU chosen yet."""
    fake = FakeCuda()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    monkeypatch.setattr(device, "_process_gpu", None)
    return fake


class FakeBatch:
    """`stage.StageBatch`'s write side, on the GPU: records the addresses it was asked to fill."""

    nbytes, count = 64, 2

    def __init__(self):
        self.written = []

    def copy_to(self, address: int) -> None:
        self.written.append(address)

    def copy_samples_to(self, addresses: list[int], stream=None) -> None:
        assert stream is not None, "a GPU batch's copies are queued on the writer's stream"
        self.written.extend(addresses)


def new_process(cuda: FakeCuda, monkeypatch) -> None:
    cuda.contexts.clear()
    cuda.current = None
    monkeypatch.setattr(device, "_process_gpu", None)


def test_producer_worker_and_job_of_a_ring_on_gpu_1_hold_contexts_on_gpu_1_only(cuda, monkeypatch):
    ring = device.DeviceRing("ctx", slots=2, slot_bytes=512, gpu=1)  # the producer
    device.free_bytes(1)
    assert cuda.contexts == {1} and cuda.current == 1
    layout = ring.layout
    try:
        new_process(cuda, monkeypatch)  # the stage worker: the ring's slots and a GPU cache's rows
        writer = device.DeviceRingWriter(layout)
        batch = FakeBatch()
        writer.write(1, batch)
        rows = device.DeviceRowsWriter(layout, sample_bytes=32)
        rows.write([5, 2], batch)
        writer.close(), rows.close()
        gc.collect()
        assert cuda.contexts == {1}
        base = batch.written[1] - 5 * 32
        assert batch.written == [batch.written[0], base + 5 * 32, base + 2 * 32]

        new_process(cuda, monkeypatch)  # a job whose training code has not touched CUDA
        view = device.DeviceRingView(layout)
        assert view.device == 1 and cuda.contexts == {1} and cuda.current is None  # nothing left current
        view.close()
        gc.collect()  # the mapping closes with the last view, on GPU 1
        assert cuda.contexts == {1} and cuda.current is None
    finally:
        ring.close()


def test_a_job_s_own_current_gpu_is_put_back_after_it_maps_a_ring_elsewhere(cuda, monkeypatch):
    ring = device.DeviceRing("own", slots=1, slot_bytes=512, gpu=1)
    try:
        new_process(cuda, monkeypatch)
        cuda.set_device(0)  # the job trains on GPU 0 (torch.cuda.set_device(0))
        view = device.DeviceRingView(ring.layout)
        assert cuda.current == 0 and cuda.contexts == {0, 1}
        view.close()
    finally:
        ring.close()


def test_a_process_works_on_one_gpu_and_says_so_when_asked_for_another(cuda):
    device.use_gpu(1)
    device.use_gpu(1)
    with pytest.raises(ConfigError, match="already works on GPU 1 and was asked for GPU 0"):
        device.use_gpu(0)
    assert cuda.contexts == {1}


def test_no_code_switches_devices_with_a_cupy_device_block():
    """``with cupy.cuda.Device(k)`` sets device 0 back when it ends (a context there): none in the package."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Device":
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not found, f"device switches that restore device 0: {found}"


def device_layout(pid_ns: int) -> RingLayout:
    return RingLayout(RingKind.DEVICE.value, "dalishare.x.1", slots=2, slot_bytes=512, gpu="0000:00:00.0",
                      handle=b"h" * 64, pid_ns=pid_ns)


def test_a_job_in_another_pid_namespace_is_told_the_fix_before_it_touches_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # it must not get as far as importing CuPy
    with pytest.raises(ConfigError) as error:
        device.DeviceRingView(device_layout(names.pid_namespace() + 1))
    for fix in ("--pid=host", 'pid: "service:PRODUCER"', "shareProcessNamespace: true", "--device cpu"):
        assert fix in str(error.value)
    device.check_can_open(device_layout(names.pid_namespace()))  # the same namespace
    device.check_can_open(device_layout(0))  # a producer that could not tell: CUDA decides
    assert RingLayout.from_wire(device_layout(7).to_wire()).pid_ns == 7


def test_an_ipc_open_that_fails_is_one_config_error_naming_mig_and_leaves_nothing_open(monkeypatch, no_leaks):
    fake = FakeCuda(refuse_ipc=True)
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    monkeypatch.setattr(device, "_process_gpu", None)
    ring = device.DeviceRing("mig", slots=1, slot_bytes=512, gpu=0)
    try:
        with pytest.raises(ConfigError, match="not across MIG instances") as error:
            device.DeviceRingView(ring.layout)
        assert "cudaErrorInvalidDevice" in str(error.value) and "--device cpu" in str(error.value)
    finally:
        ring.close()


def test_two_iterators_of_one_process_share_one_opening_of_the_handle(cuda):
    """CUDA opens an IPC handle once per process (a second open fails): views share the mapping."""
    ring = device.DeviceRing("two", slots=1, slot_bytes=512, gpu=0)
    try:
        first, second = device.DeviceRingView(ring.layout), device.DeviceRingView(ring.layout)
        assert cuda.opened == 1 and first.span == second.span
        first.close()
        assert second.mapped  # the other iterator still maps it
        second.close()
        gc.collect()
        third = device.DeviceRingView(ring.layout)  # all closed: a new opening
        assert cuda.opened == 2
        third.close()
    finally:
        ring.close()


def test_use_gpu_sets_the_device_again_in_a_thread_that_has_another(cuda):
    device.use_gpu(1)
    cuda.current = None  # another thread: no current context yet
    device.use_gpu(1)
    assert cuda.current == 1 and cuda.contexts == {1}
