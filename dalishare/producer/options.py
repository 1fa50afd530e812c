"""The options of ``dalishare serve``: one source of truth for the producer and the CLI's defaults."""

from __future__ import annotations

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
