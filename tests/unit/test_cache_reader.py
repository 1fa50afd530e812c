"""The cache reader with a fake session and a cache of plain arrays (tests/unit/fakes_job.py): each
pass is one epoch in the job's order; excluded samples are skipped in a whole epoch and repeated
(flagged) in a share; MISSING samples are waited for; a resume starts exactly where a state says."""

import numpy as np
import pytest

from dalishare.errors import DatasetError, ProducerLost
from dalishare.job import cache_reader
from dalishare.job.cache_reader import CacheReader
from dalishare.job.group import Membership
from dalishare.job.reading import ReadOptions
from dalishare.shm.cache import Mark
from dalishare.wire.order import epoch_order, share

from fakes_job import FakeCache, FakeSession, samples_of

V, X, M = Mark.VALID, Mark.EXCLUDED, Mark.MISSING


def reader_for(samples=10, marks=None, options=ReadOptions(batch_size=4), **session):
    cache, fake = FakeCache(samples, marks), FakeSession(epoch_size=samples, **session)
    return CacheReader(fake, cache, options), fake, cache


def read_pass(reader, resume=None):
    start = reader.begin_pass(resume)
    batches = []
    while (batch := reader.next_batch()) is not None:
        assert samples_of(batch) == batch["indices"].tolist()  # gathered rows are the samples named
        batches.append({"indices": batch["indices"].tolist(), "position": reader.position,
                        "labels": batch["labels"].tolist(),
                        **({"padded": batch["padded"].tolist()} if "padded" in batch else {})})
    reader.end_pass()
    return start, batches


def test_each_pass_is_the_next_epoch_in_the_producers_order_with_a_smaller_last_batch():
    reader, session, _ = reader_for(seed=5)
    for epoch in (0, 1):
        start, batches = read_pass(reader)
        order = epoch_order(10, 5, epoch).tolist()
        assert start == (epoch, 0)
        assert [b["indices"] for b in batches] == [order[0:4], order[4:8], order[8:10]]
        assert [b["position"] for b in batches] == [4, 8, 10] and reader.epoch_read
        assert all(b["labels"] == [i % 3 for i in b["indices"]] for b in batches)
        assert all("padded" not in b for b in batches)
    assert session.epochs_done == [1, 2] and reader.passes == 2  # EpochDone counts each pass


def test_a_jobs_own_seed_orders_its_epochs_and_the_producers_epochs_end_its_passes():
    reader, session, _ = reader_for(options=ReadOptions(batch_size=4, seed=9), epochs=1)
    _, batches = read_pass(reader)
    assert [i for b in batches for i in b["indices"]] == epoch_order(10, 9, 0).tolist()
    assert reader.begin_pass(None) is None and session.stop_reason == "finished 1 epochs"


def test_a_whole_epoch_skips_excluded_samples_and_keeps_its_batches_full():
    marks = [V, X, V, V, X, V, V, V, V, X]
    reader, session, _ = reader_for(marks=marks)
    _, batches = read_pass(reader)
    readable = [i for i in epoch_order(10, 0, 0).tolist() if marks[i] == V]
    assert [b["indices"] for b in batches] == [readable[:4], readable[4:]]
    assert reader.samples_per_epoch == 7 and session.counters.excluded == 3


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_share_is_distributed_samplers_cut_and_repeats_excluded_samples_flagged(drop_last):
    marks = [V] * 10
    order = epoch_order(10, 0, 0)
    mine, pads = share(order, 1, 3, drop_last)
    marks[int(mine[1])] = X  # the rank's second sample cannot be decoded
    options = ReadOptions(batch_size=2, member=Membership("g", 1, 3, drop_last), drop_last=drop_last)
    reader, _, _ = reader_for(marks=marks, options=options)
    assert reader.samples_per_epoch == len(mine) == (3 if drop_last else 4)
    _, batches = read_pass(reader)
    got = [i for b in batches for i in b["indices"]]
    flags = [p for b in batches for p in b["padded"]]
    expected = mine.tolist()
    expected[1] = expected[0]  # repeated: the first readable sample of its batch
    assert got == expected and flags == [False, True] + pads[2:].tolist()
    assert reader.samples_per_epoch == len(mine)  # a share keeps its size


def test_a_share_whose_batch_has_nothing_readable_repeats_the_sample_before_or_says_why_not():
    options = ReadOptions(batch_size=2, member=Membership("g", 0, 1, False))
    order = epoch_order(6, 0, 0).tolist()
    marks = [V] * 6
    marks[order[2]] = marks[order[3]] = X
    reader, _, _ = reader_for(samples=6, marks=marks, options=options)
    _, batches = read_pass(reader)
    assert batches[1]["indices"] == [order[1], order[1]] and batches[1]["padded"] == [True, True]
    marks = [V] * 6
    marks[order[0]] = marks[order[1]] = X
    reader, _, _ = reader_for(samples=6, marks=marks, options=options)
    reader.begin_pass(None)
    with pytest.raises(DatasetError, match="none of the samples before its batch at 0"):
        reader.next_batch()


def test_missing_samples_are_waited_for_and_a_stopped_producer_ends_the_pass(monkeypatch):
    monkeypatch.setattr(cache_reader, "CACHE_POLL_S", 0.0)
    order = epoch_order(10, 0, 0).tolist()
    marks = [M] * 10
    reader, session, cache = reader_for(marks=marks)

    def fill_next():  # the producer fills one sample, in the order, each time the job looks
        missing = [i for i in order if cache.marks[i] == M]
        if missing:
            cache.marks[missing[0]] = X if missing[0] == order[5] else V

    session.on_poll = fill_next
    _, batches = read_pass(reader)
    assert [i for b in batches for i in b["indices"]] == [i for i in order if i != order[5]]
    assert all(m != M for m in cache.marks) and reader.epoch_read
    # the producer stops while the job waits: the pass ends there, its epoch not read
    marks = np.full(10, M, dtype=np.uint8)
    marks[order[:4]] = V
    reader, session, cache = reader_for(marks=marks)
    session.on_poll = lambda: session.polls > 1 and setattr(session, "stop_reason", "stopped")
    start, batches = read_pass(reader)
    assert start == (0, 0) and [b["indices"] for b in batches] == [order[:4]] and not reader.epoch_read


def test_a_fill_that_makes_no_progress_is_a_clear_error_not_a_hang(monkeypatch):
    monkeypatch.setattr(cache_reader, "PRODUCER_POLL_S", 0.001)
    monkeypatch.setattr(cache_reader, "CACHE_POLL_S", 0.001)
    reader, _, _ = reader_for(marks=[M] * 10, options=ReadOptions(batch_size=4, batch_timeout=0.02))
    reader.begin_pass(None)
    with pytest.raises(ProducerLost, match="filled no sample of its cache for 0 s"):
        reader.next_batch()


def test_a_resume_starts_exactly_at_the_saved_position_and_one_at_the_end_is_the_next_epoch():
    reader, _, _ = reader_for(seed=2)
    assert reader.resume_point(1, 6) == (1, 6) and reader.passes == 1
    start, batches = read_pass(reader, resume=(1, 6))
    order = epoch_order(10, 2, 1).tolist()
    assert start == (1, 6) and [b["indices"] for b in batches] == [order[6:10]]
    reader, _, _ = reader_for(seed=2)
    reader.resume_point(1, 10)  # saved after the epoch's last batch
    assert reader.begin_pass((1, 10)) == (2, 0)


def test_a_pass_left_by_a_break_counts_and_the_next_pass_is_the_next_epoch():
    reader, session, _ = reader_for()
    reader.begin_pass(None)
    reader.next_batch()
    assert reader.position == 4
    reader.end_pass()  # the iterator's finally, when the loop breaks
    assert reader.leave_last_pass() and session.epochs_done == [1]
    assert reader.begin_pass(None) == (1, 0)
    assert np.array_equal(reader.next_batch()["indices"].numpy(), epoch_order(10, 0, 1)[:4])
