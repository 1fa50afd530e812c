"""The GPU tests' own harness (job script, reference checksums) run on the CPU path, so it is known
to work before a GPU machine runs tests/gpu."""

from __future__ import annotations

import pytest

from helpers import GpuJob, Server, check_exactly_once_and_pixels, expected_checksums


def test_the_gpu_tests_harness_checks_pixels_and_exactly_once_on_the_cpu_too(dataset, tmp_path):
    """test_gpu.py's job script and reference checksums, run on the CPU path, so they are known to
    work before a GPU machine runs them."""

    expected = expected_checksums(dataset, "cpu", epochs=2)
    with Server(dataset, "--batch-size", "8", "--epochs", "2", "--min-consumers", "2") as server:
        jobs = [GpuJob(tmp_path / f"{bs}.json", batch_size=bs, passes=2) for bs in (4, 5)]
        records = [job.result() for job in jobs]
        assert server.wait() == 0, server.log()
    for record in records:
        assert record["device"] == record["ring_device"] == "cpu"
        check_exactly_once_and_pixels(record, expected)
    records[0]["checksums"][3] += 1  # and a wrong pixel would be caught
    with pytest.raises(AssertionError, match="differs"):
        check_exactly_once_and_pixels(records[0], expected)
