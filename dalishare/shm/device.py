"""The ring in GPU memory: one plain ``cudaMalloc`` allocation shared with the jobs through CUDA IPC.

The slots' seq header stays in a small host segment (a header-only `HostRing`), so a job checks
what a slot holds without touching the GPU. The rules are NOTE [ Slot ownership ] in shm/__init__.py.
CuPy is imported here and nowhere else; it is the ``gpu`` extra.
"""

from __future__ import annotations

import os
import weakref

from ..errors import ConfigError
from .host import HostRing, HostRingView
from .layout import RingKind, RingLayout, check_fits


def cupy():
    """CuPy, or a one-line `ConfigError` saying how to get it."""
    try:
        import cupy
    except ImportError:
        raise ConfigError("the GPU path needs CuPy: pip install 'dalishare[gpu]' (cupy-cuda12x)") from None
    return cupy


def check_gpu(index: int) -> None:
    """Fail with one line unless GPU ``index`` is visible to this process."""
    cp = cupy()
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except cp.cuda.runtime.CUDARuntimeError as exc:
        raise ConfigError(f"no usable CUDA GPU here ({exc}); serve with --device cpu") from None
    if not 0 <= index < count:
        raise ConfigError(f"GPU {index} does not exist: this process sees {count} GPU(s) "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")


def free_bytes(index: int) -> int:
    """Free memory on GPU ``index`` now."""
    cp = cupy()
    with cp.cuda.Device(index):
        return int(cp.cuda.runtime.memGetInfo()[0])


class DeviceRing:
    """Producer side: slots in device memory on GPU ``gpu``, exported once as a CUDA IPC handle."""

    def __init__(self, name: str, slots: int, slot_bytes: int, gpu: int):
        cp = cupy()
        check_gpu(gpu)
        self._gpu, self._ptr = gpu, 0
        self._header = HostRing(name, slots, 0, kind=RingKind.DEVICE.value)
        try:
            with cp.cuda.Device(gpu):
                # plain cudaMalloc, not CuPy's pool: CUDA IPC cannot export stream-ordered pool memory
                self._ptr = cp.cuda.runtime.malloc(slots * slot_bytes)
                handle = bytes(cp.cuda.runtime.ipcGetMemHandle(self._ptr))
                bus_id = cp.cuda.runtime.deviceGetPCIBusId(gpu)
        except BaseException:
            self.close()
            raise
        self.layout = RingLayout(RingKind.DEVICE.value, self._header.layout.segment, slots, slot_bytes, gpu=bus_id, handle=handle)

    def mark(self, slot: int, seq: int) -> None:
        """The seq slot k's header shows (see `HostRing.mark`)."""
        self._header.mark(slot, seq)

    def close(self) -> None:
        """Free the slots. Jobs must be gone or told to stop (the producer broadcasts `Stop` first):
        an importer's mapping of freed memory is undefined behaviour."""
        if self._ptr:
            with cupy().cuda.Device(self._gpu):
                cupy().cuda.runtime.free(self._ptr)
            self._ptr = 0
        self._header.close()


class DeviceRingWriter:
    """A stage worker's mapping of a `DeviceRing` (its IPC handle, opened once); it writes slots only."""

    def __init__(self, layout: RingLayout):
        cp = cupy()
        self.layout = layout
        self._gpu = cp.cuda.runtime.deviceGetByPCIBusId(layout.gpu)
        self._mapping = _IpcMapping(layout.handle, self._gpu)

    def write(self, slot: int, batch) -> None:
        """Copy ``batch`` (a `stage.StageBatch` on this GPU) into ``slot``. ``copy_to`` returns when
        the copy has finished on the GPU, so the slot is announced only after its bytes landed."""
        check_fits(batch, self.layout)
        with cupy().cuda.Device(self._gpu):
            batch.copy_to(self._mapping.ptr + slot * self.layout.slot_bytes)

    def close(self) -> None:
        self._mapping = None


class DeviceRowsWriter:
    """A stage worker's mapping of a GPU cache's rows (a one-slot `DeviceRing` of ``samples`` rows of
    ``sample_bytes``): scatters batches into rows (NOTE [ Cache protocol ] in producer/filling.py)."""

    def __init__(self, layout: RingLayout, sample_bytes: int):
        cp = cupy()
        self._gpu = cp.cuda.runtime.deviceGetByPCIBusId(layout.gpu)
        self._mapping = _IpcMapping(layout.handle, self._gpu)
        memory = cp.cuda.UnownedMemory(self._mapping.ptr, layout.slot_bytes, self._mapping, self._gpu)
        self._rows = cp.ndarray((layout.slot_bytes // sample_bytes, sample_bytes), cp.uint8,
                                cp.cuda.MemoryPointer(memory, 0))

    def write(self, indices, batch) -> None:
        """Rows ``indices`` := the samples of ``batch`` (a `stage.StageBatch` on this GPU); returns once
        the copies have finished on the GPU, so the rows are marked valid only after they landed."""
        cp = cupy()
        with cp.cuda.Device(self._gpu):
            dense = cp.empty((len(indices), self._rows.shape[1]), cp.uint8)
            batch.copy_to(dense.data.ptr)  # blocking, on DALI's stream
            self._rows[cp.asarray(list(indices), dtype=cp.int64)] = dense
            cp.cuda.get_current_stream().synchronize()

    def close(self) -> None:
        self._rows = self._mapping = None


class _IpcMapping:
    """One opened IPC handle. It is closed when the last view of it goes (tensors a user kept
    included), never under a live view."""

    def __init__(self, handle: bytes, gpu: int):
        cp = cupy()
        with cp.cuda.Device(gpu):
            self.ptr = cp.cuda.runtime.ipcOpenMemHandle(handle)  # lazy peer access: other GPUs may read it
        weakref.finalize(self, _close_ipc, self.ptr, gpu)


def _close_ipc(ptr: int, gpu: int) -> None:
    cp = cupy()
    try:
        with cp.cuda.Device(gpu):
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
            mapping = _IpcMapping(layout.handle, self.device)
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
