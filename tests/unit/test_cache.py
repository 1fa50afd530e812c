"""The decoded-sample cache's storage (shm/cache.py): rows, valid marks, resuming, keys. Plain files
in a temporary folder; no DALI, no producer."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from dalishare.errors import ConfigError
from dalishare.shm.cache import (CACHE_SUFFIX, CacheLayout, CacheView, CacheWriter, SampleCache, cache_key,
                                 list_caches, read_layout)

LAYOUT = CacheLayout(key="k1", samples=10, sample_shape=[4, 3, 3], dtype="uint8")


def _samples(indices) -> np.ndarray:
    return np.stack([np.full(LAYOUT.sample_shape, i + 1, dtype=np.uint8) for i in indices])


def test_rows_written_by_the_worker_are_served_only_once_marked_and_gathered_into_a_batch(tmp_path):
    path = tmp_path / f"a{CACHE_SUFFIX}"
    cache = SampleCache(path, LAYOUT)
    writer, view = CacheWriter(path, LAYOUT), CacheView(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        writer.write([3, 7], _samples([3, 7]))
        assert not view.ready([3])  # written, not marked: a killed producer leaves such rows invalid
        cache.mark([3, 7])
        assert view.ready([7, 3]) and not view.ready([3, 4])
        batch = view.gather([7, 3, 7])
        assert batch.shape == (3, 4, 3, 3) and batch.dtype == np.uint8
        assert batch[:, 0, 0, 0].tolist() == [8, 4, 8]
        batch[:] = 0  # the job owns its copy: the cache is untouched
        assert view.gather([3])[0, 0, 0, 0] == 4
        assert cache.valid_count() == 2 and cache.missing().tolist() == [0, 1, 2, 4, 5, 6, 8, 9]
    finally:
        view.close()
        writer.close()
        cache.close()


def test_a_cache_of_the_same_key_is_resumed_and_one_of_another_key_is_rebuilt(tmp_path):
    path = tmp_path / f"a{CACHE_SUFFIX}"
    cache = SampleCache(path, LAYOUT)
    writer = CacheWriter(path, LAYOUT)
    writer.write([0, 1], _samples([0, 1]))
    cache.mark([0])  # the producer was killed before marking row 1
    writer.close()
    cache.close()
    again = SampleCache(path, LAYOUT)
    assert again.resumed and again.missing().tolist() == list(range(1, 10))
    again.close()
    other = SampleCache(path, CacheLayout(key="k2", samples=10, sample_shape=[4, 3, 3], dtype="uint8"))
    assert not other.resumed and other.valid_count() == 0
    other.close(remove=True)
    assert not path.exists()


def test_a_truncated_or_foreign_file_is_not_a_cache(tmp_path):
    path = tmp_path / f"a{CACHE_SUFFIX}"
    SampleCache(path, LAYOUT).close()
    with open(path, "r+b") as f:
        f.truncate(LAYOUT.file_bytes - 1)
    assert read_layout(path) is None
    (tmp_path / f"b{CACHE_SUFFIX}").write_bytes(b"not a cache")
    with pytest.raises(ConfigError, match="not a complete dalishare cache"):
        CacheView(tmp_path / f"b{CACHE_SUFFIX}")
    assert [(p.name, layout) for p, layout, _ in list_caches(tmp_path)] == [(f"a{CACHE_SUFFIX}", None),
                                                                            (f"b{CACHE_SUFFIX}", None)]


def test_list_caches_reports_each_file_with_its_valid_rows(tmp_path):
    cache = SampleCache(tmp_path / f"a{CACHE_SUFFIX}", LAYOUT)
    cache.mark([1, 2, 5])
    cache.close()
    ((path, layout, valid),) = list_caches(tmp_path)
    assert layout == LAYOUT and valid == 3


def test_the_key_changes_with_a_touched_file_an_edited_stage_the_shape_or_dali(tmp_path):
    files = [tmp_path / "x.jpg", tmp_path / "y.jpg"]
    for f in files:
        f.write_bytes(b"jpeg")
    stage = tmp_path / "stage.py"
    stage.write_text("def stage(j, d): return j\n")
    base = cache_key(files, stage, [224, 224, 3], "uint8", "2.4.0")
    assert cache_key(files, stage, [224, 224, 3], "uint8", "2.4.0") == base
    assert cache_key(files, stage, [224, 224, 3], "uint8", "2.5.0") != base
    assert cache_key(files, stage, [112, 112, 3], "uint8", "2.4.0") != base
    assert cache_key(files[:1], stage, [224, 224, 3], "uint8", "2.4.0") != base
    os.utime(files[0], ns=(0, 12345))
    assert cache_key(files, stage, [224, 224, 3], "uint8", "2.4.0") != base
    touched = cache_key(files, stage, [224, 224, 3], "uint8", "2.4.0")
    stage.write_text("def stage(j, d): return j  # edited\n")
    assert cache_key(files, stage, [224, 224, 3], "uint8", "2.4.0") != touched


def test_the_cli_lists_caches_and_removes_one_by_key_or_all(tmp_path):
    import subprocess
    import sys

    for key in ("aaa111", "bbb222"):
        SampleCache(tmp_path / f"{key}{CACHE_SUFFIX}", CacheLayout(key, 4, [2, 2, 3], "uint8")).close()

    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "dalishare", "cache", *args], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "2 cache files" in cli("list", str(tmp_path)) and "0/4 samples of [2, 2, 3] uint8" in cli("list", str(tmp_path))
    assert "removed 1 cache files" in cli("remove", str(tmp_path), "--key", "bbb")
    assert [p.name for p in tmp_path.iterdir()] == [f"aaa111{CACHE_SUFFIX}"]
    assert "removed 1 cache files" in cli("remove", str(tmp_path), "--all")
    assert not list(tmp_path.iterdir())
