"""End to end on the CPU path: real producer and job processes, real DALI, real shared memory."""

from __future__ import annotations

import math
import os
import re
import signal
import time

import numpy as np
import pytest
import torch
import zmq

from helpers import CLASS_SIZES, RESNET, Job, Server, expected_labels
from dalishare import DaliShareIterator, ProducerNotFound
from dalishare.shm import names as runtime
from dalishare.wire import messages as protocol

N = sum(CLASS_SIZES.values())  # 30 samples; producer batches of 8: 8, 8, 8, 6


def epoch_indices(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["indices"]]


def test_three_jobs_get_every_sample_exactly_once(dataset, tmp_path):
    sizes = {"divides": 4, "does_not_divide": 5, "exceeds": 11}
    with Server(dataset, "--batch-size", "8", "--min-consumers", "3", "--epochs", "2", "--slots", "3") as server:
        # a third pass after the producer's last epoch must end at once, with the reason
        jobs = {k: Job(tmp_path / f"{k}.json", batch_size=b, passes=3) for k, b in sizes.items()}
        results = {k: job.result() for k, job in jobs.items()}
        assert server.wait() == 0
    labels = expected_labels(dataset)
    orders = {}
    for key, res in results.items():
        b = sizes[key]
        assert res["len"] == math.ceil(N / b)
        assert [p["epoch"] for p in res["passes"]] == [0, 1, 1]
        assert res["passes"].pop()["batches"] == []
        assert "finished 2 epochs" in res["stop_reason"]
        for p in res["passes"]:
            got = epoch_indices(p["batches"])
            assert sorted(got) == list(range(N)), f"{key}: not exactly once in epoch {p['epoch']}"
            # every batch full except the epoch's last partial one
            assert [len(x["indices"]) for x in p["batches"]] == [b] * (N // b) + ([N % b] if N % b else [])
            for x in p["batches"]:
                assert x["labels"] == [labels[i] for i in x["indices"]]
                assert x["shape"][1:] == [224, 224, 3] and x["dtype"] == "torch.uint8"
                assert {x["epoch"]} == {p["epoch"]}
        orders[key] = [epoch_indices(p["batches"]) for p in res["passes"]]
    first, *others = orders.values()
    assert all(o == first for o in others), "jobs saw different orders"
    assert first[0] != first[1], "the order did not change between epochs"


def collect_orders(dataset, tmp_path, seed: int) -> list[list[int]]:
    with Server(dataset, "--batch-size", "8", "--epochs", "2", "--seed", str(seed)):
        res = Job(tmp_path / f"seed{seed}.json", batch_size=8, passes=2).result()
    return [epoch_indices(p["batches"]) for p in res["passes"]]


def test_order_is_reproducible_from_the_seed(dataset, tmp_path):
    a, b, c = (collect_orders(dataset, tmp_path, s) for s in (7, 7, 8))
    assert a == b
    assert a != c
    assert a[0] != a[1]


def reference_images(dataset) -> dict[int, np.ndarray]:
    """The resnet stage run directly in DALI over the files in index order, without dalishare."""
    from nvidia.dali import fn, pipeline_def

    from dalishare.producer.stage import load_stage

    stage = load_stage(RESNET)
    files = [str(p) for cls in sorted(CLASS_SIZES) for p in sorted((dataset / cls).glob("*.jpg"))]

    @pipeline_def(batch_size=N, num_threads=2, device_id=None)
    def direct():
        jpegs, _ = fn.readers.file(files=files, shuffle_after_epoch=False, random_shuffle=False)
        return stage(jpegs, "cpu")

    pipe = direct()
    pipe.build()
    (out,) = pipe.run()
    return dict(enumerate(np.asarray(out.as_tensor())))


def test_pixels_equal_the_stage_run_directly_and_views_are_zero_copy(dataset):
    expected = reference_images(dataset)
    with Server(dataset, "--batch-size", "8", "--epochs", "1"):
        with DaliShareIterator("t", batch_size=5, attach_timeout=30) as loader:
            ring = [(t.data_ptr(), t.data_ptr() + t.numel()) for t in loader._slot_tensors]
            segment = runtime.SHM_DIR / loader._ring.layout.segment
            assert segment.stat().st_mode & 0o777 == 0o600
            views = copies = 0
            seen = set()
            for batch in loader:
                for img, idx in zip(batch["images"], batch["indices"].tolist()):
                    np.testing.assert_array_equal(img.numpy(), expected[idx])
                    seen.add(idx)
                ptr = batch["images"].data_ptr()
                in_ring = any(lo <= ptr < hi for lo, hi in ring)
                views += in_ring
                copies += not in_ring
    assert seen == set(range(N))
    # batches of 5 over producer batches of 8: [0,5) view, [5,10) spans, [10,15) view, [15,20) spans, ...
    assert views >= 3 and copies >= 2


def test_batches_larger_than_the_whole_ring_do_not_hang(dataset, tmp_path):
    with Server(dataset, "--batch-size", "4", "--slots", "2", "--epochs", "1"):
        res = Job(tmp_path / "big.json", batch_size=20).result()
    got = res["passes"][0]["batches"]
    assert [len(b["indices"]) for b in got] == [20, 10]
    assert sorted(epoch_indices(got)) == list(range(N))


def test_a_slow_job_sets_the_pace_and_its_slots_are_never_overwritten(dataset, tmp_path):
    with Server(dataset, "--batch-size", "4", "--slots", "2", "--epochs", "2", "--min-consumers", "2"):
        slow = Job(tmp_path / "slow.json", batch_size=4, passes=2, sleep=0.1, verify_stable=True)
        fast = Job(tmp_path / "fast.json", batch_size=3, passes=2)
        slow_res, fast_res = slow.result(), fast.result()
    digests = {}
    for res in (slow_res, fast_res):
        for p in res["passes"]:
            assert sorted(epoch_indices(p["batches"])) == list(range(N))
            for b in p["batches"]:
                for idx, d in zip(b["indices"], b["digest"]):
                    assert digests.setdefault(idx, d) == d, f"sample {idx} differs between jobs"


def test_a_job_attaching_mid_epoch_gets_the_resident_rest_then_whole_epochs(dataset, tmp_path):
    # Producer batches of 4 (8 per epoch, the last of 2), 4 slots. The test process is job A: it
    # takes two batches and pauses, so the producer stops with seqs 1-4 resident (seq 0 reused).
    with Server(dataset, "--batch-size", "4", "--slots", "4", "--epochs", "2"):
        with DaliShareIterator("t", batch_size=4, attach_timeout=30) as a:
            a_orders, it = [], iter(a)
            first = [next(it)["indices"].tolist() for _ in range(2)]
            time.sleep(1.5)  # producer fills the ring, then waits on A
            late = Job(tmp_path / "late.json", batch_size=3, passes=2)
            late.wait_attached()  # B attaches while A still holds the ring
            a_orders.append(sum(first, []) + [i for b in it for i in b["indices"].tolist()])
            a_orders.append([i for b in a for i in b["indices"].tolist()])
        res = late.result()
    b_first, b_second = (epoch_indices(p["batches"]) for p in res["passes"])
    assert [p["epoch"] for p in res["passes"]] == [0, 1]
    assert b_first == a_orders[0][4:], "late job should get the resident batches from seq 1 on"
    assert b_second == a_orders[1]
    assert sorted(a_orders[0]) == sorted(a_orders[1]) == list(range(N))


def test_attaching_to_a_name_nobody_serves_fails_after_the_timeout():
    start = time.monotonic()
    with pytest.raises(ProducerNotFound, match="no producer named 'nobody'"):
        DaliShareIterator("nobody", attach_timeout=1)
    assert time.monotonic() - start < 5


def test_augment_runs_on_each_batch(dataset):
    def to_float(batch):
        return {**batch, "images": batch["images"].permute(0, 3, 1, 2).float() / 255}

    with Server(dataset, "--batch-size", "8", "--epochs", "1"):
        with DaliShareIterator("t", batch_size=16, augment=to_float, attach_timeout=30) as loader:
            batches = [(tuple(b["images"].shape), b["images"].dtype, float(b["images"].max())) for b in loader]
    assert [b[0] for b in batches] == [(16, 3, 224, 224), (14, 3, 224, 224)]
    assert all(dtype == torch.float32 and 0 < top <= 1 for _, dtype, top in batches)


def test_producers_of_different_names_serve_side_by_side(dataset, tmp_path):
    from helpers import make_dataset

    other = make_dataset(tmp_path / "other", {"x": 3, "y": 2}, seed=5)
    with Server(dataset, "--batch-size", "8", "--epochs", "1", name="one"), \
            Server(other, "--batch-size", "2", "--epochs", "1", name="two"):
        one = Job(tmp_path / "one.json", name="one", batch_size=8)
        two = Job(tmp_path / "two.json", name="two", batch_size=8)
        one_res, two_res = one.result(), two.result()
    assert sorted(epoch_indices(one_res["passes"][0]["batches"])) == list(range(N))
    assert sorted(epoch_indices(two_res["passes"][0]["batches"])) == list(range(5))


@pytest.mark.parametrize("after", [0, 1], ids=["idle", "mid-batch"])
@pytest.mark.parametrize("how", ["sigkill", "sigterm", "raise", "close"])
def test_a_job_that_dies_or_leaves_releases_its_slots_and_the_others_go_on(dataset, tmp_path, how, after):
    # two slots, and the victim holds them from the start: the survivor can finish only if the
    # producer takes the victim's slots back when it dies or leaves
    with Server(dataset, "--batch-size", "4", "--slots", "2", "--epochs", "2", "--min-consumers", "2") as server:
        victim = Job(tmp_path / "victim.json", batch_size=4, passes=2, die={"how": how, "after": after})
        survivor = Job(tmp_path / "survivor.json", batch_size=4, passes=2)
        res = survivor.result(timeout=60)
        if victim.proc.poll() is None:
            victim.proc.kill()
        victim.proc.communicate(timeout=10)
    # who left and why: a closed job says goodbye, a dead one is found by its pid, and either may
    # first be found unreachable when the producer sends to its closed socket
    why = {"raise": "left: failed: RuntimeError: the job failed on purpose|unreachable",
           "close": "left: closed|unreachable"}.get(how, "died|unreachable")
    assert re.search(rf"job \d+ \(pid {victim.proc.pid}\) ({why})", server.log()), server.log()
    stamps = [b["at"] for p in res["passes"] for b in p["batches"]]
    assert max(b - a for a, b in zip(stamps, stamps[1:])) < 1.0, "the survivor waited a second or more"
    for p in res["passes"]:
        assert sorted(epoch_indices(p["batches"])) == list(range(N))


def test_a_stalled_job_is_suspended_the_others_go_on_and_it_resumes_with_an_account(dataset, tmp_path):
    # the runner needs ~7 s for its 6 epochs; the staller stops for 4 s after its second batch. With
    # keep=2 a suspended job keeps its 4 oldest slots, so 6 leave the runner 2.
    with Server(dataset, "--batch-size", "4", "--slots", "6", "--epochs", "6", "--stall-timeout", "1",
                "--min-consumers", "2") as server:
        staller = Job(tmp_path / "staller.json", batch_size=4, passes=6, stall={"after": 1, "seconds": 4})
        runner = Job(tmp_path / "runner.json", batch_size=4, passes=6, sleep=0.15)
        fast, slow = runner.result(), staller.result()
    log = server.log()
    assert "suspended until it resumes" in log and "resumed after batch" in log, log
    stamps = [b["at"] for p in fast["passes"] for b in p["batches"]]
    assert max(b - a for a, b in zip(stamps, stamps[1:])) < 4, "the others waited for the staller"
    for p in fast["passes"]:
        assert sorted(epoch_indices(p["batches"])) == list(range(N))
    seen = [epoch_indices(p["batches"]) for p in slow["passes"]]
    assert all(len(s) == len(set(s)) for s in seen), "a sample came twice within an epoch"
    assert slow["missed"] > 0
    epochs = max(p["epoch"] for p in slow["passes"] if p["batches"]) + 1  # from epoch 0 to its last
    assert sum(map(len, seen)) + slow["missed"] == N * epochs  # every sample seen or counted missed


@pytest.mark.parametrize("case", ["lone job pauses", "steady slow job"])
def test_a_job_nobody_waits_for_or_that_keeps_releasing_is_never_suspended(dataset, tmp_path, case):
    spec = {"stall": {"after": 0, "seconds": 3}} if case == "lone job pauses" else {"sleep": 0.6}
    with Server(dataset, "--batch-size", "4", "--slots", "4", "--epochs", "1", "--stall-timeout", "1") as server:
        res = Job(tmp_path / "job.json", batch_size=4, passes=1, **spec).result()
    assert "suspended until" not in server.log(), server.log()
    assert res["missed"] == 0
    assert sorted(epoch_indices(res["passes"][0]["batches"])) == list(range(N))


def ghost_hello(version: int = protocol.PROTOCOL_VERSION, wait_for_answer: bool = False) -> None:
    """A peer that says hello and closes its socket, before or after the producer's answer, while
    its process (this one) lives on."""
    lifeline = runtime.Lifeline("t")  # released only when the test ends: this process lives on
    GHOST_LIFELINES.append(lifeline)
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.connect(runtime.endpoint("t"))
        sock.send(protocol.encode(protocol.Hello(pid=os.getpid(), version=version, lifeline=lifeline.token)))
        if wait_for_answer:
            assert sock.poll(10_000)
            assert isinstance(protocol.decode(sock.recv()), protocol.Welcome)
        sock.close(linger=1000)


GHOST_LIFELINES: list = []


@pytest.fixture(autouse=True)
def _release_ghost_lifelines():
    yield
    while GHOST_LIFELINES:
        GHOST_LIFELINES.pop().release()


def test_peers_gone_before_their_welcome_hold_no_slots_and_wrong_versions_are_refused(dataset):
    with Server(dataset, "--batch-size", "4", "--slots", "2", "--epochs", "1", "--heartbeat-timeout", "1") as server:
        with DaliShareIterator("t", batch_size=4, attach_timeout=30, batch_timeout=20) as loader:
            it = iter(loader)
            got = next(it)["indices"].tolist()  # mid-epoch: batches are resident
            ghost_hello()
            ghost_hello(wait_for_answer=True)  # attached, sent the resident batches, then gone
            ghost_hello(version=99)
            with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:  # a live peer of another version
                sock.connect(runtime.endpoint("t"))
                sock.send(protocol.encode(protocol.Hello(pid=os.getpid(), version=99)))
                assert sock.poll(10_000), "no answer to a wrong-version hello"
                reply = protocol.decode(sock.recv())
                sock.close(linger=0)
            assert isinstance(reply, protocol.Reject) and "protocol version 99" in reply.reason
            got += [i for b in it for i in b["indices"].tolist()]
        assert server.wait(30) == 0
    assert sorted(got) == list(range(N))
    assert "unreachable" in server.log()


def test_a_job_of_another_protocol_version_gets_one_clear_error(dataset, monkeypatch):
    import functools

    import dalishare.job.session
    from dalishare import ProtocolError

    monkeypatch.setattr(dalishare.job.session, "Hello", functools.partial(protocol.Hello, version=99))
    with Server(dataset, "--batch-size", "8"):
        with pytest.raises(ProtocolError, match=f"refused this job: protocol version 99 is not the producer's {protocol.PROTOCOL_VERSION}"):
            DaliShareIterator("t", attach_timeout=30)


def end_producer(server: Server, how: str, data) -> None:
    import shutil

    if how == "exception":
        shutil.rmtree(data)  # every later read fails: all files excluded, then the producer gives up
    else:
        server.proc.send_signal({"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}[how])


@pytest.mark.parametrize("state", ["idle", "mid-batch"])
@pytest.mark.parametrize("how", ["sigkill", "sigterm", "sigint", "exception"])
def test_a_producer_that_ends_badly_never_leaves_a_job_hanging(dataset, tmp_path, how, state):
    import shutil

    from dalishare import ProducerLost

    data = shutil.copytree(dataset, tmp_path / "data")
    with Server(data, "--batch-size", "4", "--slots", "2") as server:
        with DaliShareIterator("t", batch_size=4, attach_timeout=30) as loader:
            it = iter(loader)
            got = next(it)["indices"].tolist() if state == "mid-batch" else []
            end_producer(server, how, data)
            start = time.monotonic()
            if how in ("sigterm", "sigint"):  # orderly: the pass ends, with the reason
                got += [i for b in it for i in b["indices"].tolist()]
                assert list(loader) == []  # and so does every later pass
                assert loader.stop_reason == f"stopped by {how.upper()}"
                assert len(got) == len(set(got)) < N
            else:
                match = "died" if how == "sigkill" else "failed: DatasetError: none of the 30 files"
                with pytest.raises(ProducerLost, match=rf"producer 't' \(pid {server.proc.pid}\) {match}"):
                    for _ in it:  # what was already announced, then the wait that notices the end
                        pass
            # vanished files are found batch by batch (worker lost, probe, exclusion, restart)
            assert time.monotonic() - start < (20 if how == "exception" else 3)
        code = server.wait(30)
    assert code == {"sigkill": -signal.SIGKILL, "exception": 2}.get(how, 0), server.log()
    if how == "sigkill":  # it could not clean up: the next serve or `dalishare cleanup` does
        removed = runtime.clean_stale()
        assert any(f".{server.proc.pid}" in r for r in removed) and any(r.endswith("t.sock") for r in removed)


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_with_reconnect_a_job_goes_on_with_the_next_producer(dataset, how):
    with Server(dataset, "--batch-size", "4", "--slots", "2") as first:
        loader = DaliShareIterator("t", batch_size=4, attach_timeout=30, reconnect=True, reconnect_timeout=60)
        it = iter(loader)
        next(it)
        end_producer(first, how, dataset)
        first.wait(30)
    try:
        with Server(dataset, "--batch-size", "4", "--epochs", "1", "--seed", "3") as second:
            rest = [b["indices"].tolist() for b in it]  # the interrupted pass ends
            epoch = [i for b in loader for i in b["indices"].tolist()]  # a whole epoch of the new one
            assert loader.producer_pid == second.proc.pid
            # the new producer of the name removed what the killed one left
            assert not list(runtime.SHM_DIR.glob(f"dalishare.t.{first.proc.pid}"))
            assert second.wait(30) == 0
    finally:
        loader.close()
    assert all(len(b) <= 4 for b in rest)
    assert sorted(epoch) == list(range(N))
