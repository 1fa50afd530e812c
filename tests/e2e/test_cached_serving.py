"""The decoded-sample cache end to end (NOTE [ Cache protocol ] in producer/filling.py): real
producer and job processes, real DALI on the CPU, caches in /dev/shm and in folders."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import CLASS_SIZES, HERE, RESNET, Job, Server, expected_labels
from dalishare.shm.cache import CACHE_SUFFIX, list_caches
from dalishare.testing import corrupt_jpegs
from dalishare.wire.order import epoch_order

N = sum(CLASS_SIZES.values())  # 30 samples
HEAVY = HERE / "stages" / "heavy.py"  # deterministic and slow: a fill takes about a second
RANDOM = HERE / "stages" / "random_crop.py"
_reference: dict = {}


def indices(p: dict) -> list[int]:
    return [i for b in p["batches"] for i in b["indices"]]


def digests(res: dict) -> dict[int, str]:
    return {i: d for p in res["passes"] for b in p["batches"] for i, d in zip(b["indices"], b["digest"])}


def reference_digests(dataset: Path, tmp_path: Path) -> dict[int, str]:
    """Each sample's pixels as the ring (--cache off) serves them: the cache must serve the same."""
    if dataset not in _reference:
        with Server(dataset, "--batch-size", "8", "--epochs", "1", "--cache", "off") as server:
            res = Job(tmp_path / "reference.json", batch_size=8).result()
            assert server.wait() == 0
        _reference[dataset] = digests(res)
    return _reference[dataset]


def cached_samples(name: str = "t") -> int:
    """How many samples producer ``name``'s cache holds, as `dalishare status` reports it."""
    proc = subprocess.run([sys.executable, "-m", "dalishare", "status", name, "--json"], capture_output=True,
                          text=True, timeout=60, check=True)
    (entry,) = json.loads(proc.stdout)
    return max(entry["report"]["cached"], 0) if entry["report"] else 0


def check_epochs(res: dict, batch_size: int, n: int = N, excluded: frozenset = frozenset()) -> None:
    """Every pass is one whole epoch: each sample but the excluded exactly once, full batches but
    the last, labels right."""
    keep = n - len(excluded)
    for p in res["passes"]:
        got = indices(p)
        assert sorted(got) == sorted(set(range(n)) - excluded), f"epoch {p['epoch']}: not exactly once"
        assert [len(b["indices"]) for b in p["batches"]] == [batch_size] * (keep // batch_size) + (
            [keep % batch_size] if keep % batch_size else [])
    assert res["len"] == math.ceil(keep / batch_size)


def test_jobs_of_very_different_speeds_each_read_every_sample_once_at_their_own_pace(dataset, tmp_path):
    with Server(dataset, "--batch-size", "8", "--cache", "memory", "--epochs", "2",
                "--min-consumers", "2") as server:  # both attached before either reads: --epochs counts attached jobs
        slow = Job(tmp_path / "slow.json", batch_size=5, passes=3, sleep=0.25)
        fast = Job(tmp_path / "fast.json", batch_size=7, passes=3)
        fast_res, slow_res = fast.result(), slow.result()
        assert server.wait() == 0
        log = server.log()
    for res, size in ((fast_res, 7), (slow_res, 5)):
        assert [p["epoch"] for p in res["passes"]] == [0, 1, 1]
        assert res["passes"].pop()["batches"] == [] and "finished 2 epochs" in res["stop_reason"]
        check_epochs(res, size)
        labels = expected_labels(dataset)
        assert all(b["labels"] == [labels[i] for i in b["indices"]] for p in res["passes"] for b in p["batches"])
        assert all(b["shape"][1:] == [224, 224, 3] and b["dtype"] == "torch.uint8"
                   for p in res["passes"] for b in p["batches"])
    # both in the producer's order, which changes per epoch
    assert [indices(p) for p in fast_res["passes"]] == [indices(p) for p in slow_res["passes"]]
    assert indices(fast_res["passes"][0]) == epoch_order(N, 0, 0).tolist()
    # the fast job was not paced by the slow one (12 batches x 0.25 s): it finished its 2 epochs first
    slow_reading = slow_res["passes"][-1]["batches"][-1]["at"] - slow_res["passes"][0]["batches"][0]["at"]
    assert slow_reading > 2.5
    assert fast_res["passes"][-1]["batches"][-1]["at"] < slow_res["passes"][0]["batches"][-1]["at"]
    assert digests(fast_res) == digests(slow_res) == reference_digests(dataset, tmp_path)
    assert "the cache is full: 30 samples decoded" in log and "stage worker restarted" not in log
    assert len(re.findall(r"cache is full", log)) == 1


def test_a_job_with_its_own_seed_gets_its_own_order_a_new_one_each_epoch(dataset, tmp_path):
    with Server(dataset, "--batch-size", "8", "--cache", "memory", "--epochs", "2",
                "--min-consumers", "2") as server:
        mine = Job(tmp_path / "mine.json", batch_size=6, passes=2, seed=7)
        shared = Job(tmp_path / "shared.json", batch_size=6, passes=2)
        mine_res, shared_res = mine.result(), shared.result()
        assert server.wait() == 0
    check_epochs(mine_res, 6)
    assert [indices(p) for p in mine_res["passes"]] == [epoch_order(N, 7, e).tolist() for e in (0, 1)]
    assert [indices(p) for p in shared_res["passes"]] == [epoch_order(N, 0, e).tolist() for e in (0, 1)]
    assert digests(mine_res) == digests(shared_res)


def test_seed_needs_a_cache(dataset, tmp_path):
    with Server(dataset, "--batch-size", "8", "--cache", "off"):
        job = Job(tmp_path / "j.json", seed=3)
        output, _ = job.proc.communicate(timeout=60)
    assert job.proc.returncode != 0 and "a job's own order needs a producer with a cache" in output


def test_late_jobs_mid_fill_and_after_fill_start_a_whole_epoch_at_once(dataset, tmp_path):
    with Server(dataset, "--batch-size", "2", "--threads", "1", "--cache", "memory", pipeline=HEAVY) as server:
        go = tmp_path / "go"  # the late jobs start with the first, and attach once some samples are cached
        first = Job(tmp_path / "first.json", batch_size=4, passes=1)
        mid = Job(tmp_path / "mid.json", batch_size=3, passes=1, go=str(go))
        seeded = Job(tmp_path / "seeded.json", batch_size=4, passes=2, seed=5, go=str(go))  # waits for samples of its own order
        first.wait_attached()
        deadline = time.monotonic() + 60
        while not cached_samples():
            assert time.monotonic() < deadline, "the fill did not start"
            time.sleep(0.05)
        go.touch()
        first_res, mid_res, seeded_res = first.result(), mid.result(), seeded.result()
        late = Job(tmp_path / "late.json", batch_size=5, passes=2)
        late_res = late.result()
        log = server.log()
    assert 0 < mid_res["cached_at_attach"] < N, f"not mid-fill: {mid_res['cached_at_attach']} cached\n{log}"
    assert seeded_res["cached_at_attach"] < N
    check_epochs(seeded_res, 4)
    assert [indices(p) for p in seeded_res["passes"]] == [epoch_order(N, 5, e).tolist() for e in (0, 1)]
    assert late_res["cached_at_attach"] == N
    for res, size in ((first_res, 4), (mid_res, 3), (late_res, 5)):
        check_epochs(res, size)
        assert res["passes"][0]["epoch"] == 0  # a whole epoch from its start, whenever it attached
    assert digests(first_res) == digests(mid_res) == digests(late_res) == digests(seeded_res)


def test_auto_takes_memory_when_it_fits_and_off_with_the_reason_when_not(dataset, tmp_path):
    with Server(dataset, "--batch-size", "8", "--epochs", "1", "--cache", "auto") as server:
        res = Job(tmp_path / "a.json", batch_size=8).result()
        assert server.wait() == 0
    assert "fits the limit" in server.log() and "cache in memory" in server.log()
    check_epochs(res, 8)
    with Server(dataset, "--batch-size", "8", "--epochs", "1", "--cache", "auto", "--cache-limit", "1M") as server:
        res = Job(tmp_path / "b.json", batch_size=8).result()
        assert server.wait() == 0
    assert "no cache: the decoded dataset (4.3 MiB) exceeds the limit (1.0 MiB)" in server.log()
    assert "slots in cpu memory" in server.log()  # the ring
    check_epochs(res, 8)


def test_an_explicit_cache_that_cannot_fit_or_a_random_stage_exits_2_with_the_reason(dataset, tmp_path):
    with Server(dataset, "--cache", "memory", "--cache-limit", "1M") as server:
        assert server.wait() == 2
    assert re.search(r"--cache memory: the decoded dataset needs 4\.3 MiB, more than the limit of 1\.0 MiB",
                     server.log())
    with Server(dataset, "--cache", str(tmp_path), pipeline=RANDOM) as server:
        assert server.wait() == 2
    assert "the stage is not deterministic (fn.decoders.image_random_crop, fn.random.coin_flip)" in server.log()
    assert not list(tmp_path.glob(f"*{CACHE_SUFFIX}"))
    with Server(dataset, "--batch-size", "8", "--epochs", "1", "--cache", "auto", pipeline=RANDOM) as server:
        res = Job(tmp_path / "r.json", batch_size=8).result()
        assert server.wait() == 0
    assert "no cache: the stage is not deterministic" in server.log()
    check_epochs(res, 8)


def test_a_folder_cache_outlives_the_producer_and_a_restart_decodes_nothing(dataset, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    with Server(dataset, "--batch-size", "8", "--epochs", "1", "--cache", str(folder)) as server:
        first = Job(tmp_path / "first.json", batch_size=8).result()
        assert server.wait() == 0
    ((path, layout, valid),) = list_caches(folder)
    assert valid == N and layout.sample_shape == [224, 224, 3]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with Server(dataset, "--batch-size", "8", "--epochs", "1", "--cache", str(folder)) as server:
        again = Job(tmp_path / "again.json", batch_size=8).result()
        assert server.wait() == 0
    log = server.log()
    assert "reusing the cache" in log and f"{N} of {N} samples decoded (resumed)" in log
    assert "stage worker started" not in log and "nothing to decode" in log  # zero decoding
    assert digests(first) == digests(again) == reference_digests(dataset, tmp_path)
    out = subprocess.run([sys.executable, "-m", "dalishare", "cache", "list", str(folder)], capture_output=True, text=True, timeout=60)
    assert f"{N}/{N} samples of [224, 224, 3] uint8" in out.stdout


def test_a_changed_key_rebuilds_the_folder_cache(dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    stage = tmp_path / "stage.py"
    stage.write_text(RESNET.read_text())
    folder = tmp_path / "cache"
    folder.mkdir()

    def serve() -> str:
        with Server(data, "--batch-size", "8", "--epochs", "1", "--cache", str(folder), pipeline=stage) as server:
            check_epochs(Job(tmp_path / "j.json", batch_size=8).result(), 8)
            assert server.wait() == 0
        return server.log()

    assert f"0 of {N} samples decoded," in serve()
    assert "(resumed)" in serve()
    touched = next(data.glob("ants/*"))
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert f"0 of {N} samples decoded," in serve()  # a touched file: rebuilt
    stage.write_text(stage.read_text() + "\n# edited\n")
    assert f"0 of {N} samples decoded," in serve()  # an edited stage: rebuilt
    assert len(list(folder.iterdir())) == 1, "rebuilt in place, not piled up"


def test_a_cache_half_written_by_a_killed_producer_is_resumed_never_served_as_valid(dataset, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    with Server(dataset, "--batch-size", "2", "--threads", "1", "--cache", str(folder), pipeline=HEAVY) as server:
        job = Job(tmp_path / "starter.json", batch_size=4)  # starts the fill
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            caches = list_caches(folder)
            if caches and caches[0][2] >= 6:
                break
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGKILL)
        assert server.wait() == -signal.SIGKILL
        job.proc.communicate(timeout=60)  # it loses its producer
    ((path, layout, kept),) = list_caches(folder)
    assert 6 <= kept < N, f"killed after the fill: {kept}"
    with Server(dataset, "--batch-size", "2", "--threads", "1", "--cache", str(folder), "--epochs", "1",
                pipeline=HEAVY) as server:
        resumed = Job(tmp_path / "resumed.json", batch_size=4).result()
        assert server.wait() == 0
    assert f"{kept} of {N} samples decoded (resumed)" in server.log()
    assert f"{N - kept} to decode" in server.log()
    check_epochs(resumed, 4)
    with Server(dataset, "--batch-size", "2", "--threads", "1", "--cache", "memory", "--epochs", "1",
                pipeline=HEAVY) as server:
        fresh = Job(tmp_path / "fresh.json", batch_size=4).result()
        assert server.wait() == 0
    assert digests(resumed) == digests(fresh)


def test_undecodable_files_are_never_cached_and_stay_excluded_after_a_restart(dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    bad = corrupt_jpegs(sorted(dataset.glob("*/*.jpg")), data / "wasps", 6, seed=1)
    folder = tmp_path / "cache"
    folder.mkdir()
    total = N + len(bad)
    with Server(data, "--batch-size", "4", "--cache", str(folder), "--epochs", "1") as server:
        res = Job(tmp_path / "j.json", batch_size=5).result()
        assert server.wait() == 0
    log = server.log()
    excluded = frozenset(int(i) for i in re.findall(r"excluded .* \(sample (\d+)\)", log))
    assert excluded and res["excluded"] == len(excluded)
    check_epochs(res, 5, n=total, excluded=excluded)
    ((path, layout, valid),) = list_caches(folder)
    assert valid == total - len(excluded)
    with Server(data, "--batch-size", "4", "--cache", str(folder), "--epochs", "1") as server:
        again = Job(tmp_path / "again.json", batch_size=5).result()
        assert server.wait() == 0
    assert "stage worker started" not in server.log() and f"{len(excluded)} excluded" in server.log()
    check_epochs(again, 5, n=total, excluded=excluded)
    assert again["excluded"] == len(excluded) and digests(again) == digests(res)


def test_a_worker_killed_during_the_fill_loses_no_sample(dataset, tmp_path):
    with Server(dataset, "--batch-size", "2", "--threads", "1", "--cache", "memory", "--epochs", "1",
                pipeline=HEAVY) as server:
        job = Job(tmp_path / "j.json", batch_size=5)
        deadline = time.monotonic() + 60
        while "attached" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1)  # filling (about 5 s)
        worker = re.search(r"stage worker started \(pid (\d+)", server.log()).group(1)
        os.kill(int(worker), signal.SIGKILL)
        res = job.result()
        assert server.wait() == 0
    log = server.log()
    assert f"stage worker pid {worker} lost" in log and "killed by SIGKILL" in log, log
    assert "excluded" not in log.replace("0 excluded", "")
    check_epochs(res, 5)


def test_a_full_disk_turns_the_cache_off_and_serving_goes_on(dataset, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(small)],
                             capture_output=True, timeout=30).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        with Server(dataset, "--batch-size", "8", "--epochs", "1", "--cache", str(small)) as server:
            res = Job(tmp_path / "j.json", batch_size=8).result()
            assert server.wait() == 0
        assert "cannot create the cache" in server.log() and "No space left on device" in server.log()
        check_epochs(res, 8)
        assert not os.listdir(small)
    finally:
        subprocess.run(["umount", str(small)], timeout=30)


def test_the_service_ends_once_every_job_read_its_epochs(dataset, tmp_path):
    with Server(dataset, "--batch-size", "8", "--cache", "memory", "--epochs", "1",
                "--min-consumers", "2") as server:
        fast = Job(tmp_path / "fast.json", batch_size=8, passes=2)
        slow = Job(tmp_path / "slow.json", batch_size=8, passes=1, sleep=0.5)
        fast_res = fast.result()
        assert server.proc.poll() is None, "stopped before the slow job read its epoch"
        slow_res = slow.result()
        assert server.wait() == 0
    check_epochs(slow_res, 8)
    assert fast_res["passes"][1]["batches"] == [] and "finished 1 epochs" in fast_res["stop_reason"]
    assert not list(Path("/dev/shm").glob(f"dalishare.t.*{CACHE_SUFFIX}"))


def test_a_stopped_producer_ends_a_cache_job_s_pass_and_a_killed_one_is_producer_lost(dataset, tmp_path):
    with Server(dataset, "--batch-size", "8", "--cache", "memory") as server:
        job = Job(tmp_path / "j.json", batch_size=2, passes=1, sleep=0.3)
        job.wait_attached()
        time.sleep(1)
        server.proc.send_signal(signal.SIGTERM)
        res = job.result()
        assert server.wait() == 0
    got = indices(res["passes"][0])
    assert 0 < len(got) < N and len(set(got)) == len(got) and "SIGTERM" in res["stop_reason"]
    with Server(dataset, "--batch-size", "8", "--cache", "memory") as server:
        job = Job(tmp_path / "k.json", batch_size=2, passes=1, sleep=0.3)
        job.wait_attached()
        time.sleep(1)
        server.proc.send_signal(signal.SIGKILL)
        output, _ = job.proc.communicate(timeout=60)
        assert server.wait() == -signal.SIGKILL
    assert job.proc.returncode != 0 and "ProducerLost" in output and "died" in output
    assert list(Path("/dev/shm").glob(f"dalishare.t.{server.proc.pid}{CACHE_SUFFIX}"))  # the killed producer's
    subprocess.run([sys.executable, "-m", "dalishare", "cleanup"], timeout=60, check=True)
    assert not list(Path("/dev/shm").glob(f"dalishare.t.{server.proc.pid}*"))

