"""The ring: a fixed set of slots, each holding one producer batch, shared by the producer and its jobs.

NOTE [ Slot ownership ]
=======================
- Creation. The producer creates the ring's memory once, before it accepts jobs, and is its only
  writer: a host ring is one ``/dev/shm`` segment; a device ring is one plain ``cudaMalloc``
  allocation on the producer's GPU plus a header-only segment (device_ring.py). A job maps the ring
  at attach (the layout arrives in the ``Welcome`` message): host memory read-only, so a job that
  wrote would fault instead of corrupting its neighbours' batches; device memory through its CUDA
  IPC handle, opened once (CUDA has no read-only IPC mapping: a job must not write to it).
- Writing. The producer writes slot k only while no job holds it. A slot becomes held by every job
  that is sent its ``Batch`` announcement (at production, at attach for the resident batches of the
  current epoch, at resume after a suspension) and stops being held by a job when that job sends
  ``Release`` for it, says ``Bye``, or is declared dead (its process is gone, or its socket is). The
  producer fills the free slot holding the oldest batch, so the newest stay resident for late jobs.
- Reading. A job reads a slot between receiving its announcement and sending its release, in
  announcement order. Each view it yields has a storage of its own, so the job can tell whether
  anything still refers to it (keep.py). It releases a slot once it has taken all of it and no view
  of it is referenced any more (checked at each step and before waiting), at the latest when the
  job has taken ``keep`` further batches (its ``Hello`` says keep; default 2); a view still
  referenced then raises `BatchHeldTooLong` in the job instead of being released. ``keep=0``
  releases at the next step, unchecked. So the slots a job may be reading are its keep+2 oldest held
  ones: views of up to keep+1 batches and the slot it reads next.
- GPU ordering. On a device ring "writing" and "reading" mean GPU work, which is asynchronous. The
  producer's copy into a slot has finished before it marks the header and announces the slot. A job
  releases a slot only after the GPU work it queued to read it has finished (a CUDA event, polled;
  releases.py), recorded on its current stream when the keep rule above lets the slot go (so after
  the steps that used its views queued their work), and before reading a new slot it waits until at
  most one released slot still has reads in flight, so the keep+2-oldest rule above holds for its
  GPU as well as for its Python code.
- Stalls. A live job that released nothing for ``--stall-timeout`` while another waits (has begun
  to read every batch it holds: ``Heartbeat.taken``) is suspended: it keeps its keep+2 oldest slots
  (the only ones it may be reading), loses its hold on the others, and gets no announcements until
  it resumes. That frees something only if the ring has more than keep+2 slots. Before taking each new batch from its queue a job
  reads its socket, so it sees ``Suspended`` (which voids its other announcements) before it could
  read a slot that was freed under it.
- Unlinking. The producer unlinks the segment when it stops (also on SIGINT/SIGTERM). A job's
  mapping stays valid after the unlink and is unmapped when the job closes. After its last epoch a
  producer stops once each job has begun to read all it holds (host ring: the views a job keeps stay
  valid in its mapping) or, for a device ring, once each job has released every slot.
- Death. The kernel keeps no link from a dead producer to its segment: a producer that was killed
  leaves ``/dev/shm/dalishare.NAME.PID`` behind, and `runtime.clean_stale` removes it (at the next
  ``dalishare serve`` or ``dalishare cleanup``). The CUDA driver reclaims a dead producer's device
  memory with its context; its jobs get `ProducerLost` and read the ring no more. A dead job's mappings go with its
  process; the producer frees the job's slots when it notices the death (see ``producer.Producer._reap``).
- Closing. A job closes its IPC mapping when the last view of it goes: at ``close()`` unless the
  user still holds a yielded tensor (then with that tensor), never under a live view.

The producer side is `create_ring(...)`, the job side `attach_ring(layout)`. Neither imports DALI
or torch: the producer hands over batches with ``nbytes`` and ``copy_to(address)``, and a job gets
NumPy buffers (host) or CuPy arrays (device) to wrap as tensors.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import asdict, dataclass

import numpy as np

from . import runtime
from .errors import ProducerLost, ProtocolError


@dataclass(frozen=True)
class RingLayout:
    """What a job needs to map the ring; travels in ``Welcome`` as a plain dict."""

    kind: str          # "host": slots in the segment; "device": slots in GPU memory, header in the segment
    segment: str       # file name under /dev/shm: the header page (and the slots of a host ring)
    slots: int
    slot_bytes: int    # the slots follow each other; the header holds one int64 per slot, the seq it holds
    gpu: str = ""      # device ring: the PCI bus id of its GPU (ordinals differ between processes)
    handle: bytes = b""  # device ring: the CUDA IPC handle of its one allocation

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: dict) -> "RingLayout":
        try:
            layout = cls(kind=str(d["kind"]), segment=str(d["segment"]), slots=int(d["slots"]),
                         slot_bytes=int(d["slot_bytes"]), gpu=str(d.get("gpu", "")), handle=bytes(d.get("handle", b"")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"the producer sent a malformed ring layout ({exc!r}); upgrade dalishare") from None
        if layout.kind == "device" and (len(layout.handle) != IPC_HANDLE_BYTES or not layout.gpu):
            raise ProtocolError(f"the producer sent a device ring without a {IPC_HANDLE_BYTES}-byte IPC handle "
                                f"and a GPU bus id; upgrade dalishare")
        return layout


IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)
HEADER_BYTES = 4096  # one int64 per slot: the seq of the batch a slot holds, -1 while it is written
MAX_SLOTS = HEADER_BYTES // 8
# A job may use views of up to keep+1 batches at once (keep=2 by default) while it reads the next,
# and a suspended job keeps keep+2: 8 leaves the others 4. No slower than 4 (bench/results).
DEFAULT_SLOTS = 8
SLOT_ALIGN = 512  # slot starts stay aligned for any dtype and for fast device copies


def slot_size(batch_bytes: int) -> int:
    return -(-batch_bytes // SLOT_ALIGN) * SLOT_ALIGN


def _segment_bytes(layout: RingLayout) -> int:
    return HEADER_BYTES + (layout.slots * layout.slot_bytes if layout.kind == "host" else 0)


class HostRing:
    """Slots in one ``/dev/shm`` segment, mode 0600. Producer side: created, writable, unlinked on close.

    With ``slot_bytes=0`` the segment is only the header, which is how a `DeviceRing` keeps its seqs
    where every job can read them without touching the GPU.
    """

    def __init__(self, name: str, slots: int, slot_bytes: int, kind: str = "host"):
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"a ring has 1 to {MAX_SLOTS} slots, not {slots}")
        self.layout = RingLayout(kind, runtime.shm_name(name, os.getpid()), slots, slot_bytes)
        self._path = runtime.SHM_DIR / self.layout.segment
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, _segment_bytes(self.layout))
            self._map = mmap.mmap(fd, _segment_bytes(self.layout))
        except BaseException:
            self._path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self._seqs = np.frombuffer(self._map, dtype=np.int64, count=slots)
        self._seqs[:] = -1
        self._array = np.frombuffer(self._map, dtype=np.uint8, offset=HEADER_BYTES)

    def write(self, slot: int, batch, seq: int) -> None:
        """Copy batch ``seq`` into ``slot``. ``batch`` has ``nbytes`` and ``copy_to(address)``
        (`stage.StageBatch`), which returns once the bytes are there. The slot's header says -1
        during the copy and ``seq`` after it, so a reader can tell a slot that changed under it
        (x86 keeps stores in order)."""
        check_fits(batch, self.layout)
        self.mark(slot, -1)
        batch.copy_to(self._array[slot * self.layout.slot_bytes :].ctypes.data)
        self.mark(slot, seq)

    def mark(self, slot: int, seq: int) -> None:
        self._seqs[slot] = seq

    def close(self) -> None:
        self._path.unlink(missing_ok=True)
        self._array = self._seqs = None
        self._map.close()


def check_fits(batch, layout: RingLayout) -> None:
    if batch.nbytes > layout.slot_bytes:
        raise ValueError(f"batch of {batch.nbytes} bytes does not fit a {layout.slot_bytes}-byte slot")


class HostRingView:
    """Job side of a `HostRing`: a read-only mapping of the same segment."""

    def __init__(self, layout: RingLayout):
        self.layout = layout
        path = runtime.SHM_DIR / layout.segment
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ProducerLost(f"ring segment {path} is gone: its producer stopped; start it again") from None
        try:
            self._map = mmap.mmap(fd, _segment_bytes(layout), prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._seqs = np.frombuffer(self._map, dtype=np.int64, count=layout.slots)

    device = None  # where the slots are: host memory

    def slot(self, k: int) -> memoryview:
        """A read-only buffer over slot k (zero copy)."""
        start = HEADER_BYTES + k * self.layout.slot_bytes
        return memoryview(self._map)[start : start + self.layout.slot_bytes]

    def lease(self, k: int, offset: int, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
        """``nbytes`` of slot k from ``offset`` as a new read-only array (zero copy), and its lease:
        the array itself. A tensor made from it keeps it alive exactly as long as any view of that
        tensor lives, which tells the job whether a yielded batch is still referenced (keep.py)."""
        array = np.frombuffer(self._map, dtype=np.uint8, count=nbytes,
                              offset=HEADER_BYTES + k * self.layout.slot_bytes + offset)
        return array, array

    def holds(self, k: int, seq: int) -> bool:
        """Whether slot k still holds batch ``seq``."""
        return int(self._seqs[k]) == seq

    def close(self) -> None:
        self._seqs = None
        try:
            self._map.close()
        except BufferError:
            pass  # views a user still holds keep the mapping alive; it goes with the last of them


def create_ring(name: str, slots: int, batch_bytes: int, gpu: int | None = None):
    """The producer's ring: host shared memory, or device memory on GPU ``gpu``."""
    if gpu is None:
        return HostRing(name, slots, slot_size(batch_bytes))
    from .device_ring import DeviceRing  # CuPy is only needed on the GPU path

    return DeviceRing(name, slots, slot_size(batch_bytes), gpu)


def attach_ring(layout: RingLayout):
    if layout.kind == "host":
        return HostRingView(layout)
    if layout.kind == "device":
        from .device_ring import DeviceRingView

        return DeviceRingView(layout)
    raise ProtocolError(f"the producer serves a ring of kind {layout.kind!r}, which this dalishare cannot map; upgrade it")
