"""Which decoded-sample cache a producer uses (``--cache``, ``--cache-limit``): plain Python, decided
once the first batch has given the sample shape and the worker has said whether the stage is
deterministic (NOTE [ Cache protocol ] in filling.py).
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

DEFAULT_LIMIT_SHARE = 0.5
"""``--cache-limit`` by default: this share of the memory available when the producer starts (and of
the free space in /dev/shm, where a memory cache lives), or of the GPU's free memory for a GPU cache."""

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class CacheMode(str, enum.Enum):
    """``--cache``. AUTO becomes MEMORY or OFF at start (`choose`); the others are kept or refused."""

    AUTO = "auto"      # memory if the decoded dataset fits the limit and the stage is deterministic, else off
    MEMORY = "memory"  # host shared memory (/dev/shm)
    GPU = "gpu"        # the producer's GPU memory, shared through CUDA IPC
    DISK = "disk"      # a file in a folder on a local disk (``--cache DIR``); outlives the producer
    OFF = "off"        # no cache: the streaming ring, paced by the slowest job


@dataclass(frozen=True)
class CacheChoice:
    mode: CacheMode
    reason: str             # printed at start
    folder: Path | None = None  # DISK: where the cache file lives


def parse_cache(value: str) -> tuple[CacheMode, Path | None]:
    """``--cache auto|memory|gpu|off|DIR``."""
    try:
        mode = CacheMode(value)
    except ValueError:
        folder = Path(value)
        if not folder.is_dir():
            raise ConfigError(f"--cache {value!r} is none of auto, memory, gpu, off, and not a folder; "
                              f"create the folder or pick a mode") from None
        return CacheMode.DISK, folder
    if mode is CacheMode.DISK:
        raise ConfigError("--cache disk: give the folder itself, e.g. --cache /nvme/dalishare-cache")
    return mode, None


def parse_size(text: str) -> int:
    """``--cache-limit``: bytes, or with a K/M/G/T suffix (powers of 1024), e.g. ``64G``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if match is None:
        raise ConfigError(f"--cache-limit {text!r}: use a size such as 500M, 64G or 2T")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def default_limit(gpu: int | None = None, meminfo: Path = Path("/proc/meminfo"), shm: Path = Path("/dev/shm")) -> int:
    """DEFAULT_LIMIT_SHARE of the memory available now, and of /dev/shm's free space; with ``gpu``,
    of that GPU's free memory."""
    if gpu is not None:
        from ..shm.device import free_bytes

        return int(DEFAULT_LIMIT_SHARE * free_bytes(gpu))
    available = 0
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    st = os.statvfs(shm)
    return int(DEFAULT_LIMIT_SHARE * min(available, st.f_bavail * st.f_frsize))


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def choose(mode: CacheMode, folder: Path | None, *, samples: int, sample_bytes: int, limit: int,
           stateful_ops: list[str]) -> CacheChoice:
    """The cache to use, or `ConfigError` for an explicit choice that cannot work (exit code 2)."""
    size = samples * sample_bytes
    if mode is CacheMode.OFF:
        return CacheChoice(CacheMode.OFF, "--cache off")
    if stateful_ops:
        why = (f"the stage is not deterministic ({', '.join(stateful_ops)}): its samples differ from epoch to "
               f"epoch, so they cannot be kept")
        if mode is CacheMode.AUTO:
            return CacheChoice(CacheMode.OFF, f"no cache: {why}")
        raise ConfigError(f"--cache {mode.value if folder is None else folder}: {why}; move the random "
                          f"operators to the jobs' side (dalishare.augment) or serve with --cache off")
    if mode is CacheMode.DISK:
        return CacheChoice(CacheMode.DISK, f"cache of {human(size)} in {folder}", folder)
    fits = size <= limit
    if mode is CacheMode.AUTO:
        if fits:
            return CacheChoice(CacheMode.MEMORY, f"cache in memory: the decoded dataset ({human(size)}) fits "
                                                 f"the limit ({human(limit)})")
        return CacheChoice(CacheMode.OFF, f"no cache: the decoded dataset ({human(size)}) exceeds the limit "
                                          f"({human(limit)}); raise --cache-limit or give --cache DIR")
    if not fits:
        raise ConfigError(f"--cache {mode.value}: the decoded dataset needs {human(size)}, more than the limit of "
                          f"{human(limit)}; raise --cache-limit, or use --cache DIR or --cache off")
    return CacheChoice(mode, f"cache of {human(size)} in {'GPU' if mode is CacheMode.GPU else 'host'} memory")
