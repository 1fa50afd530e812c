"""The ring in GPU memory: one plain ``cudaMalloc`` allocation shared with the jobs through CUDA IPC.

The slots' seq header stays in a small host segment (a header-only `HostRing`), so a job checks
what a slot holds without touching the GPU. The rules are NOTE [ Slot ownership ] in shm/__init__.py.
CuPy is imported here and nowhere else; it is the ``gpu`` extra.

NOTE [ One GPU per process ]
============================
Leaving ``with cupy.cuda.Device(k):`` sets the previous device back (device 0 in a fresh process),
and under CUDA 12+ setting a device creates a context on it: a producer on GPU 3 would hold ~500 MB
on GPU 0 too (pytorch#94864 is the same effect in torch). So nothing here switches back:

- the producer and its stage worker own their GPU: `use_gpu` makes it the current device once per
  process and refuses another one;
- a job's current device belongs to its training code (``torch.cuda.set_device``, DDP), so its calls
  on the ring's GPU go through `on_gpu`, which puts back exactly the context that was current (or
  none), never "device 0".

tests/unit/test_device_calls.py runs this module over a recording fake of CuPy and checks that no
process gets a context on any GPU but the ring's.
"""

from __future__ import annotations

import contextlib
import os
import weakref

from ..errors import ConfigError
from .host import HostRing, HostRingView
from .layout import RingKind, RingLayout, check_fits
from .names import pid_namespace


def cupy():
    """CuPy, or a one-line `ConfigError` saying how to get it."""
    try:
        import cupy
    except ImportError:
        raise ConfigError("the GPU path needs CuPy: pip install 'dalishare[gpu]' (cupy-cuda12x)") from None
    return cupy


_process_gpu: int | None = None  # the GPU `use_gpu` made this process's own; set once, never switched back


def use_gpu(index: int) -> None:
    """Make GPU ``index`` this process's current device, once (NOTE [ One GPU per process ])."""
    global _process_gpu
    runtime = cupy().cuda.runtime
    if _process_gpu is None or (_process_gpu == index and runtime.getDevice() != index):
        runtime.setDevice(index)  # the current device is per thread: another thread sets it too
        _process_gpu = index
    elif _process_gpu != index:
        raise ConfigError(f"this process already works on GPU {_process_gpu} and was asked for GPU {index}: "
                          f"a producer serves from one GPU; start one producer per GPU")


@contextlib.contextmanager
def on_gpu(index: int):
    """Run a job's CUDA calls on GPU ``index`` and put back the context that was current, or none
    (NOTE [ One GPU per process ]): the job's current device stays what its training code made it."""
    cp = cupy()
    saved = cp.cuda.driver.ctxGetCurrent()
    cp.cuda.runtime.setDevice(index)
    try:
        yield
    finally:
        cp.cuda.driver.ctxSetCurrent(saved)


def check_gpu(index: int) -> None:
    """Fail with one line unless GPU ``index`` is visible to this process (creates no context)."""
    cp = cupy()
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except cp.cuda.runtime.CUDARuntimeError as exc:
        raise ConfigError(f"no usable CUDA GPU here ({exc}); serve with --device cpu") from None
    if not 0 <= index < count:
        raise ConfigError(f"GPU {index} does not exist: this process sees {count} GPU(s) "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")


def free_bytes(index: int) -> int:
    """Free memory on GPU ``index`` now (the producer's GPU: `use_gpu`)."""
    use_gpu(index)
    return int(cupy().cuda.runtime.memGetInfo()[0])


def check_can_open(layout: RingLayout) -> None:
    """Fail at attach, with the fix, where CUDA IPC cannot work: across pid namespaces, legacy CUDA
    IPC fails with "invalid device context" (vLLM#55906) or worse, so a job in another one (``docker
    run`` without ``--pid=host``) must not try. Host rings need no shared pid namespace (NOTE [ Lifelines ])."""
    mine = pid_namespace()
    if layout.pid_ns and mine and layout.pid_ns != mine:  # 0 on either side: cannot tell, CUDA decides
        raise ConfigError(
            "the producer keeps its data in GPU memory, shared through CUDA IPC, which needs the producer and "
            "the job in one pid namespace, and this job runs in another: run its container with --pid=host "
            "(or --pid=container:PRODUCER), in compose give the job `pid: \"service:PRODUCER\"`, in Kubernetes "
            "put both in one pod with `shareProcessNamespace: true`; or serve with --device cpu")


class DeviceRing:
    """Producer side: slots in device memory on GPU ``gpu``, exported once as a CUDA IPC handle."""

    def __init__(self, name: str, slots: int, slot_bytes: int, gpu: int):
        cp = cupy()
        check_gpu(gpu)
        self._ptr = 0
        self._header = HostRing(name, slots, 0, kind=RingKind.DEVICE.value)
        try:
            use_gpu(gpu)
            # plain cudaMalloc, not CuPy's pool: CUDA IPC cannot export stream-ordered pool memory
            self._ptr = cp.cuda.runtime.malloc(slots * slot_bytes)
            handle = bytes(cp.cuda.runtime.ipcGetMemHandle(self._ptr))
            bus_id = cp.cuda.runtime.deviceGetPCIBusId(gpu)
        except BaseException:
            self.close()
            raise
        self.layout = RingLayout(RingKind.DEVICE.value, self._header.layout.segment, slots, slot_bytes, gpu=bus_id,
                                 handle=handle, pid_ns=pid_namespace())

    def mark(self, slot: int, seq: int) -> None:
        """The seq slot k's header shows (see `HostRing.mark`)."""
        self._header.mark(slot, seq)

    def close(self, free: bool = True) -> None:
        """Free the slots, unless ``free`` is False: a job that still maps them (it did not leave in
        DEVICE_UNMAP_LIMIT_S) keeps them until this process ends, since freeing memory another
        process maps is undefined in CUDA (NOTE [ Producer shutdown ])."""
        if self._ptr and free:
            cupy().cuda.runtime.free(self._ptr)  # on this process's GPU (use_gpu)
        self._ptr = 0
        self._header.close()


class DeviceRingWriter:
    """A stage worker's mapping of a `DeviceRing` (its IPC handle, opened once); it writes slots only."""

    def __init__(self, layout: RingLayout):
        cp = cupy()
        self.layout = layout
        gpu = cp.cuda.runtime.deviceGetByPCIBusId(layout.gpu)
        use_gpu(gpu)  # the worker's DALI pipeline runs on the same GPU
        self._mapping = _IpcMapping(layout, gpu)

    def write(self, slot: int, batch) -> None:
        """Copy ``batch`` (a `stage.StageBatch` on this GPU) into ``slot``. ``copy_to`` returns when
        the copy has finished on the GPU, so the slot is announced only after its bytes landed."""
        check_fits(batch, self.layout)
        batch.copy_to(self._mapping.ptr + slot * self.layout.slot_bytes)

    def close(self) -> None:
        self._mapping = None


class DeviceRowsWriter:
    """A stage worker's mapping of a GPU cache's rows (a one-slot `DeviceRing` of ``samples`` rows of
    ``sample_bytes``): copies each sample of a batch into its row (NOTE [ Cache protocol ] in
    producer/filling.py), straight from DALI's memory: no gather kernel (CuPy would compile one at
    run time, which needs NVRTC and a writable cache dir) and no staging copy."""

    def __init__(self, layout: RingLayout, sample_bytes: int):
        cp = cupy()
        gpu = cp.cuda.runtime.deviceGetByPCIBusId(layout.gpu)
        use_gpu(gpu)
        self._mapping = _IpcMapping(layout, gpu)
        self._rows, self._sample_bytes = layout.slot_bytes // sample_bytes, sample_bytes
        self._stream = cp.cuda.Stream(non_blocking=True)  # the copies' own: DALI's streams stay DALI's

    def write(self, indices, batch) -> None:
        """Rows ``indices`` := the samples of ``batch`` (a `stage.StageBatch` on this GPU); returns once
        the copies have finished on the GPU, so the rows are marked valid only after they landed."""
        if any(not 0 <= i < self._rows for i in indices):
            raise ValueError(f"row out of range: the cache holds {self._rows} rows")
        batch.copy_samples_to([self._mapping.ptr + i * self._sample_bytes for i in indices], self._stream)

    def close(self) -> None:
        self._stream = self._mapping = None


class _IpcMapping:
    """One opened IPC handle, shared by everything in this process that maps it (CUDA opens a handle
    once per process: a second open fails). It is closed when the last view of it goes (tensors a
    user kept included), never under a live view."""

    _open: "weakref.WeakValueDictionary[bytes, _IpcMapping]" = weakref.WeakValueDictionary()

    def __new__(cls, layout: RingLayout, gpu: int):
        mapping = cls._open.get(layout.handle)
        if mapping is None:
            mapping = super().__new__(cls)
            mapping.ptr = _open_ipc(layout, gpu)
            weakref.finalize(mapping, _close_ipc, mapping.ptr, gpu)
            cls._open[layout.handle] = mapping
        return mapping


def _open_ipc(layout: RingLayout, gpu: int) -> int:
    cp = cupy()
    with on_gpu(gpu):
        try:  # lazy peer access: other GPUs may read it
            return cp.cuda.runtime.ipcOpenMemHandle(layout.handle)
        except cp.cuda.runtime.CUDARuntimeError as exc:
            raise ConfigError(
                f"cannot open the producer's GPU memory (GPU at PCI {layout.gpu}) through CUDA IPC: {exc}. "
                f"CUDA IPC works only on the same physical GPU, not across MIG instances of it, and only "
                f"within one pid namespace (checked at attach where the kernel tells); where that cannot "
                f"be had, serve with --device cpu") from None


def _close_ipc(ptr: int, gpu: int) -> None:
    cp = cupy()
    try:
        with on_gpu(gpu):
            cp.cuda.runtime.ipcCloseMemHandle(ptr)
    except Exception:  # at interpreter exit the runtime may be gone; the process's end unmaps it
        pass


class _Lease:
    """Owner of one yielded view's device memory (see `DeviceRingView.lease`)."""

    __slots__ = ("ring_array", "__weakref__")

    def __init__(self, ring_array):
        self.ring_array = ring_array


class DeviceRingView:
    """Job side of a `DeviceRing`: the allocation opened once through its IPC handle."""

    def __init__(self, layout: RingLayout):
        check_can_open(layout)
        cp = cupy()
        self.layout = layout
        try:
            self.device = cp.cuda.runtime.deviceGetByPCIBusId(layout.gpu)
        except cp.cuda.runtime.CUDARuntimeError:
            raise ConfigError(
                f"the ring is on the GPU at PCI {layout.gpu}, which this job cannot see "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                f"run the job where that GPU is visible") from None
        self._header = HostRingView(layout)
        try:
            mapping = _IpcMapping(layout, self.device)
        except BaseException:
            self._header.close()
            raise
        self._mapped = weakref.ref(mapping)
        size = layout.slots * layout.slot_bytes
        memory = cp.cuda.UnownedMemory(mapping.ptr, size, mapping, self.device)
        self._array = cp.ndarray((layout.slots, layout.slot_bytes), cp.uint8, cp.cuda.MemoryPointer(memory, 0))
        self.span = (mapping.ptr, mapping.ptr + size)  # device addresses of the mapping, for checks

    @property
    def mapped(self) -> bool:
        """Whether the IPC mapping is still open (it closes when the last view of it goes)."""
        return self._mapped() is not None

    def slot(self, k: int):
        """Slot k as a CuPy uint8 array (zero copy); ``torch.from_dlpack`` turns it into a tensor."""
        return self._array[k]

    def lease(self, k: int, offset: int, nbytes: int):
        """``nbytes`` of slot k from ``offset`` as a new CuPy array (zero copy) and its lease: an
        object that lives exactly as long as the array and any tensor made from it (the DLPack
        capsule holds the array, the array its memory, the memory its owner). See keep.py."""
        lease = _Lease(self._array)  # also keeps the IPC mapping open while the view lives
        cp = cupy()
        memory = cp.cuda.UnownedMemory(self._array.data.ptr + k * self.layout.slot_bytes + offset, nbytes,
                                       lease, self.device)
        return cp.ndarray((nbytes,), cp.uint8, cp.cuda.MemoryPointer(memory, 0)), lease

    def holds(self, k: int, seq: int) -> bool:
        return self._header.holds(k, seq)

    def close(self) -> None:
        self._array = None  # the mapping closes now, or with the last view a user still holds
        self._header.close()
