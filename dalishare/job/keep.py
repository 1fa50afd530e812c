"""When a job may give back a slot it has read: the ``keep`` rule of NOTE [ Slot ownership ] in shm/__init__.py.

A view yielded at step ``s`` (the job's ``s``-th batch, counting from 0) stays valid while the job
may still be using it. Every yielded view has its own storage (views.py), so the job knows whether
anything still refers to it: the batch dict, a tensor derived from it (a slice, a permute, an
augmentation's output that is a view), a NumPy array or DLPack capsule made from it, or autograd's
saved tensors. A consumed slot is given back at the job's next step (or while it waits for a batch)
once none of its views is referenced. While one still is, the slot stays held, at the longest until
the job has taken ``keep`` further batches; a view still referenced after that is a broken contract,
and `BatchHeldTooLong` is raised before the slot is given back, so its pixels never change under it.

``keep=0`` is the unchecked fast mode: a slot is given back at the next step whether or not its
views are referenced (a ``for batch in loader`` loop still holds the previous batch while asking
for the next one, so no check is possible there).

Plain object, no sockets and no torch: tests drive it with any weak-referenceable lease.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field

from ..errors import BatchHeldTooLong


@dataclass
class _Read:
    """A producer batch (by seq) the job has begun to read, and the views of it it yielded."""

    consumed: bool = False  # the job has taken all its samples: no more views will come from it
    views: list[tuple[int, weakref.ref]] = field(default_factory=list)  # (step yielded, its lease)

    def live_views(self) -> list[int]:
        """Steps of the views still referenced."""
        return [step for step, lease in self.views if lease() is not None]


class KeepWindow:
    """The slots a job still holds after reading them, and when each may be given back."""

    def __init__(self, keep: int):
        if keep < 0:
            raise ValueError(f"keep must be 0 or more, got {keep}")
        self.keep = keep
        self.step = 0  # steps taken: the batch being made now is step ``self.step``
        self._reads: dict[int, _Read] = {}  # seq -> what was read of it; insertion order = seq order

    def viewed(self, seq: int, lease) -> None:
        """A view of producer batch ``seq`` is yielded at the current step; ``lease`` lives exactly as
        long as anything refers to that view."""
        self._reads.setdefault(seq, _Read()).views.append((self.step, weakref.ref(lease)))

    def consumed(self, seq: int) -> None:
        """The job has taken every sample of ``seq``; it may be given back once its views allow."""
        self._reads.setdefault(seq, _Read()).consumed = True

    def stepped(self) -> None:
        """The job has taken one more batch."""
        self.step += 1

    @property
    def held(self) -> int:
        """Slots read but not given back yet."""
        return len(self._reads)

    def releasable(self) -> list[int]:
        """Seqs of consumed batches that may be given back now, oldest first; removes them.

        Raises `BatchHeldTooLong` (and gives nothing back) when a view is still referenced after
        the job took ``keep`` further batches."""
        free, overdue = [], []
        for seq, read in self._reads.items():
            if not read.consumed:
                continue
            # keep=0: unchecked, but never before the step that yielded the view is over
            live = read.live_views() if self.keep else [step for step, _ in read.views if step >= self.step]
            if not live:
                free.append(seq)
            elif max(live) + self.keep < self.step:
                overdue.append(seq)
        if overdue:
            gc.collect()  # a reference cycle may be all that keeps a view alive
            still = [seq for seq in overdue if self._reads[seq].live_views()]
            free += [seq for seq in overdue if seq not in still]
            if still:
                self._raise_overdue(still[0])
        for seq in sorted(free):
            del self._reads[seq]
        return sorted(free)

    def _raise_overdue(self, seq: int) -> None:
        step = max(self._reads[seq].live_views())
        raise BatchHeldTooLong(
            f"the batch yielded at step {step} is still referenced while this job takes batch {self.step}: "
            f"keep={self.keep} lets a batch stay in use across the {self.keep} batches after it, not longer. "
            f"Its slot is not given back, so its pixels are unchanged, but the job cannot go on without it: "
            f"`.clone()` what you keep longer, or pass `copy=True`, or a larger `keep=` to DaliShareIterator "
            f"(the producer then needs `--slots` of at least keep + 2)")

    def take_all(self) -> list[int]:
        """Every seq still held, oldest first, checked or not (the job is leaving)."""
        seqs = list(self._reads)
        self._reads.clear()
        return seqs

    def forget(self) -> None:
        """Drop everything (the producer is gone: its seqs mean nothing to the next one)."""
        self._reads.clear()
