"""What a job needs to map the ring (sent in ``Welcome``), and the ring's constants.
The rules for the memory are NOTE [ Slot ownership ] in shm/__init__.py."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

from ..errors import ProtocolError


class RingKind(str, enum.Enum):
    """Where a ring's slots live (fixed for a ring's life)."""

    HOST = "host"      # slots in the /dev/shm segment, after the header
    DEVICE = "device"  # slots in GPU memory (one cudaMalloc, CUDA IPC); the segment holds only the header


@dataclass(frozen=True)
class RingLayout:
    """What a job needs to map the ring; travels in ``Welcome`` as a plain dict."""

    kind: str          # a RingKind value
    segment: str       # file name under /dev/shm: the header page (and the slots of a host ring)
    slots: int
    slot_bytes: int    # the slots follow each other; the header holds one int64 per slot, the seq it holds
    gpu: str = ""      # device ring: the PCI bus id of its GPU (ordinals differ between processes)
    handle: bytes = b""  # device ring: the CUDA IPC handle of its one allocation
    pid_ns: int = 0    # device ring: the producer's pid namespace (inode), where its IPC handle opens; 0: unknown

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: dict) -> "RingLayout":
        try:
            layout = cls(kind=str(d["kind"]), segment=str(d["segment"]), slots=int(d["slots"]),
                         slot_bytes=int(d["slot_bytes"]), gpu=str(d.get("gpu", "")), handle=bytes(d.get("handle", b"")),
                         pid_ns=int(d.get("pid_ns", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"the producer sent a malformed ring layout ({exc!r}); upgrade dalishare") from None
        if layout.kind == RingKind.DEVICE and (len(layout.handle) != IPC_HANDLE_BYTES or not layout.gpu):
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


def segment_bytes(layout: RingLayout) -> int:
    return HEADER_BYTES + (layout.slots * layout.slot_bytes if layout.kind == RingKind.HOST else 0)



def check_fits(batch, layout: RingLayout) -> None:
    if batch.nbytes > layout.slot_bytes:
        raise ValueError(f"batch of {batch.nbytes} bytes does not fit a {layout.slot_bytes}-byte slot")


