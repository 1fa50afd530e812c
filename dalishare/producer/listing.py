"""A dataset in memory: its samples' stable indices, where each one's encoded image is, and its label
(the order of each epoch is wire/order.py). sources.py scans the three layouts ``--data`` names into
it; dataset.py is the face the rest of the producer imports.

A dataset of 1.28 M files must not cost an object per sample: the names are one byte blob and an
offset array (`Names`), the labels a small int array, a tar member three ints. What a stage worker
is told to read is a *locator* string, made on demand: a file's absolute path, or for a member of a
WebDataset shard ``tar:OFFSET:SIZE:/abs/shard.tar`` (`read_sample` is its one reader).
"""

from __future__ import annotations

import enum
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .png .bmp .tif .tiff .webp .jp2 .j2k .pnm .ppm .pgm .pbm".split())
TAR_PREFIX = "tar:"  # a locator of a tar member: tar:OFFSET:SIZE:PATH (a file's locator is an absolute path)


class SourceKind(str, enum.Enum):
    """The layout ``--data`` names (status and metrics show it)."""

    FOLDERS = "folders"  # DIR/CLASS/**/FILE, the ImageFolder convention
    LIST = "list"        # a text file of "RELATIVE/PATH LABEL" lines, DALI's file_list convention
    SHARDS = "shards"    # WebDataset tar shards: DIR/*.tar or DIR/name-{000000..000146}.tar


class Names(Sequence[str]):
    """Many strings as one UTF-8 blob and an offset array: ~30 bytes a name instead of ~150."""

    def __init__(self, blob: bytes, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets  # name i is blob[offsets[i]:offsets[i + 1]]

    @classmethod
    def build(cls) -> "NamesBuilder":
        return NamesBuilder()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = _index(i, len(self))
        return self.blob[self.offsets[i]:self.offsets[i + 1]].decode()

    @property
    def nbytes(self) -> int:
        return len(self.blob) + self.offsets.nbytes


def _index(i, n: int) -> int:
    i = int(i)
    if not -n <= i < n:
        raise IndexError(f"index {i} of {n}")
    return i + n if i < 0 else i


@dataclass
class NamesBuilder:
    _blob: bytearray = field(default_factory=bytearray)
    _offsets: array = field(default_factory=lambda: array("q", [0]))

    def add(self, name: str) -> None:
        self._blob += name.encode()
        self._offsets.append(len(self._blob))

    def done(self) -> Names:
        return Names(bytes(self._blob), np.frombuffer(self._offsets, dtype=np.int64))


class Locators(Sequence[str]):
    """``files[i]``: where sample i's encoded image is, as a stage worker reads it (`read_sample`)."""

    def __init__(self, root: Path, names: Names, members: "Members | None" = None):
        self._root, self.names, self.members = os.path.abspath(root), names, members  # a worker's cwd may differ

    def __len__(self) -> int:
        return len(self.names) if self.members is None else len(self.members.shard)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = _index(i, len(self))
        if self.members is None:
            return f"{self._root}/{self.names[i]}"
        m = self.members
        return f"{TAR_PREFIX}{m.offset[i]}:{m.size[i]}:{self._root}/{self.names[int(m.shard[i])]}"

    def describe(self, i: int) -> str:
        """Sample i for a person: its path inside the data, or SHARD.tar:MEMBER."""
        if self.members is None:
            return self.names[i]
        return f"{self.names[int(self.members.shard[i])]}:{self.members.key_names[i]}"


@dataclass(frozen=True)
class Members:
    """The samples of WebDataset shards: sample i's image is ``size[i]`` bytes at ``offset[i]`` in
    shard ``shard[i]`` (an index into the dataset's names); ``key_names[i]`` is its member's name."""

    shard: np.ndarray   # int32
    offset: np.ndarray  # int64, of the member's data in its tar
    size: np.ndarray    # int64
    key_names: Names


@dataclass(frozen=True)
class Dataset:
    """``files[i]`` locates sample i (a path, or a tar member: `read_sample`); its label is
    ``labels[i]``, the index of its class in ``classes``. ``digests``: the listing's, with and
    without modification times (shm.cache.ListingDigest), taken by the scan as it went."""

    root: Path
    classes: list[str]
    files: Sequence  # Locators (or, in tests, a list of paths)
    labels: np.ndarray  # a small int type
    kind: SourceKind = SourceKind.FOLDERS
    data: str = ""  # what --data said
    digests: tuple[bytes, bytes] = (b"", b"")

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, i: int) -> str:
        describe = getattr(self.files, "describe", None)
        return describe(i) if describe is not None else str(self.files[i])

    @property
    def source(self) -> str:
        """What is served, for status and metrics: e.g. ``folders /data/train``."""
        return f"{self.kind.value} {self.data or self.root}"


def read_sample(locator: str) -> np.ndarray:
    """The encoded bytes of one sample (a stage worker's read; a missing file raises OSError)."""
    if locator.startswith(TAR_PREFIX):
        offset, size, path = locator[len(TAR_PREFIX):].split(":", 2)
        with open(path, "rb") as f:
            f.seek(int(offset))
            data = np.frombuffer(f.read(int(size)), dtype=np.uint8)
        if len(data) != int(size):
            raise OSError(f"{path} ends before its member at {offset} (+{size} bytes): the shard is cut short")
        return data
    return np.fromfile(locator, dtype=np.uint8)
