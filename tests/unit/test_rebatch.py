"""The rebatcher as a plain object: how producer batches are cut into job batches (views inside one
producer batch, copies across them), where an epoch ends, and what a suspension skipped."""

from __future__ import annotations

import pytest

from dalishare.job.rebatch import Rebatcher
from dalishare.wire.messages import Batch


def announcements(sizes: list[int], epoch: int = 0, first_seq: int = 0, epoch_size: int | None = None) -> list[Batch]:
    """One epoch cut by the producer into batches of ``sizes`` (the last one marked last)."""
    out, start = [], 0
    for i, count in enumerate(sizes):
        out.append(Batch(seq=first_seq + i, slot=i % 4, epoch=epoch, start=start, count=count,
                         last=i == len(sizes) - 1, epoch_size=epoch_size or sum(sizes), excluded=0,
                         labels=b"", indices=b"", sent_ns=0))
        start += count
    return out


def cut(rebatcher: Rebatcher, stream: list[Batch]) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """Job batches of one pass: ("view" | "copy", [(seq, offset, count), ...])."""
    stream, batches = list(stream), []
    rebatcher.begin_epoch()
    while not rebatcher.epoch_over:
        if rebatcher.current is None:
            if not stream:
                rebatcher.end_epoch()
                break
            rebatcher.start(stream.pop(0))
        if rebatcher.next_is_view():
            p = rebatcher.take(rebatcher.batch_size)
            batches.append(("view", [(p.msg.seq, p.offset, p.count)]))
            continue
        pieces, need = [], rebatcher.batch_size
        while need and not rebatcher.epoch_over:
            if rebatcher.current is None:
                if not stream:
                    rebatcher.end_epoch()
                    break
                rebatcher.start(stream.pop(0))
            p = rebatcher.take(need)
            pieces.append((p.msg.seq, p.offset, p.count))
            need -= p.count
        batches.append(("copy", pieces))
    return batches


def test_job_batches_inside_a_producer_batch_are_views_and_across_them_copies():
    # producer batches of 8, 8, 8, 6 (30 samples); job batches of 5
    got = cut(Rebatcher(5), announcements([8, 8, 8, 6]))
    assert got == [("view", [(0, 0, 5)]), ("copy", [(0, 5, 3), (1, 0, 2)]), ("view", [(1, 2, 5)]),
                   ("copy", [(1, 7, 1), (2, 0, 4)]), ("copy", [(2, 4, 4), (3, 0, 1)]), ("view", [(3, 1, 5)])]


def test_every_sample_of_the_epoch_exactly_once_whatever_the_batch_size():
    stream = announcements([8, 8, 8, 6])
    for size in (1, 3, 4, 5, 7, 8, 11, 30, 100):
        got = cut(Rebatcher(size), stream)
        taken = [(seq, offset + i) for _, pieces in got for seq, offset, count in pieces for i in range(count)]
        assert len(taken) == len(set(taken)) == 30, size
        assert all(sum(c for _, _, c in pieces) == size for _, pieces in got[:-1]), size  # only the last is short


def test_the_rest_of_the_epochs_last_batch_is_one_view_smaller_than_the_batch_size():
    got = cut(Rebatcher(4), announcements([8, 8, 8, 6]))
    assert got[-2:] == [("view", [(3, 0, 4)]), ("view", [(3, 4, 2)])]


def test_a_batch_larger_than_the_epoch_is_cut_at_the_epochs_end():
    got = cut(Rebatcher(100), announcements([8, 8, 8, 6]))
    assert len(got) == 1 and got[0][0] == "copy" and sum(c for _, _, c in got[0][1]) == 30


def test_an_epoch_that_ends_without_a_last_batch_ends_the_pass_there():
    stream = announcements([8, 8, 8, 6])[:3]  # the tail was undecodable: no batch marked last
    got = cut(Rebatcher(5), stream)
    assert sum(c for _, pieces in got for _, _, c in pieces) == 24


def test_samples_skipped_by_a_suspension_are_counted_within_and_across_epochs():
    rebatcher = Rebatcher(8)
    first, *_, fourth = announcements([8, 8, 8, 6])
    assert rebatcher.start(first) == 0
    rebatcher.take(8)
    assert rebatcher.start(fourth) == 16  # batches 1 and 2 were voided
    rebatcher.take(6)
    two_epochs_later = announcements([8, 8, 8, 6], epoch=2, first_seq=8)[1]
    assert rebatcher.start(two_epochs_later) == 30 + 8  # all of epoch 1 and the first batch of epoch 2


def test_a_lost_batch_is_dropped_and_the_batch_size_must_be_positive():
    rebatcher = Rebatcher(4)
    rebatcher.start(announcements([8])[0])
    rebatcher.lose_current()
    assert rebatcher.current is None and rebatcher.remaining == 0
    with pytest.raises(ValueError):
        Rebatcher(0)
