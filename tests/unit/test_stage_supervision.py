"""The stage worker's supervision as plain objects: the restart policy, the probes' verdict, the feed
that re-makes lost batches, and the link's wire. No DALI, no subprocesses."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import numpy as np
import pytest

from dalishare.errors import ProtocolError
from dalishare.producer.dataset import Dataset
from dalishare.producer.feed import EpochFeed
from dalishare.producer.restarts import MAX_UNEXPLAINED_FAILURES, CrashLoop, judge
from dalishare.wire.stage import Filled, Probed, StageLink, Task


def test_failures_that_files_explain_restart_at_once_and_never_add_up():
    loop = CrashLoop(limit=3, backoff=0.5)
    assert [loop.failed(explained=True) for _ in range(10)] == [0.0] * 10
    assert loop.in_a_row == 0


def test_unexplained_failures_back_off_doubling_and_give_up_after_the_limit_in_a_row():
    loop = CrashLoop(limit=4, backoff=0.5)
    assert [loop.failed(explained=False) for _ in range(3)] == [0.5, 1.0, 2.0]
    assert loop.failed(explained=False) is None  # the 4th in a row: give up
    assert MAX_UNEXPLAINED_FAILURES >= 2


def test_a_filled_batch_ends_a_row_of_unexplained_failures():
    loop = CrashLoop(limit=2, backoff=1.0)
    assert loop.failed(explained=False) == 1.0
    loop.succeeded()
    assert loop.failed(explained=False) == 1.0  # a new row, not the 2nd of the old one


def test_the_files_that_fail_alone_are_the_culprits():
    assert judge([1, 2, 3, 4], {2: "crashed the decoder: SIGSEGV"}, stage_works=False) == {2: "crashed the decoder: SIGSEGV"}
    assert judge([1, 2], {1: "bad"}, stage_works=True) == {1: "bad"}


def test_without_a_control_that_decoded_a_round_where_everything_fails_blames_no_file():
    assert judge([1, 2, 3], {1: "x", 2: "x", 3: "x"}, stage_works=False) == {}
    assert judge([1, 2, 3], {1: "x", 2: "x", 3: "x"}, stage_works=True) == {1: "x", 2: "x", 3: "x"}
    assert judge([1], {1: "x"}, stage_works=False) == {1: "x"}  # one file alone cannot tell: blame it


def test_a_file_that_cannot_be_read_is_always_its_own_fault():
    gone = {1: "FileNotFoundError: x", 2: "FileNotFoundError: y"}
    assert judge([1, 2], gone, stage_works=False, unreadable={1, 2}) == gone
    assert judge([1, 2, 3], gone | {3: "bad"}, stage_works=False, unreadable={1, 2}) == gone | {3: "bad"}


def _dataset(n: int) -> Dataset:
    return Dataset(Path("/nowhere"), ["a"], [Path(f"/nowhere/a/{i}.jpg") for i in range(n)], np.zeros(n, np.int64))


def test_the_feed_cuts_epochs_into_plans_and_says_which_epoch_comes_next():
    feed = EpochFeed(_dataset(10), batch_size=4, seed=0)
    plans = [feed.next_plan() for _ in range(3)]
    assert [len(p.indices) for p in plans] == [4, 4, 2] and [p.last for p in plans] == [False, False, True]
    assert sorted(np.concatenate([p.indices for p in plans]).tolist()) == list(range(10))
    assert feed.next_epoch() == 1
    assert feed.next_plan().epoch == 1


def test_lost_plans_are_made_again_without_their_culprits_and_the_served_samples_keep_their_places():
    feed = EpochFeed(_dataset(12), batch_size=4, seed=0)
    served = feed.next_plan()
    lost = [feed.next_plan(), feed.next_plan()]
    culprit = int(lost[1].indices[2])
    feed.exclude(culprit, "crashed the decoder: SIGSEGV")
    feed.rewind(lost[0])
    again = [feed.next_plan(), feed.next_plan()]
    assert again[0].start == 4 and again[0].indices.tolist() == lost[0].indices.tolist()
    rest = [i for p in lost for i in p.indices.tolist() if i != culprit]
    assert [i for p in again for i in p.indices.tolist()] == rest and again[1].last
    assert again[1].order.tolist()[:4] == served.indices.tolist()


def test_stage_messages_cross_the_link_and_a_gone_peer_reads_as_eof():
    mine, theirs_fd = StageLink.pair()
    theirs = StageLink(theirs_fd)
    try:
        assert mine.send(Task(seq=3, slot=1, files=["/a.jpg", "/b.jpg"] * 1000, rows=[]))  # any size
        assert theirs.receive(timeout=5) == Task(3, 1, ["/a.jpg", "/b.jpg"] * 1000, [])
        assert theirs.send(Probed(index=0, error="", unreadable=False))
        assert mine.receive(timeout=5) == Probed(0, "", False)
        assert mine.receive(timeout=0) is None
    finally:
        theirs.close()
    with pytest.raises(EOFError):
        mine.receive(timeout=5)
    mine.close()


def test_a_malformed_stage_message_is_a_protocol_error():
    a, b_fd = StageLink.pair()
    b = StageLink(b_fd)
    try:
        for body in ({"t": "filled", "seq": 1}, {"t": "filled", "seq": "1", "slot": 0, "sample_shape": [], "dtype": ""},
                     {"t": "hello", "pid": os.getpid()}):
            b._conn.send_bytes(msgpack.packb(body))
            with pytest.raises(ProtocolError):
                a.receive(timeout=5)
        b.send(Filled(1, 0, [2, 2, 3], "uint8"))
        assert a.receive(timeout=5) == Filled(1, 0, [2, 2, 3], "uint8")
    finally:
        a.close()
        b.close()
