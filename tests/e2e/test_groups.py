"""Consumer groups (DDP jobs) and per-node shards, end to end: real producers, torchrun with the gloo
backend on the CPU, two producers standing for two nodes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers import CLASS_SIZES, HERE, Job, Server
from dalishare.wire.order import epoch_order

N = sum(CLASS_SIZES.values())  # 30 samples
DDP_JOB = HERE / "ddp_job.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(node: int, nodes: int, per_node: int, port: int, spec: dict) -> subprocess.Popen:
    """One node's agent: ``per_node`` ranks of a job spanning ``nodes`` nodes, all on this machine."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node-rank", str(node),
         "--nproc-per-node", str(per_node), "--master-addr", "127.0.0.1", "--master-port", str(port),
         str(DDP_JOB), json.dumps(spec)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def by_hand(rank: int, world: int, spec: dict) -> subprocess.Popen:
    """A rank started without torchrun (and without torch.distributed): the launcher's variables only."""
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
           "LOCAL_WORLD_SIZE": str(world)}
    return subprocess.Popen([sys.executable, str(DDP_JOB), json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[str]:
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            proc.kill()
            outputs.append(proc.communicate()[0])
            pytest.fail(f"a rank or agent hung:\n{outputs[-1]}")
    return outputs


def records(out: Path, world: int) -> list[dict]:
    return [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.parametrize("cache", ["memory", "off"])
def test_a_ddp_job_across_two_shard_producers_reads_every_sample_once_per_epoch(dataset, tmp_path, cache):
    port, out = free_port(), tmp_path / "ddp"
    spec = {"names": ["n0", "n1"], "batch_size": 3, "epochs": 2, "train": True, "out": str(out)}
    options = ("--batch-size", "8", "--cache", cache, "--epochs", "2", "--min-consumers", "2")
    with Server(dataset, *options, "--shard", "0/2", name="n0") as a, \
            Server(dataset, *options, "--shard", "1/2", name="n1") as b:
        agents = [torchrun(node, 2, 2, port, spec) for node in (0, 1)]
        outputs = finish(agents)
        assert all(agent.returncode == 0 for agent in agents), "\n".join(outputs)
        assert a.wait() == 0 and b.wait() == 0
    ranks = records(out, 4)
    # 30 samples: 15 per node, padded to 16 for its 2 ranks: 8 per rank, 3 batches of 3, 3, 2
    assert {r["node"] for r in ranks} == {0, 1} and all(r["len"] == 3 for r in ranks)
    for epoch in (0, 1):
        got = [r["epochs"][epoch] for r in ranks]
        assert all(g["epoch"] == epoch and g["batches"] == 3 and len(g["indices"]) == 8 for g in got)
        real = Counter(i for g in got for i, pad in zip(g["indices"], g["padded"]) if not pad)
        assert sorted(real) == list(range(N)) and set(real.values()) == {1}, f"epoch {epoch}: not exactly once"
        assert sum(pad for g in got for pad in g["padded"]) == 2
    first = [i for r in ranks for i in r["epochs"][0]["indices"]]
    second = [i for r in ranks for i in r["epochs"][1]["indices"]]
    assert first != second, "each node's share did not change between epochs"
    assert all(r["same_weights"] and r["trained"] for r in ranks), "gradients were not all-reduced"


def test_drop_last_drops_the_tail_and_an_independent_job_shares_the_producer(dataset, tmp_path):
    out = tmp_path / "ranks"
    with Server(dataset, "--batch-size", "8", "--cache", "memory", "--epochs", "2",
                "--min-consumers", "5") as server:
        solo = Job(tmp_path / "solo.json", batch_size=7, passes=2)
        ranks = [by_hand(rank, 4, {"names": ["t"], "batch_size": 2, "epochs": 2, "drop_last": True, "out": str(out)})
                 for rank in range(4)]
        outputs = finish(ranks)
        assert all(p.returncode == 0 for p in ranks), "\n".join(outputs)
        solo_res = solo.result()
        assert server.wait() == 0
    got = records(out, 4)
    for epoch in (0, 1):
        order = epoch_order(N, 0, epoch).tolist()
        indices = [r["epochs"][epoch]["indices"] for r in got]
        assert all(len(i) == 7 for i in indices) and not any(p for r in got for p in r["epochs"][epoch]["padded"])
        assert sorted(i for part in indices for i in part) == sorted(order[:28])  # the last 2 dropped
        assert indices[1] == order[1:28:4]
    assert all(r["len"] == 4 for r in got)  # 7 samples in batches of 2
    for p in solo_res["passes"]:
        assert sorted(i for b in p["batches"] for i in b["indices"]) == list(range(N))


@pytest.mark.parametrize("cache", ["memory", "off"])
def test_a_killed_rank_fails_its_group_fast_while_an_independent_job_goes_on(dataset, tmp_path, cache):
    out = tmp_path / "ranks"
    with Server(dataset, "--batch-size", "8", "--cache", cache, "--min-consumers", "5") as server:
        solo = Job(tmp_path / "solo.json", batch_size=5, passes=2, sleep=0.2)
        spec = {"names": ["t"], "batch_size": 1, "epochs": 3, "sleep": 0.3, "die": [3, 2], "out": str(out)}
        ranks = [by_hand(rank, 4, spec) for rank in range(4)]
        while ranks[3].poll() is None:
            time.sleep(0.02)
        died_at = time.monotonic()
        outputs = finish(ranks[:3], timeout=60)
        assert ranks[3].returncode == -signal.SIGKILL
        solo_res = solo.result()
        log = server.log()
    for rank, record in enumerate(records(out, 3)):
        assert record["error"] and "GroupBroken" in record["error"], outputs[rank]
        assert "rank 3 of group 'ddp'" in record["error"] and "died" in record["error"]
        assert record["error_at"] - died_at < 3.0, "the group learnt of the death too late"
    assert "told that rank 3 of group 'ddp'" in log
    for p in solo_res["passes"]:
        assert sorted(i for b in p["batches"] for i in b["indices"]) == list(range(N))


def test_ranks_on_producers_that_disagree_are_refused_at_attach(dataset, tmp_path):
    port, out = free_port(), tmp_path / "ddp"
    spec = {"names": ["n0", "n1"], "batch_size": 3, "epochs": 1, "train": True, "out": str(out)}
    with Server(dataset, "--cache", "memory", "--shard", "0/2", "--seed", "1", name="n0"), \
            Server(dataset, "--cache", "memory", "--shard", "1/2", "--seed", "2", name="n1"):
        agents = [torchrun(node, 2, 1, port, spec) for node in (0, 1)]
        outputs = finish(agents)
    assert all(agent.returncode != 0 for agent in agents)
    assert "disagree on the producer's seed: 1 here, 2 there" in outputs[0]


@pytest.mark.parametrize("cache", ["off", "memory"])
def test_a_group_on_the_ring_or_a_cache_and_independent_jobs_side_by_side(dataset, tmp_path, cache):
    # on the ring the group starts at an epoch's first batch once its 4 ranks are here, and the
    # producer paces it as one job with the independent one
    out = tmp_path / "ranks"
    with Server(dataset, "--batch-size", "8", "--slots", "6", "--cache", cache, "--epochs", "3",
                "--min-consumers", "5") as server:
        solo = Job(tmp_path / "solo.json", batch_size=7, passes=3)
        spec = {"names": ["t"], "batch_size": 3, "epochs": 2, "out": str(out)}
        ranks = [by_hand(rank, 4, spec) for rank in range(4)]
        outputs = finish(ranks)
        assert all(p.returncode == 0 for p in ranks), "\n".join(outputs)
        solo_res = solo.result()
        assert server.wait() == 0, server.log()
    got = records(out, 4)
    assert all(r["len"] == 3 for r in got)  # 30 samples: 8 per rank (2 repeats), batches of 3, 3, 2
    for epoch in (0, 1):
        parts = [r["epochs"][epoch] for r in got]
        assert len({p["epoch"] for p in parts}) == 1 and all(p["batches"] == 3 for p in parts)
        real = Counter(i for p in parts for i, pad in zip(p["indices"], p["padded"]) if not pad)
        assert sorted(real) == list(range(N)) and set(real.values()) == {1}, f"epoch {epoch}: not exactly once"
        assert [sum(p["padded"]) for p in parts] == [0, 0, 1, 1]
    for p in solo_res["passes"]:
        assert sorted(i for b in p["batches"] for i in b["indices"]) == list(range(N))


def test_a_rank_is_attached_once_and_a_bad_shard_is_refused(dataset, tmp_path):
    spec = {"names": ["t"], "batch_size": 2, "epochs": 1, "out": str(tmp_path / "r")}
    with Server(dataset, "--cache", "memory") as server:
        first = by_hand(0, 2, {**spec, "sleep": 30})
        deadline = time.monotonic() + 60
        while "as rank 0 of 2" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        (output,) = finish([by_hand(0, 2, spec)])
        first.kill()
        first.communicate()
    assert "rank 0 of group 'ddp' is already attached" in output
    with Server(dataset, "--shard", "2/2") as server:
        assert server.wait() == 2
    assert "--shard 2/2: I must be from 0 to N-1" in server.log()


def test_a_group_that_attaches_mid_epoch_on_the_ring_starts_together_at_an_epoch_s_start(dataset, tmp_path):
    out = tmp_path / "ranks"
    with Server(dataset, "--batch-size", "4", "--slots", "4", "--cache", "off") as server:
        solo = Job(tmp_path / "solo.json", batch_size=4, passes=4, sleep=0.15)
        solo.wait_attached()
        time.sleep(1.5)  # the independent job is mid-epoch
        spec = {"names": ["t"], "batch_size": 4, "epochs": 2, "out": str(out)}
        first = by_hand(0, 2, spec)
        time.sleep(1.0)  # the ranks come one after the other
        second = by_hand(1, 2, spec)
        outputs = finish([first, second])
        assert first.returncode == 0 and second.returncode == 0, "\n".join(outputs)
        solo_res = solo.result()
        log = server.log()
    for p in solo_res["passes"][1:]:  # the independent job loses nothing to the group (its first pass began mid-epoch)
        assert sorted(i for b in p["batches"] for i in b["indices"]) == list(range(N))
    assert "group 'ddp': its 2 ranks start together at epoch" in log, log
    got = records(out, 2)
    for epoch in (0, 1):
        parts = [r["epochs"][epoch] for r in got]
        assert parts[0]["epoch"] == parts[1]["epoch"] and all(len(p["indices"]) == 15 for p in parts)
        assert sorted(i for p in parts for i in p["indices"]) == list(range(N)), "not a whole epoch"


def test_a_rank_that_leaves_with_an_error_fails_its_group(dataset, tmp_path):
    out = tmp_path / "ranks"
    with Server(dataset, "--batch-size", "8", "--cache", "memory", "--min-consumers", "3"):
        spec = {"names": ["t"], "batch_size": 1, "epochs": 3, "sleep": 0.2, "fail": [2, 2], "out": str(out)}
        ranks = [by_hand(rank, 3, spec) for rank in range(3)]
        outputs = finish(ranks, timeout=60)
    assert ranks[2].returncode != 0 and "failed on purpose" in outputs[2]
    for record in records(out, 2):
        assert "GroupBroken" in record["error"] and "left: failed: RuntimeError: this rank failed on purpose" in \
            record["error"]
