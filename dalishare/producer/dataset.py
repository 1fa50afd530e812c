"""The dataset: image files in class folders and their stable sample indices (the order of each epoch
is wire/order.py)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from ..shm.cache import listing_digests

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .png .bmp .tif .tiff .webp .jp2 .j2k .pnm .ppm .pgm .pbm".split())


@dataclass(frozen=True)
class Dataset:
    """``files[i]`` is sample i; its label is ``labels[i]``, the index of its class in ``classes``."""

    root: Path
    classes: list[str]
    files: list[Path]
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.files)


def scan(root: str | Path) -> Dataset:
    """Scan ``root/CLASS/**/FILE`` (the ImageFolder convention).

    Classes are the sorted sub-folder names; samples are sorted by (class, path inside the class), so
    a sample's index is the same on every scan of the same files. Files without an image extension
    are skipped with one warning naming them.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist or is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    skipped: list[Path] = []
    for label, cls in enumerate(classes):
        for path in sorted(p for p in (root / cls).rglob("*") if p.is_file()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(path)
                labels.append(label)
            else:
                skipped.append(path)
    if skipped:
        shown = ", ".join(str(p.relative_to(root)) for p in skipped[:20])
        more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        log.warning("skipped %d files without an image extension in %s: %s%s", len(skipped), root, shown, more)
    if not files:
        raise DatasetError(f"no images found in {root}: expected class folders holding image files "
                           f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return Dataset(root, classes, files, np.asarray(labels, dtype=np.int64))


class ScanThread:
    """The dataset scan, in a thread so the loop answers jobs meanwhile (a big folder takes a while).
    Daemonic: a producer stopped during the scan does not wait for it."""

    def __init__(self, data: Path):
        self._result: tuple[Dataset, bytes, bytes] | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(data,), name="dalishare-scan", daemon=True)
        self._thread.start()

    def _run(self, data: Path) -> None:
        try:  # the listing digest (a stat per file) keys a cache and tells ranks' datasets apart
            dataset = scan(data)
            self._result = (dataset, *listing_digests(dataset.root, dataset.files))
        except BaseException as exc:  # handed to the loop, which raises it
            self._result = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> tuple[Dataset, bytes, bytes]:
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result
