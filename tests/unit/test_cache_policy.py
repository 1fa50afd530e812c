"""Which cache a producer uses (producer/cache_policy.py): plain decisions, no producer."""

from __future__ import annotations

import pytest

from dalishare.errors import ConfigError
from dalishare.producer.cache_policy import CacheMode, choose, default_limit, parse_cache, parse_size

SAMPLE = 224 * 224 * 3


def test_cache_modes_and_folders_parse_and_a_missing_folder_is_refused(tmp_path):
    assert parse_cache("auto") == (CacheMode.AUTO, None)
    assert parse_cache("off") == (CacheMode.OFF, None)
    assert parse_cache(str(tmp_path)) == (CacheMode.DISK, tmp_path)
    with pytest.raises(ConfigError, match="not a folder"):
        parse_cache(str(tmp_path / "nowhere"))


def test_sizes_take_binary_suffixes():
    assert parse_size("500M") == 500 << 20 and parse_size("64G") == 64 << 30 and parse_size("1.5GiB") == 3 << 29
    assert parse_size("4096") == 4096
    with pytest.raises(ConfigError, match="such as 500M"):
        parse_size("lots")


def test_auto_keeps_what_fits_in_memory_and_says_why_it_does_not_otherwise():
    fits = choose(CacheMode.AUTO, None, samples=1000, sample_bytes=SAMPLE, limit=1 << 30, stateful_ops=[])
    assert fits.mode is CacheMode.MEMORY and "143.6 MiB" in fits.reason and "1.0 GiB" in fits.reason
    big = choose(CacheMode.AUTO, None, samples=100_000, sample_bytes=SAMPLE, limit=1 << 30, stateful_ops=[])
    assert big.mode is CacheMode.OFF and "exceeds the limit" in big.reason


def test_an_explicit_memory_or_gpu_cache_that_cannot_fit_names_both_sizes():
    for mode in (CacheMode.MEMORY, CacheMode.GPU):
        with pytest.raises(ConfigError, match=r"needs 14\.0 GiB, more than the limit of 1\.0 GiB"):
            choose(mode, None, samples=100_000, sample_bytes=SAMPLE, limit=1 << 30, stateful_ops=[])


def test_a_random_stage_is_never_cached_auto_falls_back_and_an_explicit_cache_is_refused(tmp_path):
    random_ops = ["fn.random.coin_flip", "fn.random_resized_crop"]
    auto = choose(CacheMode.AUTO, None, samples=10, sample_bytes=SAMPLE, limit=1 << 30, stateful_ops=random_ops)
    assert auto.mode is CacheMode.OFF and "fn.random.coin_flip" in auto.reason
    for mode, folder in ((CacheMode.MEMORY, None), (CacheMode.DISK, tmp_path)):
        with pytest.raises(ConfigError, match="not deterministic.*--cache off"):
            choose(mode, folder, samples=10, sample_bytes=SAMPLE, limit=1 << 30, stateful_ops=random_ops)


def test_a_disk_cache_ignores_the_memory_limit_and_off_is_off(tmp_path):
    disk = choose(CacheMode.DISK, tmp_path, samples=100_000, sample_bytes=SAMPLE, limit=1, stateful_ops=[])
    assert disk.mode is CacheMode.DISK and disk.folder == tmp_path
    assert choose(CacheMode.OFF, None, samples=1, sample_bytes=1, limit=1, stateful_ops=["x"]).mode is CacheMode.OFF


def test_the_default_limit_is_a_share_of_available_memory(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable:    2097152 kB\n")
    assert 0 < default_limit(meminfo=meminfo) <= (2 << 30) // 2
