"""The decoded-sample cache's parts without processes: its storage (shm/cache.py: rows, marks,
labels, resuming, keys, the lock) and the producer's fill plan (filling.CacheFill); the job's batch
cutting is tests/unit/test_cache_reader.py. Plain files in a temporary folder; no DALI, no producer."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import numpy as np
import pytest

from dalishare.errors import ConfigError
from dalishare.producer.filling import CacheFill
from dalishare.shm.cache import (CACHE_SUFFIX, CacheLayout, CacheView, CacheWriter, Mark, SampleCache, cache_key,
                                 in_use, list_caches, listing_digest, read_layout)

LAYOUT = CacheLayout(key="k1", samples=10, sample_shape=[4, 3, 3], dtype="uint8")
LABELS = np.arange(10) % 3


def _batch(indices):
    """A stand-in for a `stage.StageBatch` on the CPU: sample i is filled with i + 1."""
    data = np.stack([np.full(LAYOUT.sample_shape, i + 1, dtype=np.uint8) for i in indices])
    return SimpleNamespace(numpy=lambda: data)


def test_rows_written_by_the_worker_are_served_only_once_marked_and_gathered_into_a_batch(tmp_path):
    path = tmp_path / f"a{CACHE_SUFFIX}"
    cache = SampleCache(path, LAYOUT, LABELS)
    writer, view = CacheWriter(path, LAYOUT), CacheView(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert os.stat(path).st_blocks * 512 >= LAYOUT.file_bytes, "the file is allocated when created"
        assert view.labels.tolist() == LABELS.tolist()
        writer.write([3, 7], _batch([3, 7]))
        assert view.marks[[3, 7]].tolist() == [Mark.MISSING] * 2  # written, not marked: not valid yet
        cache.mark([3, 7])
        cache.mark([5], Mark.EXCLUDED)
        assert view.marks[[3, 7, 5, 4]].tolist() == [Mark.VALID, Mark.VALID, Mark.EXCLUDED, Mark.MISSING]
        batch = view.gather([7, 3, 7], np.empty((3, 4, 3, 3), np.uint8))
        assert batch[:, 0, 0, 0].tolist() == [8, 4, 8]
        batch[:] = 0  # the job owns its copy: the cache is untouched
        assert view.gather([3], np.empty((1, 4, 3, 3), np.uint8))[0, 0, 0, 0] == 4
        assert cache.valid_count() == 2 and cache.excluded().tolist() == [5]
        assert cache.missing().tolist() == [0, 1, 2, 4, 6, 8, 9]
    finally:
        view.close()
        writer.close()
        cache.close()


def test_a_cache_of_the_same_key_is_resumed_and_one_of_another_key_is_rebuilt(tmp_path):
    path = tmp_path / f"a{CACHE_SUFFIX}"
    cache = SampleCache(path, LAYOUT, LABELS)
    writer = CacheWriter(path, LAYOUT)
    writer.write([0, 1], _batch([0, 1]))
    cache.mark([0])  # the producer was killed before marking row 1
    cache.mark([2], Mark.EXCLUDED)
    writer.close()
    cache.close()
    again = SampleCache(path, LAYOUT, LABELS)
    assert again.resumed and again.missing().tolist() == [1] + list(range(3, 10)) and again.excluded().tolist() == [2]
    again.close()
    other = SampleCache(path, CacheLayout(key="k2", samples=10, sample_shape=[4, 3, 3], dtype="uint8"), LABELS)
    assert not other.resumed and other.valid_count() == 0 and not other.excluded().size
    other.close(remove=True)
    assert not path.exists()


def test_two_producers_cannot_fill_one_cache_file_and_cache_remove_keeps_a_live_one(tmp_path):
    import subprocess
    import sys

    path = tmp_path / f"a{CACHE_SUFFIX}"
    first = SampleCache(path, LAYOUT, LABELS)
    try:
        assert in_use(path)
        with pytest.raises(ConfigError, match="being filled by another producer"):
            SampleCache(path, LAYOUT, LABELS)
        out = subprocess.run([sys.executable, "-m", "dalishare", "cache", "remove", str(tmp_path), "--all"],
                             capture_output=True, text=True, timeout=60)
        assert "removed 0 cache files" in out.stdout and "a live producer is filling or serving it" in out.stdout
        assert path.exists()
    finally:
        first.close()
    assert not in_use(path) and sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the lock file went
    SampleCache(path, LAYOUT, LABELS).close()


def test_a_cache_that_does_not_fit_the_disk_fails_at_creation_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="No space"):
        SampleCache(tmp_path / f"a{CACHE_SUFFIX}", LAYOUT, LABELS)
    assert not list(tmp_path.iterdir())


def test_a_truncated_or_foreign_file_is_not_a_cache(tmp_path):
    path = tmp_path / f"a{CACHE_SUFFIX}"
    SampleCache(path, LAYOUT, LABELS).close()
    with open(path, "r+b") as f:
        f.truncate(LAYOUT.file_bytes - 1)
    assert read_layout(path) is None
    (tmp_path / f"b{CACHE_SUFFIX}").write_bytes(b"not a cache")
    with pytest.raises(ConfigError, match="not a complete dalishare cache"):
        CacheView(tmp_path / f"b{CACHE_SUFFIX}")
    assert [(p.name, layout) for p, layout, _ in list_caches(tmp_path)] == [(f"a{CACHE_SUFFIX}", None),
                                                                            (f"b{CACHE_SUFFIX}", None)]


def test_list_caches_reports_each_file_with_its_valid_rows(tmp_path):
    cache = SampleCache(tmp_path / f"a{CACHE_SUFFIX}", LAYOUT, LABELS)
    cache.mark([1, 2, 5])
    cache.mark([6], Mark.EXCLUDED)
    cache.close()
    ((path, layout, valid),) = list_caches(tmp_path)
    assert layout == LAYOUT and valid == 3


def test_the_key_changes_with_a_touched_file_an_edited_stage_the_shape_or_dali(tmp_path):
    files = [tmp_path / "x.jpg", tmp_path / "y.jpg"]
    for f in files:
        f.write_bytes(b"jpeg")
    stage = tmp_path / "stage.py"
    stage.write_text("def stage(j, d): return j\n")

    def key(files=files, shape=(224, 224, 3), dali="2.4.0", decoder="cpu", root=tmp_path):
        return cache_key(listing_digest(root, files), stage, list(shape), "uint8", dali, decoder)

    base = key()
    assert key() == base
    assert key(dali="2.5.0") != base and key(shape=(112, 112, 3)) != base and key(files=files[:1]) != base
    assert key(decoder="gpu") != base  # the GPU decodes to other pixels
    os.chdir(tmp_path)  # however --data is spelled, the same files give the same key
    assert key(files=[f.relative_to(tmp_path) for f in files], root=".") == base
    os.utime(files[0], ns=(0, 12345))
    touched = key()
    assert touched != base
    stage.write_text("def stage(j, d): return j  # edited\n")
    assert key() != touched


def test_the_cli_lists_caches_and_removes_one_by_key_or_all(tmp_path, capsys):
    from dalishare.cli import main  # in this process: the command is plain Python (the e2e tests run the CLI itself)

    for key in ("aaa111", "bbb222"):
        SampleCache(tmp_path / f"{key}{CACHE_SUFFIX}", CacheLayout(key, 4, [2, 2, 3], "uint8"), np.zeros(4)).close()

    def cli(*args: str) -> str:
        assert main(["cache", *args]) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    assert "2 cache files" in cli("list", str(tmp_path)) and "0/4 samples of [2, 2, 3] uint8" in cli("list", str(tmp_path))
    assert "removed 1 cache files" in cli("remove", str(tmp_path), "--key", "bbb")
    assert [p.name for p in tmp_path.iterdir()] == [f"aaa111{CACHE_SUFFIX}"]
    assert "removed 1 cache files" in cli("remove", str(tmp_path), "--all")
    assert not list(tmp_path.iterdir())


def test_the_fill_follows_the_order_skips_what_is_done_and_sends_lost_rows_first():
    marks = np.zeros(8, dtype=np.uint8)
    marks[[2, 5]] = [Mark.VALID, Mark.EXCLUDED]  # resumed: decoded or excluded before
    order = np.array([5, 0, 2, 7, 1, 6, 3, 4])
    fill = CacheFill(marks, order)
    assert fill.pending() == 6
    first, careful = fill.next_rows(3)
    assert first == [0, 7, 1] and not careful
    assert fill.next_rows(3) == ([6, 3, 4], False) and not fill.pending()
    fill.requeue([7, 1], careful=True)  # lost without a culprit: one file per task, before the rest
    fill.requeue([0], careful=False)
    assert fill.careful() and fill.next_rows(3) == ([7], True) and fill.next_rows(3) == ([1], True)
    assert not fill.careful() and fill.next_rows(3) == ([0], False)


