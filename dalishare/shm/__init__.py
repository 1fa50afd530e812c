"""Slot memory: the ring of slots the producer fills and its jobs read, and the names of everything
a producer leaves in the file system. Imports no zmq, torch or DALI.

NOTE [ Slot ownership ]
=======================
- Creation. The producer creates the ring's memory once, sized by the first batch, before it
  welcomes jobs: a host ring is one ``/dev/shm`` segment; a device ring is one plain ``cudaMalloc``
  allocation on the producer's GPU plus a header-only segment (device.py). Its stage worker (a child
  process: NOTE [ Stage worker protocol ] in wire/stage.py) maps it writable and is the only writer
  of the slots; the producer is the only writer of the header. A job maps the ring at attach (the
  layout arrives in the ``Welcome`` message): host memory read-only, so a job that wrote would fault
  instead of corrupting its neighbours' batches; device memory through its CUDA IPC handle, opened
  once (CUDA has no read-only IPC mapping: a job must not write to it).
- Writing. Slot k is written only while no job holds it: the producer gives a free slot to its
  worker in a ``Task`` (header -1: being written; not free, not resident), and marks the header
  with the seq and announces the slot after the worker's ``Filled``. A task lost with its worker
  frees its slot again. A slot becomes held by every job that is sent its ``Batch`` announcement
  (at production, at attach for the resident batches of the current epoch, at resume after a
  suspension) and stops being held by a job when that job sends ``Release`` for it, says ``Bye``,
  or is declared dead (its process is gone, or its socket is). The producer gives out the free
  slot holding the oldest batch, so the newest stay resident for late jobs.
- Reading. A job reads a slot between receiving its announcement and sending its release, in
  announcement order. Each view it yields has a storage of its own, so the job can tell whether
  anything still refers to it (keep.py). It releases a slot once it has taken all of it and no view
  of it is referenced any more (checked at each step and before waiting), at the latest when the
  job has taken ``keep`` further batches (its ``Hello`` says keep; default 2); a view still
  referenced then raises `BatchHeldTooLong` in the job instead of being released. ``keep=0``
  releases at the next step, unchecked. So the slots a job may be reading are its keep+2 oldest held
  ones: views of up to keep+1 batches and the slot it reads next.
- GPU ordering. On a device ring "writing" and "reading" mean GPU work, which is asynchronous. The
  worker's copy into a slot has finished before it answers, so before the header and announcement. A job
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
- Death. A dead stage worker's mapping goes with it; the producer frees the slots of its tasks in
  flight. The kernel keeps no link from a dead producer to its segment: a producer that was killed
  leaves ``/dev/shm/dalishare.NAME.PID`` behind (its worker is killed with it: PR_SET_PDEATHSIG), and `names.clean_stale` removes it (at the next
  ``dalishare serve`` or ``dalishare cleanup``). The CUDA driver reclaims a dead producer's device
  memory with its context; its jobs get `ProducerLost` and read the ring no more. A dead job's mappings go with its
  process; the producer frees the job's slots when it notices the death (``producer.server.Producer._reap``).
- Closing. A job closes its IPC mapping when the last view of it goes: at ``close()`` unless the
  user still holds a yielded tensor (then with that tensor), never under a live view; told ``Stop``,
  it unmaps at once if it can (its GPU reads done, no live view) and says ``Bye``. The producer frees
  device memory only once every job that maps it has left or died, waiting up to
  DEVICE_UNMAP_LIMIT_S, and never under a job that still maps it (NOTE [ Producer shutdown ]).

The producer side is `create_ring(...)`, the job side `attach_ring(layout)`. Neither imports DALI
or torch: the producer hands over batches with ``nbytes`` and ``copy_to(address)``, and a job gets
NumPy buffers (host) or CuPy arrays (device) to wrap as tensors. layout.py: what a job needs to map
the ring; host.py: slots in one /dev/shm segment; device.py: slots in GPU memory (the only CuPy
importer); names.py: names and places, the name lock, stale cleanup.
"""

from __future__ import annotations

from .host import HostRing, HostRingView, HostRingWriter
from ..errors import ProtocolError
from .layout import DEFAULT_SLOTS, MAX_SLOTS, RingKind, RingLayout, slot_size

__all__ = ["DEFAULT_SLOTS", "MAX_SLOTS", "RingKind", "RingLayout", "attach_ring", "create_ring", "open_cache_writer", "open_writer"]


def create_ring(name: str, slots: int, batch_bytes: int, gpu: int | None = None):
    """The producer's ring: host shared memory, or device memory on GPU ``gpu``."""
    if gpu is None:
        return HostRing(name, slots, slot_size(batch_bytes))
    from .device import DeviceRing  # CuPy is only needed on the GPU path

    return DeviceRing(name, slots, slot_size(batch_bytes), gpu)


def open_writer(layout: RingLayout):
    """A stage worker's writable view of the producer's ring (NOTE [ Stage worker protocol ])."""
    if layout.kind == RingKind.HOST:
        return HostRingWriter(layout)
    from .device import DeviceRingWriter

    return DeviceRingWriter(layout)


def open_cache_writer(cache: dict):
    """A stage worker's writable view of the producer's cache rows (``cache``: `ServedCache.wire`)."""
    from .cache import CacheLayout, CacheWriter

    layout = CacheLayout.from_wire(cache["layout"])
    if layout.rows_in_file:
        return CacheWriter(cache["path"], layout)
    from .device import DeviceRowsWriter

    return DeviceRowsWriter(RingLayout.from_wire(cache["rows"]), layout.sample_bytes)


def attach_ring(layout: RingLayout):
    if layout.kind == RingKind.HOST:
        return HostRingView(layout)
    if layout.kind == RingKind.DEVICE:
        from .device import DeviceRingView

        return DeviceRingView(layout)
    raise ProtocolError(f"the producer serves a ring of kind {layout.kind!r}, which this dalishare cannot map; upgrade it")

