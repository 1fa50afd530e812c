"""The producer's slot table and job registry as plain objects: holds, suspension, who is dead,
who to probe, who stalls. No DALI, no sockets, no subprocesses."""

from __future__ import annotations

import pytest

from dalishare.producer.jobs import JobRegistry, JobState
from dalishare.producer.slots import SlotTable
from dalishare.wire.messages import Batch


def batch(seq: int, slot: int, epoch: int = 0, last: bool = False) -> Batch:
    return Batch(seq=seq, slot=slot, epoch=epoch, start=seq * 4, count=4, last=last, epoch_size=32, excluded=0,
                 labels=b"", indices=b"", sent_ns=0)


def write(table: SlotTable, k: int, b: Batch) -> None:
    """Slot k goes to the stage worker for batch ``b`` and comes back filled."""
    table.reserve(k, b.seq)
    table.fill(k, b)


def filled(count: int, holders: dict[int, list[int]]) -> SlotTable:
    """A table whose slot k holds batch k, held by the jobs listed for it."""
    table = SlotTable(count)
    for k in range(count):
        write(table, k, batch(k, k))
        for job in holders.get(k, []):
            table.hold(k, job, now=0.0)
    return table


def test_the_free_slot_is_the_one_holding_the_oldest_batch_and_held_slots_are_never_free():
    table = SlotTable(3)
    assert table.free_slot() == 0  # never written
    for k in range(3):
        write(table, k, batch(10 + k, k))
    table.hold(0, job_id=1, now=0.0)
    assert table.free_slot() == 1
    table.hold(1, job_id=1, now=0.0)
    table.hold(2, job_id=2, now=0.0)
    assert table.free_slot() is None


def test_a_slot_is_free_once_every_holder_released_it_left_or_died():
    table = filled(2, {0: [1, 2]})
    assert table.release(1, seq=0) and table.free_slot() == 1
    assert not table.release(1, seq=0)  # twice: nothing more to release
    table.forget(2)
    assert table.holders() == set() and table.held_count() == 0


def test_a_held_slot_is_never_given_to_the_worker_and_a_slot_is_filled_only_by_its_task():
    table = filled(1, {0: [1]})
    with pytest.raises(RuntimeError, match="hold it"):
        table.reserve(0, 5)
    table.release(1, seq=0)
    table.reserve(0, 5)
    assert table.free_slot() is None and table.slots[0].batch is None  # being written: not free, not resident
    with pytest.raises(RuntimeError, match="reserved for 5"):
        table.fill(0, batch(6, 0))
    table.fill(0, batch(5, 0))
    assert table.free_slot() == 0 and table.slots[0].batch.seq == 5


def test_a_slot_whose_task_was_lost_is_free_again_and_holds_nothing():
    table = SlotTable(2)
    write(table, 0, batch(0, 0))
    table.reserve(1, 1)
    table.unreserve(1)
    assert table.free_slot() == 1 and table.slots[1].batch is None
    assert table.resident_after(-1) == [0]


def test_suspension_keeps_the_oldest_k_holds_and_frees_the_rest():
    table = filled(6, {k: [7] for k in range(6)} | {5: [7, 8]})
    assert table.suspend(7, keep=4) == [0, 1, 2, 3]
    assert table.held_by(7) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert table.held_by(8) == [(5, 5)]
    assert table.free_slot() == 4


def test_unread_batches_are_the_held_ones_newer_than_what_the_job_has_taken():
    table = filled(4, {k: [1] for k in range(4)})
    assert table.unread(1, taken=1) == [2, 3]
    assert table.unread(1, taken=3) == []


def test_resident_batches_of_the_current_epoch_and_after_a_seq():
    table = SlotTable(4)
    for k, (epoch, last) in enumerate([(0, False), (0, True), (1, False), (1, False)]):
        write(table, k, batch(k, k, epoch, last))
    assert table.resident_of_current_epoch() == [2, 3]
    assert table.resident_after(1) == [2, 3]
    write(table, 3, batch(3, 3, 1, last=True))
    assert table.resident_of_current_epoch() == []  # the epoch is complete: a late job starts the next


def registry(alive: set[int] | None = None) -> JobRegistry:
    return JobRegistry(alive=lambda job: job.pid in (alive or set()))


def test_jobs_get_distinct_random_ids_and_a_dead_pid_is_a_dead_job():
    jobs = registry(alive={100})
    a, b = jobs.add(100, b"a", keep=2, now=0.0), jobs.add(101, b"b", keep=2, now=0.0)
    assert a.id != b.id and jobs.get(a.id) is a and len(jobs) == 2
    assert jobs.dead() == [b]
    assert jobs.remove(b) and not jobs.remove(b) and len(jobs) == 1


def test_a_silent_job_is_probed_once_per_heartbeat_timeout():
    jobs = registry()
    job = jobs.add(1, b"a", keep=2, now=0.0)
    assert jobs.to_probe(now=5.0, heartbeat_timeout=10.0) == []
    assert jobs.to_probe(now=11.0, heartbeat_timeout=10.0) == [job]
    assert jobs.to_probe(now=12.0, heartbeat_timeout=10.0) == []  # probed at 11: next at 21
    assert jobs.to_probe(now=21.0, heartbeat_timeout=10.0) == [job]
    jobs.heard_from(job, now=21.5)
    assert jobs.to_probe(now=25.0, heartbeat_timeout=10.0) == []


def test_a_job_that_holds_the_others_back_past_the_stall_timeout_is_a_staller():
    jobs = registry()
    staller, waiter = jobs.add(1, b"s", keep=2, now=0.0), jobs.add(2, b"w", keep=2, now=0.0)
    s, w = staller.id, waiter.id
    table = filled(4, {0: [s, w], 1: [s, w], 2: [s], 3: [s]})
    waiter.taken = staller.taken = 1  # both began batch 1; the waiter released 2 and 3 (it has no more)
    assert jobs.stallers(table, now=5.0, stall_timeout=30.0) == []  # not long enough
    assert jobs.stallers(table, now=31.0, stall_timeout=30.0) == [staller]  # the waiter holds 0-1, read
    jobs.progressed(staller, now=31.0)
    assert jobs.stallers(table, now=32.0, stall_timeout=30.0) == []  # it released something


def test_nobody_is_a_staller_while_every_job_still_has_unread_batches():
    jobs = registry()
    a, b = jobs.add(1, b"a", keep=2, now=0.0), jobs.add(2, b"b", keep=2, now=0.0)
    table = filled(2, {0: [a.id, b.id], 1: [a.id, b.id]})
    a.taken = b.taken = 0  # both have batch 1 still to read: nobody waits
    assert jobs.stallers(table, now=100.0, stall_timeout=30.0) == []


def test_suspend_and_resume_follow_the_allowed_transitions():
    jobs = registry()
    job = jobs.add(1, b"a", keep=2, now=0.0)
    assert not jobs.resume(job, now=1.0)  # ACTIVE cannot resume
    jobs.suspend(job)
    assert job.state is JobState.SUSPENDED and jobs.active() == []
    assert jobs.resume(job, now=2.0) and job.state is JobState.ACTIVE and job.last_progress == 2.0


def test_a_group_starts_at_a_resident_epoch_start_only_if_the_epoch_is_unbroken_from_there():
    from dalishare.producer.slots import SlotTable
    from dalishare.wire.messages import Batch

    def batch(seq, epoch, start, count=4, last=False):
        return Batch(seq=seq, slot=0, epoch=epoch, start=start, count=count, last=last, epoch_size=12, excluded=0,
                     labels=b"", indices=b"", sent_ns=0)

    table = SlotTable(4)
    for k, b in enumerate([batch(5, 1, 4), batch(6, 1, 8, last=True), batch(7, 2, 0), batch(8, 2, 4)]):
        table.reserve(k, b.seq)
        table.fill(k, b)
    assert table.epoch_from_start() == [2, 3]  # epoch 2 from its first batch
    table.reserve(2, 9)  # its first batch overwritten: no whole epoch resident
    assert table.epoch_from_start() == []
