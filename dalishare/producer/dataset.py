"""The dataset ``--data`` names (class folders, a file list, WebDataset shards) as the producer sees
it: `scan` it, in a `ScanThread` while the serve loop answers jobs. The compact in-memory form is
listing.py; the three layouts, sources.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

from . import sources
from .listing import IMAGE_EXTENSIONS, Dataset, Locators, Members, Names, SourceKind, read_sample

__all__ = ["IMAGE_EXTENSIONS", "Dataset", "Locators", "Members", "Names", "ScanThread", "SourceKind", "read_sample", "scan"]


def scan(data: str | Path, index_dir: Path | None = None) -> Dataset:
    """The dataset ``--data`` names: a folder of class folders, a file list (a file), or WebDataset
    shards (a folder of ``*.tar`` files, or a brace pattern; their member index is kept in
    ``index_dir``, a DIR cache's folder, when given)."""
    return sources.scan(str(data), index_dir)


class ScanThread:
    """The dataset scan, in a thread so the loop answers jobs meanwhile (a big folder takes a while).
    Daemonic: a producer stopped during the scan does not wait for it."""

    def __init__(self, data: str | Path, index_dir: Path | None = None):
        self._result: tuple[Dataset, bytes, bytes] | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(data, index_dir), name="dalishare-scan", daemon=True)
        self._thread.start()

    def _run(self, data: str | Path, index_dir: Path | None) -> None:
        try:  # the listing digests (a stat per file, taken by the scan) key a cache and tell ranks' datasets apart
            dataset = scan(data, index_dir)
            self._result = (dataset, *dataset.digests)
        except BaseException as exc:  # handed to the loop, which raises it
            self._result = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> tuple[Dataset, bytes, bytes]:
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result
