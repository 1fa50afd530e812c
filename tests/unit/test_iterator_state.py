"""`DaliShareIterator`'s resume state (torchdata's StatefulDataLoader rule) over fake sessions: the
state is where the last pass is, inside the loop or after a ``break``; a job that loads it reads on
from there; a new pass without it is the next epoch; ``--epochs`` counts each pass once."""

import pytest
import torch

from dalishare.job import cache_reader, iterator
from dalishare.job.cache_reader import CacheReader
from dalishare.job.ring_reader import RingReader
from dalishare.wire.order import epoch_order

from fakes_job import FakeCache, FakeRing, FakeSession, epoch_stream

N = 10
FINGERPRINT = {"dataset": "d", "samples": N, "stage": "s", "output": "o", "seed": 0, "shards": 1}


@pytest.fixture
def attach(monkeypatch):
    """``attach(source)``: the next DaliShareIterator attaches to a fake producer serving a cache
    of N samples, or a ring streaming epochs 0 and 1 (order 0..N-1) in producer batches of 4."""
    opened = []

    def attach_to(source: str):
        def open_session(name, endpoint, options, *, keep, timeout, heartbeat_interval, counters):
            session = FakeSession(batch_size=4, epoch_size=N, keep=keep)
            session.counters, session.fingerprint = counters, {**FINGERPRINT, "source": source}
            session.channel, session.classes, session.suspensions = object(), ["a", "b", "c"], 0
            session.data_device = torch.device("cpu")
            session.close = lambda timeout, failure="": None
            if source == "cache":
                session.reader = CacheReader(session, FakeCache(N), options)
            else:
                ring = FakeRing()
                session.stream.extend(epoch_stream(ring, 0, list(range(N)), 4)
                                      + epoch_stream(ring, 1, list(range(N)), 4, seq=3))
                session.on_announce = ring.write
                session.reader = RingReader(session, ring, options)
            opened.append(session)
            return session

        monkeypatch.setattr(iterator, "Session", open_session)
        return opened

    return attach_to


def read(loader, batches=None):
    """Indices of up to ``batches`` batches of a pass (all of it without), and the state saved
    inside the loop after the last of them."""
    got, state = [], None
    for batch in loader:
        got += batch["indices"].tolist()
        state = loader.state_dict()
        if batches is not None and len(got) >= 4 * batches:
            break
    return got, state


@pytest.mark.parametrize("source", ["cache", "ring"])
def test_after_a_break_the_state_is_where_the_job_stopped_and_a_job_that_loads_it_reads_the_rest(attach, source):
    sessions = attach(source)
    first = iterator.DaliShareIterator("t", batch_size=4)
    got, inside = read(first, batches=2)
    after = first.state_dict()
    assert (after["epoch"], after["position"]) == (0, 8)  # not (1, 0): the break kept the position
    # only the count of passes read or left (--epochs' accounting) moves at the break, on a cache
    assert after == {**inside, "passes": 1 if source == "cache" else 0}
    second = iterator.DaliShareIterator("t", batch_size=4)
    second.load_state_dict(after)
    rest, end = read(second)
    order = epoch_order(N, 0, 0).tolist() if source == "cache" else list(range(N))
    assert got + rest == order, "the two jobs did not read the epoch exactly once"
    assert (end["epoch"], end["position"]) == (0, N) and (second.state_dict()["epoch"], second.state_dict()["position"]) == (1, 0)
    if source == "cache":
        assert sessions[0].epochs_done == [1] and sessions[1].epochs_done == [1]  # a pass left by a break counts


@pytest.mark.parametrize("source", ["cache", "ring"])
def test_a_state_loaded_into_the_same_loader_after_a_break_reads_on_in_that_epoch(attach, source):
    """As a notebook that fits again from a checkpoint on the same loader: nothing of the epoch is
    skipped on the ring either (the rest of the left pass is not given back first)."""
    attach(source)
    loader = iterator.DaliShareIterator("t", batch_size=4)
    got, _ = read(loader, batches=1)
    loader.load_state_dict(loader.state_dict())
    rest, end = read(loader)
    order = epoch_order(N, 0, 0).tolist() if source == "cache" else list(range(N))
    assert loader.epoch == 0 and got + rest == order and (end["epoch"], end["position"]) == (0, N)


@pytest.mark.parametrize("source", ["cache", "ring"])
def test_a_state_saved_after_an_epochs_last_sample_resumes_with_the_next_epoch(attach, source):
    attach(source)
    loader = iterator.DaliShareIterator("t", batch_size=4)
    state = {**loader.state_dict(), "epoch": 0, "position": N}
    loader.load_state_dict(state)
    got, _ = read(loader)
    assert loader.epoch == 1 and got == (epoch_order(N, 0, 1).tolist() if source == "cache" else list(range(N)))


@pytest.mark.parametrize("source", ["cache", "ring"])
def test_a_new_pass_without_load_state_dict_starts_the_next_epoch(attach, source):
    attach(source)
    loader = iterator.DaliShareIterator("t", batch_size=4)
    read(loader, batches=1)
    assert loader.epoch == 0 and (loader.state_dict()["epoch"], loader.state_dict()["position"]) == (0, 4)
    got, state = read(loader)
    assert loader.epoch == 1 and got == (epoch_order(N, 0, 1).tolist() if source == "cache" else list(range(N)))
    assert (state["epoch"], state["position"]) == (1, N)


def test_batches_taken_ahead_stay_unread_in_the_state_after_a_break(attach):
    attach("cache")
    loader = iterator.DaliShareIterator("t", batch_size=4, taken_ahead=1)
    read(loader, batches=2)
    assert (loader.state_dict()["epoch"], loader.state_dict()["position"]) == (0, 4)
    assert loader.state_dict()["passes"] == 1  # the pass left counts as read (--epochs); the position does not


def test_a_state_loaded_before_a_pass_is_used_by_that_pass_only(attach):
    attach("cache")
    loader = iterator.DaliShareIterator("t", batch_size=4)
    state = loader.state_dict()
    loader.load_state_dict({**state, "epoch": 3, "position": 8})
    got, _ = read(loader)
    assert loader.epoch == 3 and got == epoch_order(N, 0, 3).tolist()[8:]
    got, _ = read(loader)
    assert loader.epoch == 4 and got == epoch_order(N, 0, 4).tolist()


def test_after_a_reconnect_a_cache_job_goes_on_in_a_cut_epoch_but_not_in_one_it_left(attach, monkeypatch):
    monkeypatch.setattr(cache_reader, "PRODUCER_POLL_S", 0.0)  # the reader polls its producer at every batch
    sessions = attach("cache")
    loader = iterator.DaliShareIterator("t", batch_size=4, reconnect=True, reconnect_timeout=1)

    def lose(session):  # the producer dies: the job notices at its next poll
        session.producer_alive = lambda: False
        session.on_poll = lambda: (setattr(session, "stop_reason", "died"), setattr(session, "lost", "died"))

    # cut short by the loss: the next pass, from the next producer, goes on in that epoch
    it = iter(loader)
    first = next(it)["indices"].tolist()
    lose(sessions[-1])
    rest = [i for b in it for i in b["indices"].tolist()]
    assert len(sessions) == 2 and rest == []  # the pass ended with its producer; the job attached again
    got, _ = read(loader)
    assert loader.epoch == 0 and first + got == epoch_order(N, 0, 0).tolist()
    # left by a break, then the producer is lost: the next pass is still the next epoch
    read(loader, batches=1)
    lose(sessions[-1])
    assert read(loader) == ([], None) and len(sessions) == 3
    got, _ = read(loader)
    assert loader.epoch == 2 and got == epoch_order(N, 0, 2).tolist()
