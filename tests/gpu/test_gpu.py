"""The GPU path on a real GPU: device ring, CUDA IPC views, event-ordered releases, cross-device jobs,
and issue 20's rules: one GPU per process, no device memory freed under a job, no job changing
another's batch, a GPU cache unmapped only after its reads, the container error.

Every test is marked ``gpu`` and skipped where no CUDA GPU (with CuPy) is visible. bench/gpu_check.py
runs this file on a GPU machine and times it. Producers serve helpers/cuda_decoder_stage.py, which
turns the hardware JPEG decoder off, so the reference checksums match bit for bit.
"""

from __future__ import annotations

import functools
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers
from helpers import (CUDA_DECODER_STAGE, N_SAMPLES, PRODUCER_BATCH, RESNET, GpuJob, check_exactly_once_and_pixels,
                     gpu_count)

Server = functools.partial(helpers.Server, pipeline=CUDA_DECODER_STAGE)
expected_checksums = functools.partial(helpers.expected_checksums, pipeline=CUDA_DECODER_STAGE)


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_count() == 0, reason="needs a CUDA GPU and CuPy")]

def test_gpu_jobs_that_opt_into_zero_copy_get_views_equal_to_dali_exactly_once(dataset, tmp_path):
    expected = expected_checksums(dataset, "gpu", epochs=2)
    with Server(dataset, "--device", "gpu", "--batch-size", str(PRODUCER_BATCH), "--epochs", "2",
                "--min-consumers", "3") as server:
        jobs = [GpuJob(tmp_path / f"{bs}.json", batch_size=bs, passes=2, copy=False) for bs in (4, 5, 11)]
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
        slow = GpuJob(tmp_path / "slow.json", batch_size=batch_size, passes=3, slow_ms=40, copy=False)
        fast = GpuJob(tmp_path / "fast.json", batch_size=4, passes=3, copy=False)
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
        slow = GpuJob(tmp_path / "slow.json", batch_size=batch_size, passes=3, slow_ms=40, prefetch=True, copy=False)
        fast = GpuJob(tmp_path / "fast.json", batch_size=4, passes=3, prefetch=True, copy=False)
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


# -- issue 20's rules ------------------------------------------------------------------------------

def test_by_default_a_gpu_job_reads_its_own_copy_so_writing_into_it_changes_no_other_job(dataset, tmp_path):
    expected = expected_checksums(dataset, "gpu", epochs=2)
    with Server(dataset, "--device", "gpu", "--batch-size", str(PRODUCER_BATCH), "--epochs", "2",
                "--min-consumers", "2") as server:
        vandal = GpuJob(tmp_path / "vandal.json", batch_size=4, passes=2, zero=True)  # images.zero_() on each
        victim = GpuJob(tmp_path / "victim.json", batch_size=4, passes=2, slow_ms=20)  # reads each slot later
        records = [vandal.result(), victim.result()]
        assert server.wait() == 0, server.log()
    for record in records:
        assert record["in_ring"] == 0 and record["copies"] > 0  # copies the job owns, not views of the ring
        check_exactly_once_and_pixels(record, expected)


def test_a_stopping_producer_frees_its_gpu_ring_only_once_the_job_that_maps_it_has_left(dataset, tmp_path):
    with Server(dataset, "--device", "gpu", "--batch-size", "4", "--epochs", "1000") as server:
        job = GpuJob(tmp_path / "holder.json", batch_size=4, passes=1, copy=False, hold_s=4)  # keeps a view
        holding = Path(f"{tmp_path / 'holder.json'}.holding")
        deadline = time.monotonic() + 120
        while not holding.exists():
            assert time.monotonic() < deadline and job.proc.poll() is None, "the job never held a batch"
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(2)
        assert server.proc.poll() is None, "the producer stopped while a job still mapped its ring"
        record = job.result()
        assert server.wait() == 0, server.log()
    assert record["held_intact"], "the view the job held changed while the producer stopped"
    assert "still map" not in server.log()


def test_a_gpu_cache_is_unmapped_only_after_the_job_s_queued_reads_of_it(dataset, tmp_path):
    expected = expected_checksums(dataset, "gpu", epochs=1)
    with Server(dataset, "--device", "gpu", "--batch-size", str(PRODUCER_BATCH), "--cache", "gpu", "--epochs", "1") as server:
        record = GpuJob(tmp_path / "job.json", batch_size=5, slow_ms=40, close_first=True).result()
        assert server.wait() == 0, server.log()
    assert record["ring_device"] == "cuda:0" and not record["mapped_after_close"]
    position = 0
    for index in record["passes"][0]["indices"]:
        assert record["checksums"][position] == expected[(0, index)], f"sample {index} differs"
        position += 1


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) and root")
@pytest.mark.parametrize("cache", ["off", "gpu"], ids=["device-ring", "gpu-cache"])
def test_a_gpu_job_in_another_pid_namespace_is_told_how_to_share_one(dataset, tmp_path, cache):
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a pid namespace here: {probe.stderr.decode().strip()}")
    with Server(dataset, "--device", "gpu", "--batch-size", "4", "--cache", cache):
        record = GpuJob(tmp_path / "job.json", own_pid_namespace=True, expect_error=True).result()
    assert record["error"].startswith("ConfigError") and "--pid=host" in record["error"]
    assert "shareProcessNamespace" in record["error"]


@pytest.mark.skipif(gpu_count() < 2, reason="needs two GPUs")
def test_a_producer_and_a_job_on_gpu_1_hold_no_context_on_gpu_0(dataset, tmp_path):
    with Server(dataset, "--device", "gpu:1", "--batch-size", "4", "--epochs", "1000") as server:
        job = GpuJob(tmp_path / "job.json", batch_size=4, passes=1, hold_s=3)
        holding = Path(f"{tmp_path / 'job.json'}.holding")
        deadline = time.monotonic() + 120
        while not holding.exists():
            assert time.monotonic() < deadline and job.proc.poll() is None, "the job never read a batch"
            time.sleep(0.05)
        ours = {server.proc.pid, job.proc.pid} | set(_children(server.proc.pid))
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_bus_id", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout
        on_gpu = [(int(pid), bus.strip()) for pid, bus in (line.split(",") for line in apps.splitlines() if line.strip())]
        job.result()
    mine = [(pid, bus) for pid, bus in on_gpu if pid in ours]
    if not mine:
        pytest.skip("nvidia-smi lists no process of ours (another pid namespace): cannot tell contexts apart")
    gpu_1 = subprocess.run(["nvidia-smi", "-i", "1", "--query-gpu=pci.bus_id", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30).stdout.strip()
    assert all(bus == gpu_1 for _, bus in mine), f"contexts on another GPU than 1 ({gpu_1}): {mine}"


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (the stage worker and its probe)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            kids = [int(p) for p in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        except OSError:
            kids = []
        found += kids
        queue += kids
    return found
