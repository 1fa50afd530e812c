"""Consumer groups: which rank of which group a job is (`Membership`), and the check that every rank
of a DDP job reads from producers that agree (`check_consistent`). The cuts themselves are
`wire.order.share`; the messages are NOTE [ Control protocol ] (wire/messages.py), "Groups".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Membership:
    """This job is rank ``rank`` of the ``world`` ranks of consumer group ``name`` (on one producer)."""

    name: str
    rank: int
    world: int
    drop_last: bool


def membership(group: str | None, rank: int | None, world_size: int | None, drop_last: bool,
               env=os.environ) -> Membership | None:
    """The job's place in ``group``, from (in this order) the arguments, torchrun's LOCAL_RANK and
    LOCAL_WORLD_SIZE (a group is the ranks of one node: each node has its producer), an initialized
    torch.distributed, or RANK and WORLD_SIZE. None without a group."""
    if not group:
        if rank is not None or world_size is not None:
            raise ConfigError("rank= and world_size= need group=: name the consumer group these ranks form")
        return None
    if (rank is None) != (world_size is None):
        raise ConfigError("pass both rank= and world_size=, or neither (then they come from torchrun or "
                          "torch.distributed)")
    if rank is None:
        rank, world_size = _from_launcher(env)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not between 0 and world_size - 1 = {world_size - 1}")
    return Membership(group, rank, world_size, drop_last)


def _from_launcher(env) -> tuple[int, int]:
    if "LOCAL_RANK" in env and "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    raise ConfigError("group= needs this job's rank and world size: launch it with torchrun, initialize "
                      "torch.distributed first, or pass rank= and world_size=")


def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def attach_failed(error: BaseException) -> None:
    """This rank could not attach: take part in the peers' `check_consistent` with the error, so
    they fail at once too instead of waiting in the collective."""
    dist = _distributed()
    if dist is not None:
        dist.all_gather_object([None] * dist.get_world_size(), {"error": f"{type(error).__name__}: {error}"})


def check_consistent(fingerprint: dict, shard: tuple[int, int], member: Membership, seed: int | None,
                     per_rank: int) -> None:
    """With torch.distributed initialized, compare what every rank's producer serves (all ranks call
    this together, at attach): raise `ConfigError` naming the first difference, so no rank ever
    trains on other data than its peers, nor a different number of batches. Without
    torch.distributed there is nothing to compare with."""
    dist = _distributed()
    if dist is None:
        return
    mine = {**fingerprint, "group": member.name, "group size": member.world, "drop_last": member.drop_last,
            "seed= of the job": seed, "samples per rank": per_rank, "shard": list(shard)}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    failed = [(rank, r["error"]) for rank, r in enumerate(everyone) if "error" in r]
    if failed:
        raise ConfigError(f"rank {failed[0][0]} of this DDP job could not attach ({failed[0][1]}), so no rank can "
                          f"go on")
    for other, theirs in enumerate(everyone):
        key = next((k for k in sorted(mine) if k != "shard" and theirs.get(k) != mine[k]), None)
        if key is not None:
            what = "producer's " if key in fingerprint else ""
            raise ConfigError(f"rank {dist.get_rank()} and rank {other} of this DDP job disagree on the {what}{key}: "
                              f"{mine[key]!r} here, {theirs.get(key)!r} there; start every node's producer with the "
                              f"same dataset, stage, --seed and --shard N, and every rank with the same group=, "
                              f"drop_last= and seed=")
    indices = sorted({r["shard"][0] for r in everyone})
    if indices != list(range(shard[1])) or len(everyone) != shard[1] * member.world:
        raise ConfigError(f"this DDP job's {len(everyone)} ranks read from producers serving shards {indices} of "
                          f"{shard[1]}, in groups of {member.world}: every shard needs one group on its node, and "
                          f"the world size must be shards x group size")


def check_same_epoch(epoch: int) -> None:
    """On the ring, each node's producer serves its own stream: the ranks of a job spanning sharded
    producers must start at the same epoch, or they would combine shares of different epochs (a
    collective, in every rank's first pass)."""
    dist = _distributed()
    if dist is None:
        return
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, epoch)
    if len(set(everyone)) > 1:
        raise ConfigError(f"the ranks of this DDP job start at epochs {everyone} of their nodes' producers, which "
                          f"stream through their rings: start the job on freshly started producers (or serve with a "
                          f"cache, where every job counts its own epochs)")
