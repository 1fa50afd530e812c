"""The order of each epoch: a contract between the producer (which serves, and fills its cache, in
it) and the jobs (which compute it themselves when they read a cache at their own pace)."""

from __future__ import annotations

import numpy as np


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample indices of ``epoch`` in the order they are served: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples).astype(np.int64)


def share(order: np.ndarray, part: int, parts: int, drop_last: bool = False,
          padded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Part ``part`` of ``parts`` of ``order``, as torch's DistributedSampler cuts it: every part gets
    the same count, and together they hold every sample once, plus padding. Without ``drop_last``
    the order is padded to a multiple of ``parts`` by repeating its first samples; with it the tail
    that does not divide is dropped. Part p takes positions p, p + parts, ...

    Returns the part's samples and a mask of those that are padding (repeats); ``padded`` marks
    samples of ``order`` that are padding already (a node's share cut again among its ranks)."""
    n = len(order)
    total = (n // parts) * parts if drop_last else -(-n // parts) * parts
    positions = np.arange(part, total, parts) % max(n, 1)
    mask = np.arange(part, total, parts) >= n
    if padded is not None:
        mask |= padded[positions]
    return order[positions] if n else order[:0], mask
