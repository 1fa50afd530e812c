"""The GPU tests' own harness (job script, reference checksums) run on the CPU path, so it is known
to work before a GPU machine runs tests/gpu."""

from __future__ import annotations

import pytest

from helpers import CUDA_DECODER_STAGE, GpuJob, Server, check_exactly_once_and_pixels, expected_checksums


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


def test_the_gpu_tests_stage_and_job_options_run_on_the_cpu_path(dataset, tmp_path):
    """Issue 20's GPU tests use helpers/cuda_decoder_stage.py and the job options zero, hold_s and
    close_first: each runs here first, on a host ring (copy=True: the held batch is the job's own)."""
    expected = expected_checksums(dataset, "cpu", epochs=1, pipeline=CUDA_DECODER_STAGE)
    with Server(dataset, "--batch-size", "8", "--epochs", "1", "--min-consumers", "2",
                pipeline=CUDA_DECODER_STAGE) as server:
        vandal = GpuJob(tmp_path / "vandal.json", batch_size=4, copy=True, zero=True, close_first=True)
        holder = GpuJob(tmp_path / "holder.json", batch_size=4, copy=True, hold_s=0.5)
        records = [vandal.result(), holder.result()]
        assert server.wait() == 0, server.log()
    for record in records:
        check_exactly_once_and_pixels(record, expected)
        assert not record["mapped_after_close"]
    assert records[1]["held_intact"] and (tmp_path / "holder.json.holding").exists()
