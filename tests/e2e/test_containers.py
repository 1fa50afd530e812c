"""A job in a pid namespace of its own, as in `docker run` without --pid=host (the default): it
shares the runtime dir and /dev/shm with the producer, not its pids. Liveness goes by lifelines,
locks the kernel drops when a process dies (NOTE [ Lifelines ], shm/names.py). Real producer, real
jobs under `unshare --pid --fork --mount-proc` (root, as CI runs)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import pytest

from helpers import CLASS_SIZES, Job, Server

from dalishare.shm import names as runtime

N = sum(CLASS_SIZES.values())


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _can_unshare(), reason="needs `unshare --pid --mount-proc` (root)")


def indices(result: dict, pass_: int = 0) -> list[int]:
    return [i for b in result["passes"][pass_]["batches"] for i in b["indices"]]


def test_a_job_in_its_own_pid_namespace_reads_every_sample_exactly_once(dataset, tmp_path):
    with Server(dataset, "--batch-size", "8", "--epochs", "1", "--min-consumers", "2") as server:
        inside = Job(tmp_path / "inside.json", batch_size=5, own_pid_namespace=True)
        outside = Job(tmp_path / "outside.json", batch_size=5)
        results = [inside.result(), outside.result()]
        assert server.wait() == 0, server.log()
    for result in results:
        assert sorted(indices(result)) == list(range(N)), "not every sample once"
    assert indices(results[0]) == indices(results[1])


def test_a_namespaced_job_killed_while_holding_slots_is_reclaimed_and_the_others_go_on(dataset, tmp_path):
    # three slots: the dead job holds them all, so the other one can only go on once they are reclaimed
    with Server(dataset, "--batch-size", "8", "--slots", "3", "--epochs", "2", "--min-consumers", "2") as server:
        dying = Job(tmp_path / "dying.json", batch_size=8, own_pid_namespace=True, die={"how": "sigkill", "after": 1})
        other = Job(tmp_path / "other.json", batch_size=8, passes=2, sleep=0.05)
        assert dying.proc.wait(timeout=120) == 128 + signal.SIGKILL
        result = other.result()
        assert server.wait() == 0, server.log()
        log = server.log()
    assert all(sorted(indices(result, p)) == list(range(N)) for p in (0, 1))
    assert "died (its process is gone)" in log, log
    gaps = [b["at"] - a["at"] for p in result["passes"] for a, b in zip(p["batches"], p["batches"][1:])]
    # reclaimed at the next liveness pass (REAP_INTERVAL_S); a stall suspension would take 30 s
    assert max(gaps) < 5, f"the other job waited {max(gaps):.1f} s for the dead job's slots"


def test_a_killed_producer_is_lost_for_a_namespaced_job_within_3_s(dataset, tmp_path):
    with Server(dataset, "--batch-size", "4", "--slots", "2") as server:
        job = Job(tmp_path / "job.json", batch_size=4, passes=100, own_pid_namespace=True)
        job.wait_attached()
        time.sleep(0.5)  # it reads, then waits on the full ring
        server.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        output, _ = job.proc.communicate(timeout=60)
        took = time.monotonic() - killed
        assert server.wait(30) == -signal.SIGKILL
    assert job.proc.returncode != 0 and "ProducerLost" in output and "died" in output, output
    assert took < 3 + 1, f"the job took {took:.1f} s to see its producer gone (and exit)"
    removed = runtime.clean_stale()  # a killed producer cleans nothing: the next serve or `cleanup` does
    assert any(r.endswith("t.sock") for r in removed)
