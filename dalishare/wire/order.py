"""The order of each epoch: a contract between the producer (which serves, and fills its cache, in
it) and the jobs (which compute it themselves when they read a cache at their own pace)."""

from __future__ import annotations

import numpy as np


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample indices of ``epoch`` in the order they are served: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples).astype(np.int64)
