"""What a job reads from, chosen once per attachment: the producer's ring or its cache.

`session.open_reader` makes that choice from the producer's ``Welcome`` (as PyTorch's
``DataLoader._get_iterator`` picks its iterator class once) and returns a `RingReader` or a
`CacheReader`. Each cuts this job's batches, for a whole epoch or for a share of it (a rank of a
consumer group, a node's shard), with one code path; the iterator drives either through the
`Reader` interface below and never asks which it has. What both need: `ReadOptions` (the job's
choices), `share_size` (the share rule), `target_device` and `labels_to` (where batches go).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .group import Membership


@dataclass(frozen=True)
class ReadOptions:
    """The job's choices that decide how it reads (`DaliShareIterator`'s arguments of those names)."""

    batch_size: int | None = None      # None: the producer's
    device: torch.device | None = None  # None: where the producer's data is
    copy: bool | None = None           # None: own copies from a GPU ring, views of a host ring (RingReader)
    seed: int | None = None            # the job's own order (a cache only)
    member: Membership | None = None   # None: an independent job
    drop_last: bool = False
    batch_timeout: float = 600.0
    reconnect: bool = False


class Reader(Protocol):
    """One pass at a time over one epoch (or this job's share of it).

    ``begin_pass(resume)`` starts a pass and returns its (epoch, first position), or None when there
    is nothing to read (the producer stopped, finished or was lost: the session's ``lost`` says
    which); ``next_batch()`` gives the pass's batches (a dict) and then None; ``position`` is
    where the job is in the pass's order after the last batch; ``epoch_read`` says whether the pass
    read its epoch to the end; ``end_pass()`` counts a pass that ended or was left;
    ``leave_last_pass(resume)`` lets go of a pass left by a break before the next begins (unless a
    state loaded since, ``resume``, is in it: then the next pass reads on in it);
    ``unmap_device_memory()``, once the producer said Stop and this job's GPU reads of its memory
    are done, ends the pass and unmaps the producer's GPU memory, returning whether no view a user
    still holds keeps it mapped (NOTE [ Producer shutdown ])."""

    source: str                # "ring" or "cache": what a saved position is a position in
    device: torch.device       # where the producer's data is
    batch_size: int
    passes: int                # passes this job finished or left (a cache: its epochs); 0 on the ring
    position: int
    epoch_read: bool
    splits: bool               # this job reads a share of each epoch (group rank or sharded producer)

    @property
    def samples_per_epoch(self) -> int: ...
    def leave_last_pass(self, resume: tuple[int, int] | None = None) -> bool: ...
    def resume_point(self, epoch: int, position: int) -> tuple[int, int]: ...
    def begin_pass(self, resume: tuple[int, int] | None) -> tuple[int, int] | None: ...
    def next_batch(self) -> dict | None: ...
    def end_pass(self) -> None: ...
    def unmap_device_memory(self) -> bool: ...
    def close(self) -> None: ...


def share_size(samples: int, parts: int, drop_last: bool) -> int:
    """Samples in each of ``parts`` shares of an order of ``samples``: wire/order.share's rule
    (DistributedSampler's), which both readers cut by (part p takes positions p, p + parts, ...)."""
    return samples // parts if drop_last else -(-samples // parts)  # as share() cuts (no array: len() is cheap)


def target_device(requested: torch.device | None, data: torch.device) -> torch.device:
    """Where batches go: ``requested``, else where the data is (a bare "cuda": the current GPU)."""
    target = requested or data
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return target


def labels_to(labels: torch.Tensor, target: torch.device) -> torch.Tensor:
    """``labels`` (on the CPU) on ``target``: pinned and non-blocking, since a plain copy to a GPU
    would wait for the work queued there."""
    if target.type == "cpu":
        return labels
    return labels.pin_memory().to(target, non_blocking=True)
