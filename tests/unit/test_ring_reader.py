"""The ring reader with a fake session and a ring of plain NumPy slots (tests/unit/fakes_job.py):
what a pass yields (views, copies, sizes, the last partial batch), when its epoch ends, a group
rank's share and its tail, a sharded producer's flags, a resume, a pass left by a break, a batch
lost to a suspension."""

import numpy as np
import pytest
import torch

from dalishare.errors import BatchHeldTooLong
from dalishare.job.group import Membership
from dalishare.job.reading import ReadOptions, share_size
from dalishare.job.ring_reader import RingReader
from dalishare.wire.order import share

from fakes_job import FakeRing, FakeSession, epoch_stream, samples_of


def reader_for(stream_of, *, epoch_size=10, options=ReadOptions(batch_size=3), shard=(0, 1), slots=16, keep=2):
    ring = FakeRing(slots=slots)
    session = FakeSession(batch_size=4, epoch_size=epoch_size, shard=shard, keep=keep, stream=stream_of(ring))
    session.on_announce = ring.write
    return RingReader(session, ring, options), session, ring


def read_pass(reader, resume=None):
    """What a pass yields, batch by batch, as a loop that lets each batch go before the next sees it."""
    start = reader.begin_pass(resume)
    batches, positions = [], []
    while (batch := reader.next_batch()) is not None:
        batches.append({"indices": batch["indices"].tolist(), "labels": batch["labels"].tolist(),
                        "samples": samples_of(batch), "view": reader.ring.owns(batch["images"]),
                        **({"padded": batch["padded"].tolist()} if "padded" in batch else {})})
        positions.append(reader.position)
        del batch
    return start, batches, positions


def test_a_whole_epoch_is_views_inside_a_producer_batch_and_copies_across_them_with_a_smaller_last():
    order = [5, 2, 8, 0, 9, 1, 7, 3, 6, 4]
    reader, session, ring = reader_for(lambda ring: epoch_stream(ring, 0, order, 4))
    start, batches, positions = read_pass(reader)
    assert start == (0, 0)
    assert [b["indices"] for b in batches] == [order[0:3], order[3:6], order[6:9], order[9:]]
    assert [b["samples"] for b in batches] == [b["indices"] for b in batches]  # the pixels match
    assert [b["labels"] for b in batches] == [[i % 3 for i in b["indices"]] for b in batches]
    # inside producer batch 0: a view; across 0|1 and 1|2: copies; the rest of the last one: a view
    assert [b["view"] for b in batches] == [True, False, False, True]
    assert positions == [3, 6, 9, 10] and reader.epoch_read
    assert all("padded" not in b for b in batches)  # a whole epoch of an unsharded producer has no repeats
    assert session.window.step == 4 and session.read == 0  # the iterator counts what it hands out


def test_copy_true_gives_copies_the_job_owns_not_views_of_the_slot():
    order = list(range(8))
    reader, _, ring = reader_for(lambda ring: epoch_stream(ring, 0, order, 4),
                                 options=ReadOptions(batch_size=4, copy=True))
    _, batches, _ = read_pass(reader)
    assert [b["view"] for b in batches] == [False, False]
    assert [b["samples"] for b in batches] == [order[:4], order[4:]]


def test_slots_are_given_back_once_read_and_no_view_of_them_is_referenced():
    reader, session, _ = reader_for(lambda ring: epoch_stream(ring, 0, list(range(12)), 4),
                                    options=ReadOptions(batch_size=4))
    reader.begin_pass(None)
    first = reader.next_batch()
    second = reader.next_batch()
    assert session.released == []  # the first batch's view is still referenced
    del first
    third = reader.next_batch()
    assert session.released == [0] and third["indices"].tolist() == [8, 9, 10, 11]
    del second, third
    assert reader.next_batch() is None and session.released == [0, 1, 2]


def test_a_pass_cut_short_by_the_producer_stopping_has_not_read_its_epoch():
    stream = lambda ring: epoch_stream(ring, 0, list(range(10)), 4)[:2]  # noqa: E731 - stops before the last batch
    reader, _, _ = reader_for(stream)
    _, batches, _ = read_pass(reader)
    assert [b["indices"] for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert not reader.epoch_read


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_group_rank_takes_every_worlds_sample_and_evens_its_tail_with_a_flagged_repeat(drop_last):
    order = list(range(100, 110))
    per_rank = share_size(10, 3, drop_last)
    for samples in range(1, 12):  # the size rule is share()'s, without building the share
        for parts in (1, 2, 3, 4):
            assert share_size(samples, parts, drop_last) == len(share(np.arange(samples), 0, parts, drop_last)[0])
    assert per_rank == len(share(np.arange(10), 0, 3, drop_last)[0]) == (3 if drop_last else 4)
    got = {}
    for rank in range(3):
        options = ReadOptions(batch_size=3, member=Membership("g", rank, 3, drop_last), drop_last=drop_last)
        reader, _, ring = reader_for(lambda ring: epoch_stream(ring, 0, order, 4), options=options)
        assert reader.samples_per_epoch == per_rank
        _, batches, _ = read_pass(reader)
        assert not any(b["view"] for b in batches)  # a share is copied
        got[rank] = ([i for b in batches for i in b["indices"]], [p for b in batches for p in b["padded"]],
                     [i for b in batches for i in b["samples"]])
    # positions p % 3 == rank, DistributedSampler's cut; the ring repeats the rank's last sample
    if drop_last:
        assert got == {0: ([100, 103, 106], [False] * 3, [100, 103, 106]),
                       1: ([101, 104, 107], [False] * 3, [101, 104, 107]),
                       2: ([102, 105, 108], [False] * 3, [102, 105, 108])}
    else:
        assert got == {0: ([100, 103, 106, 109], [False] * 4, [100, 103, 106, 109]),
                       1: ([101, 104, 107, 107], [False] * 3 + [True], [101, 104, 107, 107]),
                       2: ([102, 105, 108, 108], [False] * 3 + [True], [102, 105, 108, 108])}


def test_a_sharded_producers_repeats_are_flagged_in_a_whole_epoch():
    order, flags = [4, 7, 1, 9, 4], [0, 0, 0, 0, 1]  # the node's share, its last a repeat
    reader, _, _ = reader_for(lambda ring: epoch_stream(ring, 0, order, 4, padded=flags), epoch_size=5,
                              shard=(1, 2))
    _, batches, _ = read_pass(reader)
    assert [b["padded"] for b in batches] == [[False] * 3, [False, True]]


def test_a_resumed_pass_gives_back_unread_what_the_job_had_and_reads_the_rest():
    reader, session, _ = reader_for(lambda ring: epoch_stream(ring, 0, list(range(10)), 4))
    start, batches, positions = read_pass(reader, resume=(0, 5))
    assert start == (0, 5)
    assert [b["indices"] for b in batches] == [[5, 6, 7], [8, 9]]
    assert positions == [8, 10] and 0 in session.released  # producer batch 0: all of it read before
    # a position in another epoch means nothing in this one; a group starts at the epoch's start
    reader, _, _ = reader_for(lambda ring: epoch_stream(ring, 1, list(range(10)), 4))
    assert read_pass(reader, resume=(0, 5))[0] == (1, 0)
    assert reader.resume_point(0, 5) == (0, 5)
    member = ReadOptions(batch_size=3, member=Membership("g", 0, 2, False))
    assert reader_for(lambda ring: [], options=member)[0].resume_point(0, 5) == (0, 0)


def test_a_new_pass_after_a_break_gives_back_the_rest_of_the_epoch_and_reads_the_next():
    reader, session, _ = reader_for(lambda ring: epoch_stream(ring, 0, list(range(10)), 4)
                                    + epoch_stream(ring, 1, list(range(10, 20)), 4, seq=3))
    reader.begin_pass(None)
    assert reader.next_batch()["indices"].tolist() == [0, 1, 2]  # and the loop breaks
    assert reader.position == 3  # where a state saved after the break says the job is
    assert reader.leave_last_pass()
    assert session.released == [0, 1, 2] and reader.position == 10
    start, batches, _ = read_pass(reader)
    assert start == (1, 0) and batches[0]["indices"] == [10, 11, 12]
    session.lost = "died"
    assert reader.leave_last_pass() and not reader.options.reconnect  # without reconnect: nothing to do
    reconnecting, other, _ = reader_for(lambda ring: [], options=ReadOptions(batch_size=3, reconnect=True))
    other.lost = "died"
    assert not reconnecting.leave_last_pass()


def test_a_batch_whose_slot_was_reused_is_skipped_and_counted_as_missed():
    def stream(ring):
        ring.overwritten.add(1)  # voided by a suspension still on its way
        return epoch_stream(ring, 0, list(range(12)), 4)

    reader, session, _ = reader_for(stream, options=ReadOptions(batch_size=4))
    _, batches, _ = read_pass(reader)
    assert [b["indices"] for b in batches] == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert session.counters.missed == 4 and session.suspension_waits == 1


def test_a_job_that_holds_every_slot_is_told_so_instead_of_waiting_forever():
    reader, _, _ = reader_for(lambda ring: epoch_stream(ring, 0, list(range(12)), 4), slots=2, keep=2,
                              options=ReadOptions(batch_size=4))
    reader.begin_pass(None)
    held = [reader.next_batch(), reader.next_batch()]  # views of both slots, still referenced
    with pytest.raises(BatchHeldTooLong, match="holds all 2 slots"):
        reader.next_batch()
    assert all(isinstance(b["images"], torch.Tensor) for b in held)


class DeviceLikeRing(FakeRing):
    """A ring whose memory the producer's GPU holds (its slots here: host arrays, for the test)."""

    device = 0
    mapped = True

    def close(self) -> None:
        super().close()
        self.mapped = False


def device_reader(monkeypatch, options):
    from dalishare.job import ring_reader

    monkeypatch.setattr(ring_reader, "slot_tensors", lambda ring: (
        [torch.from_numpy(m) for m in ring.memory], torch.device("cpu")))
    ring = DeviceLikeRing()
    session = FakeSession(batch_size=4, epoch_size=8, stream=epoch_stream(ring, 0, list(range(8)), 4))
    session.on_announce = ring.write
    return RingReader(session, ring, options), ring


@pytest.mark.parametrize("copy, views", [(None, False), (False, True), (True, False)])
def test_batches_of_a_gpu_ring_are_the_job_s_own_copies_unless_it_opts_into_views(monkeypatch, copy, views):
    # issue 20: CUDA IPC maps device memory writable, so a view would let one job change every job's pixels
    reader, ring = device_reader(monkeypatch, ReadOptions(batch_size=4, copy=copy))
    _, batches, _ = read_pass(reader)
    assert reader.copies is not views and [b["view"] for b in batches] == [views, views]
    assert [b["samples"] for b in batches] == [list(range(4)), list(range(4, 8))]


def test_a_stopping_producer_s_gpu_ring_is_unmapped_and_the_pass_ends_at_once(monkeypatch):
    reader, ring = device_reader(monkeypatch, ReadOptions(batch_size=2))
    reader.begin_pass(None)
    assert reader.next_batch()["indices"].tolist() == [0, 1]  # half of producer batch 0 is read
    assert reader.unmap_device_memory() and ring.closed
    assert reader.next_batch() is None  # the rest is not read: the producer is going away
    assert not reader.epoch_read
