"""The options of ``dalishare serve``: one source of truth for the producer and the CLI's defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ConfigError
from ..intervals import STAGE_TIMEOUT_S
from ..shm import DEFAULT_SLOTS, MAX_SLOTS
from ..shm import names
from .cache_policy import CacheMode, parse_cache
from .stage import parse_device


@dataclass
class ServeOptions:
    """What a producer serves and how; each field is a ``dalishare serve`` option of the same name
    (``num_threads`` is ``--threads``)."""

    name: str = "default"
    batch_size: int = 64
    device: str = "cpu"
    slots: int = DEFAULT_SLOTS
    seed: int = 0
    epochs: int | None = None          # None: serve until stopped
    min_consumers: int = 1
    num_threads: int | None = None
    heartbeat_timeout: float = 10.0
    stall_timeout: float = 30.0
    stage_timeout: float = STAGE_TIMEOUT_S  # a stage worker silent this long with work outstanding is replaced
    cache: str = "auto"                # auto, memory, gpu, off, or a folder (cache_policy.parse_cache)
    cache_limit: int | None = None     # bytes; None: cache_policy.default_limit()
    shard: str = "0/1"                 # "I/N": serve node I's share of each epoch; "auto": from the launcher

    @property
    def shard_of(self) -> tuple[int, int]:
        """(I, N) of ``shard``."""
        return parse_shard(self.shard)

    def check(self) -> None:
        names.check_name(self.name)
        for key in ("batch_size", "slots", "min_consumers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1")
        if self.slots > MAX_SLOTS:
            raise ConfigError(f"--slots must be at most {MAX_SLOTS}")
        if self.stage_timeout <= 0:
            raise ConfigError("--stage-timeout must be positive")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError("--epochs must be at least 1")
        parse_device(self.device)  # a GPU that is not there fails here, in one line
        mode, _ = parse_cache(self.cache)
        if mode is CacheMode.GPU and parse_device(self.device) is None:
            raise ConfigError("--cache gpu keeps the decoded samples on the producer's GPU: serve with --device gpu "
                              "(or use --cache memory)")
        if self.cache_limit is not None and self.cache_limit < 0:
            raise ConfigError("--cache-limit must not be negative")
        parse_shard(self.shard)  # a bad --shard fails here, in one line


# Launcher variables that say which node this is and how many there are, in the order they are tried:
# Slurm, then the PyTorch convention (Lightning, Kubeflow's PyTorchJob), then torchelastic's.
SHARD_VARIABLES = (("SLURM_NODEID", "SLURM_NNODES"), ("NODE_RANK", "NNODES"), ("GROUP_RANK", "GROUP_WORLD_SIZE"))


def parse_shard(text: str, env=os.environ) -> tuple[int, int]:
    """``--shard I/N`` (node I of N, counted from 0) or ``auto`` (from SHARD_VARIABLES)."""
    if text == "auto":
        for rank, size in SHARD_VARIABLES:
            if rank in env and size in env:
                text = f"{env[rank]}/{env[size]}"
                break
        else:
            raise ConfigError(f"--shard auto: none of {', '.join(f'{r}/{s}' for r, s in SHARD_VARIABLES)} is set "
                              f"here; give --shard I/N (this node's index from 0, and the number of nodes)")
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: use I/N, e.g. 0/4 for the first of 4 nodes, or auto") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard {text}: I must be from 0 to N-1")
    return index, count
