"""The producer's slot table: which batch each ring slot holds and which jobs still hold it.

Plain Python, no sockets and no memory: the one place where the holders that NOTE [ Slot
ownership ] (shm/__init__.py) governs are changed. A slot may be written only while nobody holds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..wire.messages import Batch


@dataclass
class Slot:
    batch: Batch | None = None  # the batch the slot holds now; None until first written
    holders: dict[int, float] = field(default_factory=dict)  # job id -> when it was sent; cleared by release
    writing: int | None = None  # seq of the task the stage worker fills it with; None once filled or lost


class SlotTable:
    """Ring slots by index, with their batches and holders."""

    def __init__(self, count: int):
        self.slots = [Slot() for _ in range(count)]

    def free_slot(self) -> int | None:
        """The free slot holding the oldest batch (the newest stay resident for late jobs), or None.
        A slot is free when no job holds it and the stage worker is not writing it."""
        free = [k for k, s in enumerate(self.slots) if not s.holders and s.writing is None]
        return min(free, key=lambda k: self.slots[k].batch.seq if self.slots[k].batch else -1, default=None)

    def reserve(self, k: int, seq: int) -> None:
        """The stage worker is given free slot ``k`` to write task ``seq`` into: its old batch is gone."""
        slot = self.slots[k]
        if slot.holders or slot.writing is not None:
            raise RuntimeError(f"slot {k} is given to the stage worker while jobs {sorted(slot.holders)} "
                               f"hold it or task {slot.writing} writes it")
        slot.batch, slot.writing = None, seq

    def unreserve(self, k: int) -> None:
        """The task writing slot ``k`` was lost with its worker: the slot is free, holding nothing."""
        self.slots[k].writing = None

    def fill(self, k: int, batch: Batch) -> None:
        """Slot ``k`` now holds ``batch``, written by the task it was reserved for."""
        slot = self.slots[k]
        if slot.writing != batch.seq or slot.holders:
            raise RuntimeError(f"slot {k} filled with batch {batch.seq}, but it was reserved for {slot.writing} "
                               f"(holders {sorted(slot.holders)})")
        slot.batch, slot.writing = batch, None

    def hold(self, k: int, job_id: int, now: float) -> None:
        """``job_id`` was sent the announcement of slot ``k``."""
        self.slots[k].holders[job_id] = now

    def release(self, job_id: int, seq: int) -> bool:
        """The job released batch ``seq``; False if no slot holds that batch for it any more."""
        for slot in self.slots:
            if slot.batch is not None and slot.batch.seq == seq and job_id in slot.holders:
                del slot.holders[job_id]
                return True
        return False

    def forget(self, job_id: int) -> None:
        """The job is gone (left, died, unreachable): it holds nothing any more."""
        for slot in self.slots:
            slot.holders.pop(job_id, None)

    def held_by(self, job_id: int) -> list[tuple[int, int]]:
        """``(seq, slot)`` of every batch the job holds, oldest first."""
        return sorted((s.batch.seq, k) for k, s in enumerate(self.slots) if job_id in s.holders)

    def unread(self, job_id: int, taken: int) -> list[int]:
        """Seqs the job holds beyond ``taken``, the newest batch it has begun to read."""
        return [seq for seq, _ in self.held_by(job_id) if seq > taken]

    def suspend(self, job_id: int, keep: int) -> list[int]:
        """Keep the job's ``keep`` oldest holds (what it may be reading), drop the others; the kept seqs."""
        held = self.held_by(job_id)
        for _, k in held[keep:]:
            del self.slots[k].holders[job_id]
        return [seq for seq, _ in held[:keep]]

    def holders(self) -> set[int]:
        return {job_id for slot in self.slots for job_id in slot.holders}

    def in_use(self) -> int:
        """Slots a job holds or the stage worker writes."""
        return sum(1 for s in self.slots if s.holders or s.writing is not None)

    def pacers(self) -> set[int]:
        """With no free slot, the jobs the producer waits for: the holders of the oldest held batch."""
        if self.free_slot() is not None:
            return set()
        held = [s for s in self.slots if s.holders and s.batch is not None]
        return set(min(held, key=lambda s: s.batch.seq).holders) if held else set()

    def held_count(self) -> int:
        return sum(len(slot.holders) for slot in self.slots)

    def resident_of_current_epoch(self) -> list[int]:
        """Slots still holding batches of an unfinished epoch, oldest first: what a late job may still read."""
        filled = sorted((k for k, s in enumerate(self.slots) if s.batch is not None), key=lambda k: self.slots[k].batch.seq)
        if not filled or self.slots[filled[-1]].batch.last:
            return []
        epoch = self.slots[filled[-1]].batch.epoch
        return [k for k in filled if self.slots[k].batch.epoch == epoch]

    def epoch_from_start(self) -> list[int]:
        """Slots holding an epoch from its first batch on, unbroken up to the newest batch, oldest
        first, or []: where a consumer group can start now with a whole epoch."""
        filled = sorted((k for k, s in enumerate(self.slots) if s.batch is not None), key=lambda k: self.slots[k].batch.seq)
        for i, k in enumerate(filled):
            run = [self.slots[j].batch for j in filled[i:]]
            if run[0].start == 0 and all(b.epoch == a.epoch and b.start == a.start + a.count
                                         or a.last and b.epoch == a.epoch + 1 and b.start == 0
                                         for a, b in zip(run, run[1:])):
                return filled[i:]
        return []

    def resident_after(self, seq: int) -> list[int]:
        """Slots holding batches newer than ``seq``, oldest first (what a resumed job gets again)."""
        return sorted((k for k, s in enumerate(self.slots) if s.batch is not None and s.batch.seq > seq),
                      key=lambda k: self.slots[k].batch.seq)
