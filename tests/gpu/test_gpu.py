"""The GPU path on a real GPU: device ring, CUDA IPC views, event-ordered releases, cross-device jobs.

Every test is marked ``gpu`` and skipped where no CUDA GPU (with CuPy) is visible. bench/gpu_check.py
runs this file on a GPU machine and times it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from helpers import N_SAMPLES, PRODUCER_BATCH, RESNET, GpuJob, Server, check_exactly_once_and_pixels, expected_checksums, gpu_count


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_count() == 0, reason="needs a CUDA GPU and CuPy")]

def test_gpu_jobs_get_zero_copy_views_equal_to_dali_exactly_once(dataset, tmp_path):
    expected = expected_checksums(dataset, "gpu", epochs=2)
    with Server(dataset, "--device", "gpu", "--batch-size", str(PRODUCER_BATCH), "--epochs", "2",
                "--min-consumers", "3") as server:
        jobs = [GpuJob(tmp_path / f"{bs}.json", batch_size=bs, passes=2) for bs in (4, 5, 11)]
        records = [job.result() for job in jobs]
        assert server.wait() == 0, server.log()
    for bs, record in zip((4, 5, 11), records):
        assert record["device"] == record["ring_device"] == "cuda:0"
        assert record["dtype"] == "torch.uint8" and record["shape"] == [224, 224, 3]
        check_exactly_once_and_pixels(record, expected)
        assert not record["mapped_after_close"], "close() left the IPC mapping open"
    # batches of 4 from producer batches of 8, 8, 8, 6: 2+2+2+2 per epoch, every one a view of the ring
    assert records[0]["copies"] == 0 and records[0]["in_ring"] == 2 * 8
    assert records[1]["in_ring"] > 0 and records[1]["copies"] > 0  # views inside, copies across batches


@pytest.mark.parametrize("batch_size", [4, 6], ids=["views", "spanning-copies"])
def test_a_slow_gpu_consumer_never_sees_a_torn_or_overwritten_batch(dataset, tmp_path, batch_size):
    expected = expected_checksums(dataset, "gpu", epochs=3, batch_size=4)
    with Server(dataset, "--device", "gpu", "--batch-size", "4", "--slots", "3", "--epochs", "3",
                "--min-consumers", "2") as server:
        slow = GpuJob(tmp_path / "slow.json", batch_size=batch_size, passes=3, slow_ms=40)
        fast = GpuJob(tmp_path / "fast.json", batch_size=4, passes=3)
        records = [slow.result(), fast.result()]
        assert server.wait() == 0, server.log()
    for record in records:
        check_exactly_once_and_pixels(record, expected)


@pytest.mark.parametrize("batch_size", [4, 6], ids=["views", "spanning-copies"])
def test_a_one_ahead_prefetcher_with_slow_kernels_never_sees_a_batch_change(dataset, tmp_path, batch_size):
    # issue 9: the job takes batch k+1 before it queues the (slow) kernels that read batch k, so
    # batch k's slot may be given back only once those kernels have finished
    expected = expected_checksums(dataset, "gpu", epochs=3, batch_size=4)
    with Server(dataset, "--device", "gpu", "--batch-size", "4", "--slots", "4", "--epochs", "3",
                "--min-consumers", "2") as server:
        slow = GpuJob(tmp_path / "slow.json", batch_size=batch_size, passes=3, slow_ms=40, prefetch=True)
        fast = GpuJob(tmp_path / "fast.json", batch_size=4, passes=3, prefetch=True)
        records = [slow.result(), fast.result()]
        assert server.wait() == 0, server.log()
    for record in records:
        check_exactly_once_and_pixels(record, expected)


def test_killed_gpu_job_is_reclaimed_and_a_killed_gpu_producer_is_producer_lost(dataset, tmp_path):
    with Server(dataset, "--device", "gpu", "--batch-size", "4", "--slots", "3", "--epochs", "2",
                "--min-consumers", "2") as server:
        doomed = GpuJob(tmp_path / "doomed.json", batch_size=4, passes=2, die=2)
        survivor = GpuJob(tmp_path / "survivor.json", batch_size=4, passes=2)
        record = survivor.result()
        doomed.proc.wait(timeout=60)
        assert doomed.proc.returncode == -signal.SIGKILL
        assert server.wait() == 0, server.log()
    assert all(sorted(p["indices"]) == list(range(N_SAMPLES)) for p in record["passes"])

    with Server(dataset, "--device", "gpu", "--batch-size", "4", "--slots", "3") as server:
        job = GpuJob(tmp_path / "lost.json", batch_size=4, passes=1000, expect_lost=True)
        job.wait_attached(timeout=120)
        time.sleep(2)  # consuming
        server.proc.send_signal(signal.SIGKILL)
        server.wait()
        record = job.result(timeout=60)
    assert "died" in record["lost"] and not record["mapped_after_close"]
    from dalishare.shm.names import clean_stale

    clean_stale("t")


@pytest.mark.parametrize("producer, job, ring", [
    ("gpu", "cpu", "cuda:0"),     # a CPU job of a GPU producer: one copy off the GPU
    ("cpu", "cuda:0", "cpu"),     # a GPU job of a CPU producer: one copy onto the GPU
    pytest.param("gpu:0", "cuda:1", "cuda:0", marks=pytest.mark.skipif(gpu_count() < 2, reason="needs two GPUs")),
], ids=["cpu-job-gpu-ring", "gpu-job-host-ring", "peer-gpu"])
def test_a_job_on_another_device_gets_one_copy_of_each_batch(dataset, tmp_path, producer, job, ring):
    expected = expected_checksums(dataset, "cpu" if producer == "cpu" else "gpu", epochs=1)
    with Server(dataset, "--device", producer, "--batch-size", str(PRODUCER_BATCH), "--epochs", "1") as server:
        record = GpuJob(tmp_path / "job.json", batch_size=5, device=job).result()  # 5: views and spanning copies
        assert server.wait() == 0, server.log()
    assert record["device"] == job and record["ring_device"] == ring and record["in_ring"] == 0
    check_exactly_once_and_pixels(record, expected)


def test_gpu_serving_of_an_absent_gpu_fails_in_one_line(dataset):
    proc = subprocess.run([sys.executable, "-m", "dalishare", "serve", str(RESNET), "--data", str(dataset),
                           "--device", f"gpu:{gpu_count()}", "--name", "t"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("dalishare: error:") == 1 and "does not exist" in proc.stderr


@pytest.mark.parametrize("cache, device", [("gpu", None), ("memory", "cuda:0")], ids=["gpu-cache", "memory-cache"])
def test_gpu_jobs_read_a_cache_at_their_own_pace_with_the_fill_s_pixels(dataset, tmp_path, cache, device):
    # issue 12: the cache holds epoch 0's batches as the producer cut them; every epoch reads those pixels
    expected = expected_checksums(dataset, "gpu", epochs=1)
    with Server(dataset, "--device", "gpu", "--batch-size", str(PRODUCER_BATCH), "--cache", cache, "--epochs", "2",
                "--min-consumers", "2") as server:
        slow = GpuJob(tmp_path / "slow.json", batch_size=5, passes=2, slow_ms=40, device=device)
        fast = GpuJob(tmp_path / "fast.json", batch_size=11, passes=2, device=device)
        records = [slow.result(), fast.result()]
        assert server.wait() == 0, server.log()
    assert "the cache is full" in server.log()
    for record in records:
        assert record["device"] == "cuda:0" and record["ring_device"] == ("cuda:0" if cache == "gpu" else "cpu")
        position = 0
        for p in record["passes"]:
            assert sorted(p["indices"]) == list(range(N_SAMPLES)), "not every sample exactly once"
            for index in p["indices"]:
                assert record["checksums"][position] == expected[(0, index)], f"sample {index} differs"
                position += 1
