"""The decoded-sample cache's storage: the stage's output for every sample of a dataset, written once
by the stage worker and read by every job at its own pace (NOTE [ Cache protocol ] in
producer/filling.py), in one file memory-mapped by all of them: in ``/dev/shm`` (``--cache memory``),
in a folder on a local disk (``--cache DIR``, which outlives the producer), or, for ``--cache gpu``,
a file of marks and labels only, the rows being one allocation on the producer's GPU (device.py).

Layout of the file: a header page (magic, then the `CacheLayout` as JSON), one `Mark` per sample (a
byte), one int64 label per sample, then one row per sample (``sample_bytes`` each, in sample index
order), each section starting on a page. A row is served only once its mark is VALID, and the mark
is set after the row's bytes are written (by the producer, after the worker said it wrote them), so
a cache left half-written by a killed producer is resumed, never served as valid. The file is mode
0600 and fully allocated when created (`posix_fallocate`), so a full disk is found then, not as a
SIGBUS in whoever writes a row later.

The cache is keyed (`cache_key`) by the dataset listing (paths, sizes, modification times), the stage
file's content, the stage's output shape and dtype, and the DALI version: a file with another key is
never reused.
"""

from __future__ import annotations

import enum
import hashlib
import json
import mmap
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .names import CACHE_SUFFIX, SHM_DIR, try_lock

CACHE_MAGIC = b"DALISHARE-CACHE\x02"
PAGE = 4096


class Mark(enum.IntEnum):
    """A sample's state in the cache. MISSING -> VALID (its row is written) or MISSING -> EXCLUDED
    (the stage cannot decode its file); nothing goes back except by rebuilding the cache."""

    MISSING = 0
    VALID = 1
    EXCLUDED = 2


def lock_path(path: Path) -> Path:
    """The lock file of a cache file in a folder, held by the producer that fills it."""
    return Path(path).with_name(Path(path).name + ".lock")


def in_use(path: Path) -> bool:
    """Whether a live producer holds the cache file ``path`` (`dalishare cache remove` skips it)."""
    fd = try_lock(lock_path(path), create=False)
    if fd is None:
        return lock_path(path).exists()
    os.close(fd)
    return False


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


@dataclass(frozen=True)
class CacheLayout:
    """What a reader needs to map the cache; stored in the file's header."""

    key: str            # cache_key(...): hex digest
    samples: int
    sample_shape: list
    dtype: str          # numpy dtype name
    rows_in_file: bool = True  # False: the rows are in GPU memory (--cache gpu), the file has marks and labels
    source: str = ""    # what it caches, for people: "folders DIR", "list FILE", "shards PATTERN" (Dataset.source)

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.sample_shape)) * np.dtype(self.dtype).itemsize

    @property
    def labels_offset(self) -> int:
        return PAGE + _pages(self.samples)

    @property
    def data_offset(self) -> int:
        return self.labels_offset + _pages(8 * self.samples)

    @property
    def rows_bytes(self) -> int:
        return self.samples * self.sample_bytes

    @property
    def file_bytes(self) -> int:
        return self.data_offset + (self.rows_bytes if self.rows_in_file else 0)

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: dict) -> "CacheLayout":
        return cls(key=str(d["key"]), samples=int(d["samples"]), sample_shape=[int(x) for x in d["sample_shape"]],
                   dtype=str(d["dtype"]), rows_in_file=bool(d.get("rows_in_file", True)),
                   source=str(d.get("source", "")))


def listing_digest(root: Path, files: list[Path]) -> bytes:
    """The part of the key that stats every file (the slow part for a big dataset): each file's path
    inside ``root`` (however ``--data`` was spelled), size and modification time."""
    return listing_digests(root, files)[0]


def listing_digests(root: Path, files: list[Path]) -> tuple[bytes, bytes]:
    """`listing_digest`, and the same without modification times (what nodes holding their own
    copies of a dataset compare: a copy has other times), in one pass over the files."""
    digest = ListingDigest()
    for path in files:
        st = os.stat(path)
        digest.add(str(Path(path).relative_to(root)), st.st_size, st.st_mtime_ns)
    return digest.digests()


class ListingDigest:
    """The two listing digests, fed one entry at a time (a dataset's scan feeds it as it stats, so
    the key of a 1.28 M-file dataset costs nothing beyond the scan)."""

    def __init__(self, kind: str = ""):
        """``kind``: the layout (a file list's, shards'), so two layouts of the same files key apart;
        class folders add none, so their keys stay what they were."""
        self._with_times, self._without = hashlib.sha256(), hashlib.sha256()
        if kind:
            self._with_times.update(f"{kind}\n".encode())
            self._without.update(f"{kind}\n".encode())

    def add(self, name: str, size: int, mtime_ns: int) -> None:
        entry = f"{name}\0{size}"
        self._with_times.update(f"{entry}\0{mtime_ns}\n".encode())
        self._without.update(f"{entry}\n".encode())

    def digests(self) -> tuple[bytes, bytes]:
        """(with modification times, without)."""
        return self._with_times.digest(), self._without.digest()


def cache_key(listing: bytes, stage_file: Path, sample_shape: list, dtype: str, dali_version: str,
              decoder: str) -> str:
    """The identity of a cache's content: the same key means the same pixels for every sample.
    ``listing`` is `listing_digest` of the dataset's files; ``decoder`` is "cpu" or "gpu" (the GPU's
    decoders and resize give other pixels than the CPU's)."""
    digest = hashlib.sha256(listing)
    digest.update(hashlib.sha256(Path(stage_file).read_bytes()).digest())
    digest.update(f"{[int(x) for x in sample_shape]}\0{dtype}\0{dali_version}\0{decoder}".encode())
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


def _map(path: Path, layout: CacheLayout, writable: bool) -> mmap.mmap:
    """The whole file, shared. A file in memory (/dev/shm) is mapped with all its pages at once
    (MAP_POPULATE: one call instead of a page fault per 4 KiB while the fill writes and the jobs
    read: measured ~5 % of the fill's rate on 2 cores); a file on disk is not, or mapping it would
    read it all."""
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    in_memory = Path(path).parent == SHM_DIR
    try:
        return mmap.mmap(fd, layout.file_bytes, flags=mmap.MAP_SHARED | (mmap.MAP_POPULATE if in_memory else 0),
                         prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    finally:
        os.close(fd)


def _sections(buffer, layout: CacheLayout):
    """(marks, labels, rows) over a mapping of the whole file; rows is None for a GPU cache."""
    marks = np.frombuffer(buffer, dtype=np.uint8, count=layout.samples, offset=PAGE)
    labels = np.frombuffer(buffer, dtype="<i8", count=layout.samples, offset=layout.labels_offset)
    rows = None
    if layout.rows_in_file:
        rows = np.frombuffer(buffer, dtype=np.uint8, count=layout.rows_bytes, offset=layout.data_offset).reshape(
            layout.samples, layout.sample_bytes)
    return marks, labels, rows


class SampleCache:
    """The producer's side: creates the file (fully allocated: `OSError` ENOSPC if it does not fit),
    or reopens one of the same key (resuming its valid rows); sets the marks. A file in a folder is
    guarded by a lock file beside it (`lock_path`) while the producer lives: two producers must not
    fill one file. A memory cache's name is the producer's own, so it needs none."""

    def __init__(self, path: Path, layout: CacheLayout, labels: np.ndarray):
        self.path, self.layout = Path(path), layout
        self._lock = -1
        if self.path.parent != SHM_DIR:
            self._lock = try_lock(lock_path(self.path), create=True)
            if self._lock is None:
                raise ConfigError(f"the cache {self.path} is being filled by another producer; give this one "
                                  f"another --cache folder, or stop that one")
        try:
            self.resumed = read_layout(self.path) == layout  # an existing file of the same key is reopened
            if not self.resumed:
                self.path.unlink(missing_ok=True)  # another key, or half-made: rebuilt (its readers keep their pages)
                self._create(labels)
            self._map = _map(self.path, layout, writable=True)
        except BaseException:
            self._unlock()
            raise
        self.marks, self.labels, _ = _sections(self._map, layout)

    def _create(self, labels: np.ndarray) -> None:
        layout = self.layout
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.posix_fallocate(fd, 0, layout.file_bytes)  # the disk fills now, or never under a writer
            os.pwrite(fd, np.asarray(labels, dtype="<i8").tobytes(), layout.labels_offset)
            header = CACHE_MAGIC + json.dumps(layout.to_wire()).encode()
            if len(header) > PAGE:
                raise ConfigError(f"cache header of {len(header)} bytes does not fit a page")
            os.pwrite(fd, header, 0)  # last: a file cut short before this is no cache
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock >= 0:
            lock_path(self.path).unlink(missing_ok=True)  # while still locked: see names.try_lock
            os.close(self._lock)
            self._lock = -1

    def valid_count(self) -> int:
        return int(np.count_nonzero(self.marks == Mark.VALID))

    def missing(self) -> np.ndarray:
        """Sample indices with neither a valid row nor an exclusion yet."""
        return np.flatnonzero(self.marks == Mark.MISSING)

    def excluded(self) -> np.ndarray:
        return np.flatnonzero(self.marks == Mark.EXCLUDED)

    def mark(self, indices, mark: Mark = Mark.VALID) -> None:
        """VALID: these rows are written (the worker said so); EXCLUDED: their files cannot be decoded."""
        self.marks[np.asarray(indices, dtype=np.int64)] = mark

    def close(self, remove: bool = False) -> None:
        self.marks = self.labels = None
        try:
            self._map.close()
        finally:
            if remove:
                self.path.unlink(missing_ok=True)
            self._unlock()


class CacheWriter:
    """The stage worker's side of a cache whose rows are in the file: writes rows."""

    def __init__(self, path: Path, layout: CacheLayout):
        self.layout = layout
        self._map = _map(Path(path), layout, writable=True)
        _, _, self._rows = _sections(self._map, layout)

    def write(self, indices, batch) -> None:
        """Row ``indices[i]`` := sample i of ``batch`` (a `stage.StageBatch` on the CPU)."""
        data = batch.numpy()
        self._rows[np.asarray(indices, dtype=np.int64)] = data.reshape(len(indices), -1).view(np.uint8)

    def close(self) -> None:
        self._rows = None
        self._map.close()


class CacheView:
    """A job's side: a read-only mapping of the marks, labels and (unless on a GPU) rows; gathers
    valid rows into a batch it owns (one copy)."""

    def __init__(self, path: Path):
        layout = read_layout(path)
        if layout is None:
            raise ConfigError(f"{path} is not a complete dalishare cache file")
        self.layout = layout
        self._map = _map(Path(path), layout, writable=False)
        self.marks, self.labels, self._rows = _sections(self._map, layout)

    def gather(self, indices, out: np.ndarray) -> np.ndarray:
        """Rows ``indices`` into ``out`` (of the samples' shape and dtype): one copy, which the caller owns."""
        # mode="clip": with the default "raise", numpy buffers ``out`` (a second copy); indices come from the order
        np.take(self._rows, np.asarray(indices, dtype=np.int64), axis=0, out=out.reshape(len(indices), -1).view(np.uint8),
                mode="clip")
        return out

    def close(self) -> None:
        self.marks = self.labels = self._rows = None
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
                valid = int(np.count_nonzero(np.frombuffer(f.read(layout.samples), dtype=np.uint8) == Mark.VALID))
        found.append((path, layout, valid))
    return found
