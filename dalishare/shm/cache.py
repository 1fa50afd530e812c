"""The decoded-sample cache's storage (issue 12, in progress): the stage's output for every sample of
a dataset, written once by the stage worker and read by every job, in one file that is memory-mapped
by all of them: in ``/dev/shm`` (``--cache memory``) or in a folder on a local disk (``--cache DIR``,
which outlives the producer). Not wired into ``dalishare serve`` yet.

Layout of the file: a header page (magic, then the `CacheLayout` as JSON), one valid mark
per sample (a byte, padded to a page), then one row per sample (``sample_bytes`` each, in sample
index order). A row is valid only once its mark is 1, and the mark is written after the row's bytes
(by the producer, after the worker said it wrote them), so a cache left half-written by a killed
producer is resumed, never served as valid. The file is mode 0600.

The cache is keyed (`cache_key`) by the dataset listing (paths, sizes, modification times), the stage
file's content, the stage's output shape and dtype, and the DALI version: a file with another key is
never reused.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError

CACHE_MAGIC = b"DALISHARE-CACHE\x01"
PAGE = 4096
CACHE_SUFFIX = ".dscache"


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


@dataclass(frozen=True)
class CacheLayout:
    """What a reader needs to map the cache; stored in the file's header."""

    key: str            # cache_key(...): hex digest
    samples: int
    sample_shape: list
    dtype: str          # numpy dtype name

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.sample_shape)) * np.dtype(self.dtype).itemsize

    @property
    def data_offset(self) -> int:
        return PAGE + _pages(self.samples)

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.samples * self.sample_bytes

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: dict) -> "CacheLayout":
        return cls(key=str(d["key"]), samples=int(d["samples"]), sample_shape=[int(x) for x in d["sample_shape"]],
                   dtype=str(d["dtype"]))


def cache_key(files: list[Path], stage_file: Path, sample_shape: list, dtype: str, dali_version: str) -> str:
    """The identity of a cache's content: the same key means the same pixels for every sample."""
    digest = hashlib.sha256()
    for path in files:
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    digest.update(hashlib.sha256(Path(stage_file).read_bytes()).digest())
    digest.update(f"{list(sample_shape)}\0{dtype}\0{dali_version}".encode())
    return digest.hexdigest()


def read_layout(path: Path) -> CacheLayout | None:
    """The layout in a cache file's header, or None if it is not a cache file (or is cut short)."""
    try:
        with open(path, "rb") as f:
            head = f.read(PAGE)
    except OSError:
        return None
    if not head.startswith(CACHE_MAGIC):
        return None
    try:  # one JSON map, then the page's zero padding
        layout = CacheLayout.from_wire(json.loads(head[len(CACHE_MAGIC):].split(b"\0", 1)[0]))
    except (ValueError, KeyError, TypeError):
        return None
    return layout if os.path.getsize(path) == layout.file_bytes else None


class SampleCache:
    """The producer's side: creates the file, or reopens one of the same key (resuming its valid
    rows), and sets the valid marks."""

    def __init__(self, path: Path, layout: CacheLayout):
        self.path, self.layout = Path(path), layout
        self.resumed = False  # an existing file of the same key was reopened
        if read_layout(self.path) == layout:
            fd = os.open(self.path, os.O_RDWR)
            self.resumed = True
        else:
            self.path.unlink(missing_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, layout.file_bytes)  # sparse: only written rows take space
                header = CACHE_MAGIC + json.dumps(layout.to_wire()).encode()
                if len(header) > PAGE:
                    raise ConfigError(f"cache header of {len(header)} bytes does not fit a page")
                os.pwrite(fd, header, 0)
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
        try:
            self._map = mmap.mmap(fd, layout.file_bytes)
        finally:
            os.close(fd)
        self.marks = np.frombuffer(self._map, dtype=np.uint8, count=layout.samples, offset=PAGE)

    def valid_count(self) -> int:
        return int(np.count_nonzero(self.marks))

    def missing(self) -> np.ndarray:
        """Sample indices whose rows are not valid yet."""
        return np.flatnonzero(self.marks == 0)

    def mark(self, indices) -> None:
        """These rows are written (the worker said so): valid from now on."""
        self.marks[np.asarray(indices, dtype=np.int64)] = 1

    def close(self, remove: bool = False) -> None:
        self.marks = None
        self._map.close()
        if remove:
            self.path.unlink(missing_ok=True)


class CacheWriter:
    """The stage worker's side: writes rows."""

    def __init__(self, path: Path, layout: CacheLayout):
        self.layout = layout
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, layout.file_bytes)
        finally:
            os.close(fd)
        self._rows = np.frombuffer(self._map, dtype=np.uint8, offset=layout.data_offset).reshape(
            layout.samples, layout.sample_bytes)

    def write(self, indices, batch: np.ndarray) -> None:
        """Row ``indices[i]`` := sample i of ``batch`` (``len(indices)`` samples of the layout's shape)."""
        self._rows[np.asarray(indices, dtype=np.int64)] = batch.reshape(len(indices), -1).view(np.uint8)

    def close(self) -> None:
        self._rows = None
        self._map.close()


class CacheView:
    """A job's side: a read-only mapping; gathers valid rows into a batch it owns (one copy)."""

    def __init__(self, path: Path):
        layout = read_layout(path)
        if layout is None:
            raise ConfigError(f"{path} is not a complete dalishare cache file")
        self.layout = layout
        fd = os.open(path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, layout.file_bytes, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.marks = np.frombuffer(self._map, dtype=np.uint8, count=layout.samples, offset=PAGE)
        self._rows = np.frombuffer(self._map, dtype=np.uint8, offset=layout.data_offset).reshape(
            layout.samples, layout.sample_bytes)

    def ready(self, indices) -> bool:
        return bool(self.marks[np.asarray(indices, dtype=np.int64)].all())

    def gather(self, indices, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``indices`` as one array of the samples' shape and dtype (a copy the caller owns)."""
        idx = np.asarray(indices, dtype=np.int64)
        shape = (len(idx), *self.layout.sample_shape)
        if out is None:
            out = np.empty(shape, dtype=self.layout.dtype)
        np.take(self._rows, idx, axis=0, out=out.reshape(len(idx), -1).view(np.uint8))
        return out

    def close(self) -> None:
        self.marks = self._rows = None
        try:
            self._map.close()
        except BufferError:
            pass  # arrays a caller still holds keep the mapping; it goes with the last of them


def list_caches(folder: Path) -> list[tuple[Path, CacheLayout | None, int]]:
    """(file, its layout or None if unreadable, its valid rows) of every cache file in ``folder``."""
    found = []
    for path in sorted(Path(folder).glob(f"*{CACHE_SUFFIX}")):
        layout = read_layout(path)
        valid = 0
        if layout is not None:
            with open(path, "rb") as f:
                f.seek(PAGE)
                valid = int(np.count_nonzero(np.frombuffer(f.read(layout.samples), dtype=np.uint8)))
        found.append((path, layout, valid))
    return found
