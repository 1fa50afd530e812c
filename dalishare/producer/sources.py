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


def scan(data: str, index_dir: Path | None = None) -> Dataset:
    """``index_dir``: where shards' member index is kept between runs (a DIR cache's folder)."""
    if "{" in data:  # WebDataset's shard pattern: DIR/train-{000000..000146}.tar
        shards = [Path(p) for p in braceexpand(data)]
        return scan_shards(data, shards[0].parent, shards, index_dir)
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
        return scan_shards(data, path, tars, index_dir)
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


def scan_shards(data: str, root: Path, shards: list[Path], index_dir: Path | None = None) -> Dataset:
    """WebDataset shards: a sample is the members of one shard sharing a key (the member's name up
    to its first dot); its image the ``jpg``/``jpeg``/``png``/``webp`` member, its label the ``cls``
    member. Members are indexed by offset (nothing is unpacked); samples without an image or a label
    are named in one warning, as are shards without samples. With ``index_dir``, the index is kept
    there, keyed by the shards' listing digest, and read back instead of the tars next time."""
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} of the {len(shards)} shards {data} names do not exist: "
                           f"{', '.join(missing[:SHOWN])}")
    names, digest = Names.build(), ListingDigest(SourceKind.SHARDS.value)
    for shard in shards:  # the shards' names, sizes and times: the key of their index (and of a cache)
        rel, st = os.path.relpath(shard, root), shard.stat()
        names.add(rel)
        digest.add(rel, st.st_size, st.st_mtime_ns)
    names, digests = names.done(), digest.digests()
    saved = index_dir / f"shards-{digests[0].hex()[:32]}.npz" if index_dir is not None else None
    if saved is not None and saved.is_file():
        members, labels = _load_index(saved)
        log.info("read the index of %d samples in %d shards from %s", len(labels), len(shards), saved)
    else:
        members, labels = _index_members(data, shards, names)
        if saved is not None:
            _save_index(saved, members, labels)
    classes = [str(k) for k in range(int(labels.max()) + 1)]
    return Dataset(root, classes, Locators(root, names, members), labels, SourceKind.SHARDS, data, digests)


def _index_members(data: str, shards: list[Path], names: Names) -> tuple[Members, np.ndarray]:
    """Every complete sample's image member (shard, offset, size, name) and label, from the tars."""
    key_names, shard_of, offsets, sizes, labels = Names.build(), array("i"), array("q"), array("q"), array("i")
    incomplete, empty = [], []
    for number, shard in enumerate(shards):
        rel = names[number]
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
    return members, _small(labels)


def _save_index(path: Path, members: Members, labels: np.ndarray) -> None:
    """Written whole under another name, then renamed: a reader never sees half an index."""
    partial = path.with_suffix(f".{os.getpid()}.partial.npz")
    np.savez(partial, shard=members.shard, offset=members.offset, size=members.size, labels=labels,
             names=np.frombuffer(members.key_names.blob, np.uint8), name_offsets=members.key_names.offsets)
    os.replace(partial, path)


def _load_index(path: Path) -> tuple[Members, np.ndarray]:
    with np.load(path) as saved:
        names = Names(saved["names"].tobytes(), saved["name_offsets"])
        return Members(saved["shard"], saved["offset"], saved["size"], names), saved["labels"]


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
