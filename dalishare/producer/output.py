"""Which output a producer serves, decided once, with its reason logged: a cache of the decoded
samples (cache_serving.py) when the options and the stage allow one, else the ring (ring_serving.py).

Two moments decide: when the dataset is listed, a ``--cache DIR`` holding a complete or resumable
cache of this dataset and stage is served at once (`reopen_disk_cache`); otherwise the first batch,
decoded alone (`serving.Measuring`), gives the sample shape and the stage's random operators, and
`open_output` applies `cache_policy.choose`. An explicit cache that cannot be had raises
`ConfigError` (exit code 2); ``auto`` or ``DIR`` fall back to the ring with a warning.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ConfigError
from ..shm.cache import CacheLayout, cache_key
from .cache_policy import CacheChoice, CacheMode, choose, default_limit, human, parse_cache
from .cache_serving import CacheServing
from .feed import EpochFeed
from .filling import dali_version, disk_cache_path, reusable_layout
from .ring_serving import RingServing
from .serving import Context, Serving
from .stage import parse_device
from .supervisor import StageSupervisor

log = logging.getLogger(__name__)


def decoder(options) -> str:
    """Which decoder makes the pixels (part of a cache's key: the GPU's decoder differs slightly)."""
    return "cpu" if parse_device(options.device) is None else "gpu"


def reopen_disk_cache(ctx: Context) -> CacheServing | None:
    """With ``--cache DIR``: the cache of this dataset and stage found there (its key matches), so
    the sample shape is known without decoding anything; else None."""
    mode, folder = parse_cache(ctx.options.cache)
    if mode is not CacheMode.DISK:
        return None
    path = disk_cache_path(folder, ctx.data, ctx.pipeline_file)
    layout = reusable_layout(path, ctx.listing, ctx.pipeline_file, decoder(ctx.options))
    if layout is None:
        return None
    choice = CacheChoice(CacheMode.DISK, f"reusing the cache of this dataset and stage in {folder}", folder)
    log.info("%r: %s", ctx.options.name, choice.reason)
    return CacheServing(ctx, choice, layout, excluded={}, stage=None)


def open_output(ctx: Context, feed: EpochFeed, stage: StageSupervisor, shape: list, dtype: np.dtype) -> Serving:
    """After the first batch (``shape`` ``dtype``): the cache the options and the stage allow, else
    the ring."""
    opts = ctx.options
    mode, folder = parse_cache(opts.cache)
    sample_bytes = int(np.prod(shape)) * dtype.itemsize
    limit = opts.cache_limit if opts.cache_limit is not None else \
        default_limit(parse_device(opts.device) if mode is CacheMode.GPU else None)
    choice = choose(mode, folder, samples=len(ctx.dataset), sample_bytes=sample_bytes, limit=limit,
                    stateful_ops=ctx.stateful)
    log.info("%r: %s", opts.name, choice.reason)
    if choice.mode is not CacheMode.OFF:
        key = cache_key(ctx.listing, ctx.pipeline_file, shape, dtype.name, dali_version(), decoder(opts))
        layout = CacheLayout(key, len(ctx.dataset), shape, dtype.name, rows_in_file=choice.mode is not CacheMode.GPU,
                             source=ctx.dataset.source)
        try:
            return CacheServing(ctx, choice, layout, excluded=feed.excluded, stage=stage)
        except ConfigError:
            raise
        except Exception as exc:  # no room on the disk, in /dev/shm or on the GPU (ENOSPC, out of memory)
            if mode in (CacheMode.MEMORY, CacheMode.GPU):  # asked for explicitly: exit 2
                raise ConfigError(f"--cache {mode.value}: cannot allocate the cache of {human(layout.rows_bytes)} "
                                  f"({exc}); lower --cache-limit to what is free, or use --cache DIR or off") from None
            log.warning("%r: cannot create the cache (%s); serving without it (--cache off)", opts.name, exc)
    return RingServing(ctx, feed, stage, shape, dtype)
