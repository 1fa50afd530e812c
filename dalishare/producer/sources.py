"""The three layouts ``--data`` names, each scanned into a compact `Dataset` in one pass that also
takes the listing's digests (what keys a cache): class folders, a file list, WebDataset shards.

A sample's index is its position in the listing, the same on every scan of the same data: class
folders sort by (class, path inside it); a list keeps its line order; shards keep their order (sorted
in a folder, as the pattern spells them) and their members' order.
"""

from __future__ import annotations

import logging
import os
import tarfile
from array import array
from pathlib import Path

import numpy as np
from braceexpand import braceexpand

from ..errors import DatasetError
from ..shm.cache import ListingDigest
from .listing import IMAGE_EXTENSIONS, Dataset, Locators, Members, Names, SourceKind

log = logging.getLogger(__name__)

SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a sample's image member, in this preference
SHARD_LABEL_EXTENSION = "cls"  # its label: an integer as text
SHOWN = 20  # names a warning lists before "and N more"


def scan(data: str) -> Dataset:
    if "{" in data:  # WebDataset's shard pattern: DIR/train-{000000..000146}.tar
        shards = [Path(p) for p in braceexpand(data)]
        return scan_shards(data, shards[0].parent, shards)
    path = Path(data)
    if path.is_file():
        return scan_list(path)
    if not path.is_dir():
        raise DatasetError(f"--data {data} does not exist: give a folder of class folders, a file list "
                           f"(RELATIVE/PATH LABEL lines) or WebDataset shards (a folder of .tar files or a "
                           f"pattern such as 'DIR/train-{{000000..000146}}.tar')")
    entries = list(os.scandir(path))
    classes = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    tars = sorted(Path(e.path) for e in entries if e.name.endswith(".tar") and e.is_file())
    if tars and not classes:
        return scan_shards(data, path, tars)
    return scan_folders(path)


def scan_folders(root: Path) -> Dataset:
    """``root/CLASS/**/FILE`` (the ImageFolder convention): classes are the sorted sub-folder names;
    files without an image extension are skipped with one warning naming them."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    names, labels, digest, skipped = Names.build(), array("i"), ListingDigest(), []
    for label, cls in enumerate(classes):
        found = []  # (path inside root, "/" as "\0" so it sorts as the path's parts do; size; mtime)
        for rel, entry in _files(root / cls, cls):
            if os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
                skipped.append(rel)
                continue
            st = entry.stat()
            found.append((rel.replace("/", "\0"), st.st_size, st.st_mtime_ns))
        found.sort()
        for key, size, mtime in found:
            rel = key.replace("\0", "/")
            names.add(rel)
            labels.append(label)
            digest.add(rel, size, mtime)
    if skipped:
        _warn(f"skipped {len(skipped)} files without an image extension in {root}", skipped)
    if not labels:
        raise DatasetError(f"no images found in {root}: expected class folders holding image files "
                           f"({', '.join(sorted(IMAGE_EXTENSIONS))}), a file list or WebDataset shards")
    listing = names.done()
    return Dataset(root, classes, Locators(root, listing), _small(labels), SourceKind.FOLDERS, str(root),
                   digest.digests())


def _files(folder: Path, rel: str):
    """(path inside the data, DirEntry) of every file under ``folder``; symlinked folders are not
    followed (as pathlib's rglob), symlinked files are."""
    stack = [(str(folder), rel)]
    while stack:
        path, prefix = stack.pop()
        with os.scandir(path) as it:
            for entry in it:
                if entry.is_dir():
                    if not entry.is_symlink():
                        stack.append((entry.path, f"{prefix}/{entry.name}"))
                elif entry.is_file():
                    yield f"{prefix}/{entry.name}", entry


def scan_list(path: Path) -> Dataset:
    """A file list: one ``RELATIVE/PATH LABEL`` per line (DALI's ``file_list``), paths relative to the
    list's folder, integer labels; its line order is the sample index. A missing or unreadable file is
    excluded as a file that does not decode is; a malformed line is a `DatasetError` naming it."""
    root = path.parent
    names, labels, digest = Names.build(), array("i"), ListingDigest(SourceKind.LIST.value)
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text:
                continue
            rel, label = _list_line(path, number, text)
            try:
                st = os.stat(root / rel)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, 0  # the stage worker's read fails and the probe excludes it
            names.add(rel)
            labels.append(label)
            digest.add(rel, size, mtime)
    if not labels:
        raise DatasetError(f"the file list {path} names no samples: expected 'RELATIVE/PATH LABEL' lines")
    classes = [str(k) for k in range(max(labels) + 1)]
    return Dataset(root, classes, Locators(root, names.done()), _small(labels), SourceKind.LIST, str(path),
                   digest.digests())


def _list_line(path: Path, number: int, text: str) -> tuple[str, int]:
    parts = text.rsplit(None, 1)
    label = parts[1] if len(parts) == 2 else ""
    if not label.isdigit() or os.path.isabs(parts[0]):
        raise DatasetError(f"{path}, line {number}: {text!r} is not 'RELATIVE/PATH LABEL' (a path relative to the "
                           f"list's folder, then an integer label 0 or more); fix or remove that line")
    return parts[0], int(label)


def scan_shards(data: str, root: Path, shards: list[Path]) -> Dataset:
    """WebDataset shards: a sample is the members of one shard sharing a key (the member's name up
    to its first dot); its image the ``jpg``/``jpeg``/``png``/``webp`` member, its label the ``cls``
    member. Members are indexed by offset (nothing is unpacked); samples without an image or a label
    are named in one warning, as are shards without samples."""
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} of the {len(shards)} shards {data} names do not exist: "
                           f"{', '.join(missing[:SHOWN])}")
    names, key_names, digest = Names.build(), Names.build(), ListingDigest(SourceKind.SHARDS.value)
    shard_of, offsets, sizes, labels = array("i"), array("q"), array("q"), array("i")
    incomplete, empty = [], []
    for number, shard in enumerate(shards):
        rel = os.path.relpath(shard, root)
        st = shard.stat()
        names.add(rel)
        digest.add(rel, st.st_size, st.st_mtime_ns)
        found = 0
        for key, image, label in _samples(shard, incomplete):
            shard_of.append(number)
            offsets.append(image.offset_data)
            sizes.append(image.size)
            labels.append(label)
            key_names.add(image.name)
            found += 1
        if not found:
            empty.append(rel)
    if incomplete:
        _warn(f"skipped {len(incomplete)} samples of {data} without an image ({'/'.join(SHARD_IMAGE_EXTENSIONS)}) "
              f"or an integer label ({SHARD_LABEL_EXTENSION})", incomplete)
    if empty:
        _warn(f"{len(empty)} shards of {data} hold no samples", empty)
    if not labels:
        raise DatasetError(f"the shards {data} hold no samples with an image and a label")
    members = Members(np.frombuffer(shard_of, np.int32), np.frombuffer(offsets, np.int64),
                      np.frombuffer(sizes, np.int64), key_names.done())
    classes = [str(k) for k in range(max(labels) + 1)]
    return Dataset(root, classes, Locators(root, names.done(), members), _small(labels), SourceKind.SHARDS, data,
                   digest.digests())


def _samples(shard: Path, incomplete: list[str]):
    """(key, image member, label) of each complete sample of ``shard``, in member order; the keys of
    incomplete ones are appended to ``incomplete``."""
    try:
        with tarfile.open(shard, mode="r:") as tar:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar:
                if member.isfile():
                    folder, base = os.path.split(member.name)
                    stem, _, ext = base.partition(".")
                    groups.setdefault(os.path.join(folder, stem), {})[ext.lower()] = member
            for key, group in groups.items():
                image = next((group[e] for e in SHARD_IMAGE_EXTENSIONS if e in group), None)
                label = _label(tar, group.get(SHARD_LABEL_EXTENSION))
                if image is None or label is None:
                    incomplete.append(f"{shard.name}:{key}")
                else:
                    yield key, image, label
    except tarfile.TarError as exc:
        raise DatasetError(f"{shard} is not a readable tar file ({exc}); remove it from --data or rewrite it") from None


def _label(tar: tarfile.TarFile, member: tarfile.TarInfo | None) -> int | None:
    if member is None or member.size > 32:
        return None
    text = tar.extractfile(member).read().decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _small(labels: array) -> np.ndarray:
    return np.frombuffer(labels, dtype=np.int32)


def _warn(what: str, names: list[str]) -> None:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    log.warning("%s: %s%s", what, ", ".join(names[:SHOWN]), more)
