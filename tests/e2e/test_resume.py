"""Resuming a restarted job from its ``state_dict()`` (job/resume.py): real producer and job
processes; the job is SIGKILLed mid-epoch, or leaves its pass with ``break``, and is started again
with the state it saved last (inside the loop, or after the break: the same state, as torchdata's
StatefulDataLoader has it)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import HERE, N_SAMPLES as N, Server
from dalishare.wire.order import epoch_order

pytestmark = pytest.mark.e2e


def start_job(log: Path, state: Path | None = None, **spec) -> subprocess.Popen:
    spec = {"name": "t", "log": str(log), "batch_size": 3, "passes": 1, **spec,
            "state": str(state) if state else None}
    return subprocess.Popen([sys.executable, str(HERE / "resume_job.py"), json.dumps(spec)])


def lines(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def kill_after(job: subprocess.Popen, log: Path, batches: int, timeout: float = 60) -> list[dict]:
    """SIGKILL ``job`` once its log has ``batches`` batches; what it logged."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and len(lines(log)) >= batches):
        assert job.poll() is None and time.monotonic() < deadline, "the job ended or stalled before the kill"
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=10)
    return [line for line in lines(log) if "indices" in line]


def saved(state: dict, path: Path) -> Path:
    torch.save(state, path)  # as a checkpoint carries it
    return path


def test_with_a_cache_a_killed_job_goes_on_at_exactly_the_next_unseen_sample(dataset, tmp_path):
    with Server(dataset, "--batch-size", "4", "--cache", "memory") as server:
        first = kill_after(start_job(tmp_path / "1.log", sleep=0.05), tmp_path / "1.log", batches=4)
        state = first[-1]["state"]
        assert state["epoch"] == 0 and state["position"] == sum(len(b["indices"]) for b in first)
        again = start_job(tmp_path / "2.log", saved(state, tmp_path / "state.pt"), passes=2)
        assert again.wait(timeout=120) == 0
        second = lines(tmp_path / "2.log")
        server.stop()
    epoch0 = [i for b in first for i in b["indices"]] + [i for b in second if b.get("epoch") == 0
                                                        for i in b.get("indices", [])]
    assert epoch0 == epoch_order(N, 0, 0).tolist(), "epoch 0 across the restart is not the order, exactly once"
    epoch1 = [i for b in second if b.get("epoch") == 1 for i in b.get("indices", [])]
    assert epoch1 == epoch_order(N, 0, 1).tolist(), "the epoch after the resumed one is not whole"
    assert second[-1]["state"] == {**state, "epoch": 2, "position": 0, "passes": 2}


def test_with_a_cache_a_job_that_breaks_and_one_that_loads_its_state_read_the_epoch_exactly_once(dataset, tmp_path):
    # the state saved after the break is the one of its last batch; a new pass of the same job
    # without load_state_dict is the next epoch, whole
    with Server(dataset, "--batch-size", "4", "--cache", "memory") as server:
        job = start_job(tmp_path / "1.log", break_after=4, passes=2)
        assert job.wait(timeout=120) == 0
        first = lines(tmp_path / "1.log")
        read, left, second_pass = first[:4], first[4], first[5:]
        # only the count of passes read or left (--epochs' accounting) moves at the break
        assert left["pass_end"] == 0 and left["state"] == {**read[-1]["state"], "passes": 1}, "the state moved"
        assert (left["state"]["epoch"], left["state"]["position"]) == (0, 12)
        assert [i for b in second_pass for i in b.get("indices", [])] == epoch_order(N, 0, 1).tolist()
        again = start_job(tmp_path / "2.log", saved(left["state"], tmp_path / "state.pt"))
        assert again.wait(timeout=120) == 0
        second = [b for b in lines(tmp_path / "2.log") if "indices" in b]
        server.stop()
    assert {b["epoch"] for b in second} == {0}
    epoch0 = [i for b in read for i in b["indices"]] + [i for b in second for i in b["indices"]]
    assert epoch0 == epoch_order(N, 0, 0).tolist(), "the two jobs did not read epoch 0 exactly once, in order"


def test_a_state_saved_after_an_epochs_last_batch_resumes_at_the_next_epoch(dataset, tmp_path):
    with Server(dataset, "--batch-size", "4", "--cache", "memory") as server:
        job = start_job(tmp_path / "1.log")
        assert job.wait(timeout=120) == 0
        end = lines(tmp_path / "1.log")[-1]
        assert end["pass_end"] == 0 and (end["state"]["epoch"], end["state"]["position"]) == (1, 0)
        last_batch = lines(tmp_path / "1.log")[-2]["state"]  # what taken_ahead=1 would have saved
        assert (last_batch["epoch"], last_batch["position"]) == (0, N)
        again = start_job(tmp_path / "2.log", saved(last_batch, tmp_path / "state.pt"))
        assert again.wait(timeout=120) == 0
        server.stop()
    second = [b for b in lines(tmp_path / "2.log") if "indices" in b]
    assert {b["epoch"] for b in second} == {1}
    assert [i for b in second for i in b["indices"]] == epoch_order(N, 0, 1).tolist()


@pytest.mark.parametrize("leaves", ["killed in the loop", "by a break"])
def test_on_the_ring_a_resumed_job_gets_nothing_twice_in_its_epoch_and_goes_on_with_it(dataset, tmp_path, leaves):
    # a job attached first holds its first batch until the resumed job has read: the killed job read
    # ahead of it, so the ring still holds batches it had read (which the resumed one must skip) and
    # its epoch is still being served, however long the processes take to start
    release = tmp_path / "release"
    with Server(dataset, "--batch-size", "2", "--slots", "8") as server:
        pacer = start_job(tmp_path / "pacer.log", batch_size=2, hold=str(release), sleep=0.05)
        deadline = time.monotonic() + 60
        while not (tmp_path / "pacer.log").exists() or not lines(tmp_path / "pacer.log"):
            assert time.monotonic() < deadline, "the pacing job read nothing"
            time.sleep(0.01)
        if leaves == "by a break":  # it saves its state after the loop, and ends
            job = start_job(tmp_path / "1.log", batch_size=2, break_after=5)
            assert job.wait(timeout=120) == 0
            first, end = [b for b in lines(tmp_path / "1.log") if "indices" in b], lines(tmp_path / "1.log")[-1]
            assert len(first) == 5 and end["state"] == first[-1]["state"], "the state moved when the loop was left"
        else:
            first = kill_after(start_job(tmp_path / "1.log", batch_size=2), tmp_path / "1.log", batches=5)
        state = first[-1]["state"]
        assert state["source"] == "ring" and state["epoch"] == 0
        again = start_job(tmp_path / "2.log", saved(state, tmp_path / "state.pt"), batch_size=2)
        deadline = time.monotonic() + 60
        while not (tmp_path / "2.log").exists() or not lines(tmp_path / "2.log"):
            assert time.monotonic() < deadline and again.poll() is None, "the resumed job read nothing"
            time.sleep(0.01)
        release.touch()
        assert again.wait(timeout=120) == 0 and pacer.wait(timeout=120) == 0
        server.stop()
    before = [i for b in first for i in b["indices"]]
    after = [i for b in lines(tmp_path / "2.log") if b.get("epoch") == 0 for i in b.get("indices", [])]
    order = epoch_order(N, 0, 0).tolist()
    assert before == order[: len(before)], "the killed job did not start at the epoch's start"
    assert after == order[state["position"]:], "the resumed job did not read exactly the rest of its epoch"


def test_with_reconnect_a_cache_job_goes_on_in_its_epoch_with_the_next_producer(dataset, tmp_path):
    from dalishare import DaliShareIterator

    with Server(dataset, "--batch-size", "4", "--cache", "memory") as first:
        loader = DaliShareIterator("t", batch_size=3, attach_timeout=60, reconnect=True, reconnect_timeout=60)
        it = iter(loader)
        read = []
        for _ in range(3):
            batch = next(it)  # loader.epoch is set once the pass has begun
            read.append((loader.epoch, batch["indices"].tolist()))
        first.stop()
    try:
        with Server(dataset, "--batch-size", "4", "--cache", "memory") as second:
            read += [(loader.epoch, b["indices"].tolist()) for b in it]  # the pass ends with its producer
            for _ in range(2):  # the rest of epoch 0, then epoch 1
                read += [(loader.epoch, b["indices"].tolist()) for b in loader]
            assert loader.producer_pid == second.proc.pid
            second.stop()
    finally:
        loader.close()
    for epoch in (0, 1):
        assert [i for e, b in read if e == epoch for i in b] == epoch_order(N, 0, epoch).tolist(), read


def test_a_state_from_another_dataset_or_seed_is_refused_naming_the_difference(dataset, tmp_path):
    from dalishare import DaliShareIterator
    from dalishare.errors import ConfigError

    with Server(dataset, "--batch-size", "4", "--cache", "memory") as server:
        with DaliShareIterator("t", attach_timeout=60) as loader:
            state = loader.state_dict()
            other = {**state, "fingerprint": {**state["fingerprint"], "stage": "0123456789abcdef"}}
            with pytest.raises(ConfigError, match="another stage"):
                loader.load_state_dict(other)
            with pytest.raises(ConfigError, match="seed"):
                loader.load_state_dict({**state, "job": {**state["job"], "seed": 5}})
            with pytest.raises(ConfigError, match="not a dalishare iterator state"):
                loader.load_state_dict({"epoch": 3})
        server.stop()
