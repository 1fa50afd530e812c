"""Consumer groups and shards without processes: DistributedSampler's cuts (wire/order.share), a
job's rank and world size (job/group.membership), the producer's rank bookkeeping and --shard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from dalishare.errors import ConfigError
from dalishare.job.group import membership
from dalishare.producer.jobs import JobRegistry
from dalishare.producer.options import parse_shard
from dalishare.wire.order import share


@pytest.mark.parametrize("n, parts", [(30, 4), (30, 2), (8, 4), (3, 4), (31, 8)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_share_cuts_as_distributed_sampler_does(n, parts, drop_last):
    order = np.random.default_rng(n).permutation(n)
    dataset = list(range(n))
    for part in range(parts):
        sampler = DistributedSampler(dataset, num_replicas=parts, rank=part, shuffle=False, drop_last=drop_last)
        expected = [int(order[i]) for i in sampler]
        got, padded = share(order, part, parts, drop_last)
        assert got.tolist() == expected
    parts_got = [share(order, p, parts, drop_last) for p in range(parts)]
    real = sorted(i for got, padded in parts_got for i, pad in zip(got, padded) if not pad)
    assert real == (sorted(order[: (n // parts) * parts]) if drop_last else list(range(n)))
    assert len({len(got) for got, _ in parts_got}) == 1


def test_a_node_share_cut_again_among_its_ranks_keeps_the_padding_flags():
    order = np.arange(30)
    node, node_pad = share(order, 3, 4)  # positions 3, 7, ..., 31: 8 samples, the last a repeat
    assert node_pad.tolist() == [False] * 7 + [True]
    ranks = [share(node, r, 3, padded=node_pad) for r in range(3)]
    assert [len(g) for g, _ in ranks] == [3, 3, 3]
    assert [p.tolist() for _, p in ranks] == [[False] * 3, [False, False, True], [False, False, True]]


def test_membership_comes_from_the_arguments_then_torchrun_then_rank_and_world_size():
    assert membership(None, None, None, False, env={}) is None
    assert membership("g", 1, 4, False, env={}).rank == 1
    torchrun = {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "RANK": "3", "WORLD_SIZE": "4"}
    member = membership("g", None, None, True, env=torchrun)
    assert (member.rank, member.world, member.drop_last) == (1, 2, True)  # a group is one node's ranks
    assert membership("g", None, None, False, env={"RANK": "2", "WORLD_SIZE": "3"}).world == 3
    with pytest.raises(ConfigError, match="launch it with torchrun"):
        membership("g", None, None, False, env={})
    with pytest.raises(ConfigError, match="need group="):
        membership(None, 0, 2, False, env={})
    with pytest.raises(ConfigError, match="not between 0"):
        membership("g", 2, 2, False, env={})
    assert not torch.distributed.is_initialized()


def test_the_producer_refuses_a_rank_twice_or_a_world_size_that_differs():
    jobs = JobRegistry(alive=lambda job: True)
    jobs.add(10, b"a", 2, 0.0, "g", 0, 2)
    assert jobs.group_refusal("g", 1, 2) is None
    assert "already attached" in jobs.group_refusal("g", 0, 2)
    assert "world size 2, not 3" in jobs.group_refusal("g", 1, 3)
    assert jobs.group_refusal("other", 0, 3) is None
    assert [j.pid for j in jobs.group("g")] == [10] and jobs.group("") == []


def test_shard_is_i_of_n_or_taken_from_the_launcher():
    assert parse_shard("1/4") == (1, 4) and parse_shard("0/1") == (0, 1)
    assert parse_shard("auto", env={"SLURM_NODEID": "2", "SLURM_NNODES": "3"}) == (2, 3)
    assert parse_shard("auto", env={"NODE_RANK": "1", "NNODES": "2"}) == (1, 2)
    assert parse_shard("auto", env={"GROUP_RANK": "0", "GROUP_WORLD_SIZE": "2"}) == (0, 2)
    for bad, match in (("4/4", "from 0 to N-1"), ("x", "use I/N"), ("auto", "none of")):
        with pytest.raises(ConfigError, match=match):
            parse_shard(bad, env={})


def test_a_shard_feed_serves_the_node_share_and_replaces_an_excluded_file_by_a_flagged_repeat():
    from pathlib import Path

    from dalishare.producer.dataset import Dataset
    from dalishare.producer.feed import EpochFeed
    from dalishare.wire.order import epoch_order

    ds = Dataset(Path("."), ["a"], [Path(f"{i}.jpg") for i in range(10)], np.zeros(10, dtype=np.int64))
    feeds = [EpochFeed(ds, 2, seed=3, shard=(node, 4)) for node in range(4)]
    first = [feed.next_plan() for feed in feeds]
    assert [p.indices.tolist() for p in first] == [share(epoch_order(10, 3, 0), n, 4)[0][:2].tolist() for n in range(4)]
    rest = [feed.next_plan() for feed in feeds]
    assert all(len(a.indices) + len(b.indices) == 3 and b.last for a, b in zip(first, rest))  # 10 -> 12: 3 per node
    real = [i for plan in first + rest for i, pad in zip(plan.indices.tolist(), plan.padded.tolist()) if not pad]
    assert sorted(real) == list(range(10))
    feed = EpochFeed(ds, 2, seed=3, shard=(0, 4))
    plan = feed.next_plan()
    feed.exclude(int(plan.indices[1]), "broken")
    feed.rewind(plan)  # the worker was lost with it
    again = feed.next_plan()
    assert again.indices.tolist() == [plan.indices[0]] * 2 and again.padded.tolist() == [False, True]
    assert feed.epoch_size == 3  # the share keeps its size: the ranks' counts stay equal
