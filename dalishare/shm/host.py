"""The ring in host memory: one ``/dev/shm`` segment (producer: `HostRing`, job: `HostRingView`).
The rules are NOTE [ Slot ownership ] in shm/__init__.py."""

from __future__ import annotations

import mmap
import os

import numpy as np

from . import names
from ..errors import ProducerLost
from .layout import HEADER_BYTES, MAX_SLOTS, RingKind, RingLayout, check_fits, segment_bytes


class HostRing:
    """Slots in one ``/dev/shm`` segment, mode 0600. Producer side: created, writable, unlinked on close.

    With ``slot_bytes=0`` the segment is only the header, which is how a `DeviceRing` keeps its seqs
    where every job can read them without touching the GPU.
    """

    def __init__(self, name: str, slots: int, slot_bytes: int, kind: str = RingKind.HOST.value):
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"a ring has 1 to {MAX_SLOTS} slots, not {slots}")
        self.layout = RingLayout(kind, names.shm_name(name, os.getpid()), slots, slot_bytes)
        self._path = names.SHM_DIR / self.layout.segment
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, segment_bytes(self.layout))
            self._map = mmap.mmap(fd, segment_bytes(self.layout))
        except BaseException:
            self._path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self._seqs = np.frombuffer(self._map, dtype=np.int64, count=slots)
        self._seqs[:] = -1
        self._array = np.frombuffer(self._map, dtype=np.uint8, offset=HEADER_BYTES)

    def mark(self, slot: int, seq: int) -> None:
        """Set the seq slot k's header shows: -1 while a stage worker writes the slot, then the seq
        of the batch it holds, so a reader can tell a slot that changed under it. The worker's copy
        and this store are ordered by the message between them (NOTE [ Stage worker protocol ])."""
        self._seqs[slot] = seq

    def close(self) -> None:
        self._path.unlink(missing_ok=True)
        self._array = self._seqs = None
        self._map.close()



class HostRingWriter:
    """A stage worker's writable mapping of a `HostRing`'s slots (NOTE [ Stage worker protocol ]).
    It writes slots only; the producer owns the header."""

    def __init__(self, layout: RingLayout):
        self.layout = layout
        fd = os.open(names.SHM_DIR / layout.segment, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, segment_bytes(layout))
        finally:
            os.close(fd)
        self._array = np.frombuffer(self._map, dtype=np.uint8, offset=HEADER_BYTES)

    def write(self, slot: int, batch) -> None:
        """Copy ``batch`` (``nbytes``, ``copy_to(address)``: `stage.StageBatch`) into ``slot``;
        returns once the bytes are there."""
        check_fits(batch, self.layout)
        batch.copy_to(self._array[slot * self.layout.slot_bytes :].ctypes.data)

    def close(self) -> None:
        self._array = None
        self._map.close()


class HostRingView:
    """Job side of a `HostRing`: a read-only mapping of the same segment."""

    def __init__(self, layout: RingLayout):
        self.layout = layout
        path = names.SHM_DIR / layout.segment
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ProducerLost(f"ring segment {path} is gone: its producer stopped; start it again") from None
        try:
            self._map = mmap.mmap(fd, segment_bytes(layout), prot=mmap.PROT_READ)
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
