"""The stage runs in a supervised worker process (NOTE [ Stage worker protocol ]): a decoder that
crashes, hangs or is killed costs the jobs a pause, never an error or a sample; a stage that cannot
work ends the producer after bounded restarts, with the reason.

On a GPU machine: ``python -m pytest tests/e2e/test_worker.py --device gpu`` serves the same tests
from the GPU (DALI's mixed decoder, a device ring written by the worker through CUDA IPC)."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import pytest

from helpers import ROOT, Server, make_dataset
from dalishare import DaliShareIterator
from dalishare.errors import ProducerLost
from dalishare.wire.order import epoch_order

FAULTY = ROOT / "tests" / "helpers" / "stages" / "faulty.py"
MARK = b"DALISHARE-TEST-FAULT"


def _mark(data: Path, names: list[str]) -> None:
    """Append the fault marker to these files (decoders ignore bytes after the image's end)."""
    for path in sorted(data.rglob("*.jpg")):
        if path.name in names:
            path.write_bytes(path.read_bytes() + MARK)


def _files(data: Path) -> list[str]:
    return [p.name for p in sorted(data.rglob("*.jpg"))]  # index order: class, then name


def _read_epochs(loader, epochs: int) -> list[list[int]]:
    return [[i for batch in loader for i in batch["indices"].tolist()] for _ in range(epochs)]


def _worker_pid(server: Server, after: int = 0) -> int:
    """The pid of the producer's current stage worker (from its log), once it is not ``after``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = re.findall(r"stage worker (?:started|restarted) \(pid (\d+)", server.log())
        if pids and int(pids[-1]) != after:
            return int(pids[-1])
        time.sleep(0.05)
    pytest.fail(f"no new stage worker in the producer's log:\n{server.log()}")


def test_a_decoder_that_crashes_natively_costs_only_its_files(tmp_path, monkeypatch, stage_device):
    monkeypatch.setenv("DALISHARE_TEST_FAULT", "crash-marked")
    data = make_dataset(tmp_path / "data", {"a": 12, "b": 12})
    names = _files(data)
    first = int(epoch_order(len(names), seed=0, epoch=0)[0])  # in the first batch: a crash during start-up
    culprits = {names[i] for i in {first, 1, 6, 13, 20}}
    _mark(data, list(culprits))
    with Server(data, "--device", stage_device, "--batch-size", "4", "--epochs", "2", pipeline=FAULTY) as server:
        with DaliShareIterator("t", batch_size=3, attach_timeout=60) as loader:
            epochs = _read_epochs(loader, 2)
        assert server.wait(60) == 0, server.log()
    log = server.log()
    expected = sorted(i for i, n in enumerate(names) if n not in culprits)
    for seen in epochs:
        assert sorted(seen) == expected  # every other sample, exactly once, in each epoch
    for name in culprits:  # each culprit is reported once, as a crash
        assert len(re.findall(rf"excluded \S*{name} \(sample \d+\): crashed the decoder: SIGSEGV", log)) == 1, log
    assert "stage worker restarted" in log and "Traceback" not in log
    assert log.index("lost with") < log.index("serving 't'")  # the first crash came while starting


def test_a_worker_killed_from_outside_mid_batch_costs_the_jobs_nothing(tmp_path, monkeypatch, stage_device):
    monkeypatch.setenv("DALISHARE_TEST_FAULT", "slow")  # 10 ms per sample: a kill lands mid-batch
    data = make_dataset(tmp_path / "data", {"a": 20, "b": 20})
    rng = random.Random(0)
    with Server(data, "--device", stage_device, "--batch-size", "8", "--slots", "4", "--epochs", "3",
                pipeline=FAULTY) as server:
        with DaliShareIterator("t", batch_size=5, attach_timeout=60) as loader:
            epochs, pid = [], 0
            for _ in range(3):
                seen = []
                for batch in loader:
                    seen += batch["indices"].tolist()
                    if len(seen) in (10, 25):  # twice per epoch, at a random moment of the next batch
                        pid = _worker_pid(server, after=pid)
                        time.sleep(rng.uniform(0, 0.08))
                        os.kill(pid, signal.SIGKILL)
                epochs.append(seen)
        assert server.wait(60) == 0, server.log()
    for seen in epochs:
        assert sorted(seen) == list(range(40))
    log = server.log()
    assert log.count("stage worker restarted") == 6, log
    assert "excluded" not in log  # a kill is nobody's file's fault


def _stage_children(producer_pid: int, but: int) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if ppid == producer_pid and b"dalishare.producer.worker" in cmdline and int(proc.name) != but:
            found.append(int(proc.name))
    return found


def test_a_probe_killed_from_outside_blames_nothing_and_a_kill_at_the_end_loses_nothing(tmp_path, monkeypatch,
                                                                                         stage_device):
    monkeypatch.setenv("DALISHARE_TEST_FAULT", "slow")
    data = make_dataset(tmp_path / "data", {"a": 12, "b": 12})
    with Server(data, "--device", stage_device, "--batch-size", "8", "--slots", "4", "--epochs", "2",
                pipeline=FAULTY) as server:
        with DaliShareIterator("t", batch_size=8, attach_timeout=60) as loader:
            epochs, killed_probe = [], False
            for epoch in range(2):
                seen = []
                for batch in loader:
                    seen += batch["indices"].tolist()
                    if epoch == 0 and len(seen) == 8:  # the worker, then the probe that looks for a culprit
                        worker = _worker_pid(server)
                        os.kill(worker, signal.SIGKILL)
                        deadline = time.monotonic() + 10
                        while not killed_probe and time.monotonic() < deadline:
                            for probe in _stage_children(server.proc.pid, but=worker):
                                os.kill(probe, signal.SIGKILL)
                                killed_probe = True
                            time.sleep(0.005)
                    if epoch == 1 and len(seen) == 16:  # around the last batch of the last epoch
                        os.kill(_worker_pid(server), signal.SIGKILL)
                epochs.append(seen)
        assert server.wait(60) == 0, server.log()
    assert killed_probe
    for seen in epochs:
        assert sorted(seen) == list(range(24))
    assert "excluded" not in server.log()


def test_a_worker_that_hangs_past_the_stage_timeout_is_replaced_and_its_file_excluded(tmp_path, monkeypatch,
                                                                                       stage_device):
    monkeypatch.setenv("DALISHARE_TEST_FAULT", "hang-marked")
    data = make_dataset(tmp_path / "data", {"a": 8, "b": 8})
    names = _files(data)
    _mark(data, [names[5]])
    start = time.monotonic()
    with Server(data, "--device", stage_device, "--batch-size", "4", "--epochs", "1", "--stage-timeout", "2",
                pipeline=FAULTY) as server:
        with DaliShareIterator("t", batch_size=4, attach_timeout=60) as loader:
            (seen,) = _read_epochs(loader, 1)
        assert server.wait(60) == 0, server.log()
    assert sorted(seen) == [i for i in range(16) if i != 5]
    log = server.log()
    assert re.search(rf"excluded \S*{names[5]} \(sample 5\): hung the decoder for more than 2 s", log), log
    assert "sent nothing for 2 s (hung" in log
    assert time.monotonic() - start < 40


def test_files_that_crash_only_together_are_made_again_one_by_one_and_all_served(tmp_path, monkeypatch,
                                                                                  stage_device):
    monkeypatch.setenv("DALISHARE_TEST_FAULT", "crash-pairs")
    data = make_dataset(tmp_path / "data", {"a": 10, "b": 10})
    names = _files(data)
    order = epoch_order(len(names), seed=0, epoch=0)
    _mark(data, [names[int(i)] for i in order[4:6]])  # together in the second batch; each fine alone
    with Server(data, "--device", stage_device, "--batch-size", "4", "--epochs", "2", pipeline=FAULTY) as server:
        with DaliShareIterator("t", batch_size=4, attach_timeout=60) as loader:
            epochs = _read_epochs(loader, 2)
        assert server.wait(60) == 0, server.log()
    for seen in epochs:
        assert sorted(seen) == list(range(20))  # nothing excluded, nothing lost
    log = server.log()
    assert "excluded" not in log and "one file at a time" in log


def test_a_first_batch_of_bad_files_is_blamed_on_the_files_not_the_stage(tmp_path, stage_device):
    data = make_dataset(tmp_path / "data", {"a": 10, "b": 10})
    names = _files(data)
    order = epoch_order(len(names), seed=0, epoch=0)
    paths = sorted(data.rglob("*.jpg"))
    for i in order[:2]:  # the whole first batch, which sizes the ring: no batch decoded yet to compare
        paths[int(i)].write_bytes(paths[int(i)].read_bytes()[:200])
    with Server(data, "--device", stage_device, "--batch-size", "2", "--epochs", "1") as server:
        with DaliShareIterator("t", batch_size=2, attach_timeout=60) as loader:
            (seen,) = _read_epochs(loader, 1)
        assert server.wait(60) == 0, server.log()
    assert sorted(seen) == sorted(set(range(20)) - {int(i) for i in order[:2]})


def test_a_worker_idle_past_the_stage_timeout_is_not_taken_for_hung(tmp_path, stage_device):
    data = make_dataset(tmp_path / "data", {"a": 6, "b": 6})
    with Server(data, "--device", stage_device, "--batch-size", "4", "--epochs", "1", "--stage-timeout", "1.5",
                "--min-consumers", "1") as server:
        time.sleep(4)  # the worker measured the first batch and waits, with no job to produce for
        with DaliShareIterator("t", batch_size=4, attach_timeout=60) as loader:
            (seen,) = _read_epochs(loader, 1)
        assert server.wait(60) == 0, server.log()
    assert sorted(seen) == list(range(12))
    assert "lost" not in server.log() and "restarted" not in server.log()


def test_a_stage_that_crashes_on_every_batch_ends_the_producer_after_bounded_restarts(tmp_path, monkeypatch,
                                                                                      stage_device):
    monkeypatch.setenv("DALISHARE_TEST_FAULT", "crash-always")
    data = make_dataset(tmp_path / "data", {"a": 6, "b": 6})
    start = time.monotonic()
    with Server(data, "--device", stage_device, "--batch-size", "4", pipeline=FAULTY) as server:
        with pytest.raises(ProducerLost, match=r"stopped before it served a batch: StageFailed: the stage worker "
                                               r"failed 4 times in a row and no file explains it"):
            DaliShareIterator("t", batch_size=4, attach_timeout=60)
        assert server.wait(60) == 2, server.log()
    log = server.log()
    assert log.count("stage worker restarted") == 3, log
    assert "excluded" not in log  # a stage that fails on everything blames no file
    assert time.monotonic() - start < 60


def test_a_job_that_attaches_during_a_slow_start_waits_and_is_told_why(tmp_path, monkeypatch, caplog, stage_device):
    monkeypatch.setenv("DALISHARE_TEST_FAULT", "slow-start")  # the stage takes 4 s to import
    data = make_dataset(tmp_path / "data", {"a": 5, "b": 5})
    with Server(data, "--device", stage_device, "--batch-size", "4", "--epochs", "1", pipeline=FAULTY) as server:
        with caplog.at_level("INFO", logger="dalishare"):
            with DaliShareIterator("t", batch_size=4, attach_timeout=1) as loader:  # shorter than the start
                (seen,) = _read_epochs(loader, 1)
        assert server.wait(60) == 0, server.log()
    assert sorted(seen) == list(range(10))
    assert re.search(r"is starting \((scanning|decoding the first batch)", caplog.text), caplog.text
    assert "waits for the start" in server.log()


def test_a_stage_that_does_not_import_fails_the_producer_at_once_with_its_error(tmp_path):
    data = make_dataset(tmp_path / "data", {"a": 3})
    broken = tmp_path / "broken.py"
    broken.write_text("import nvidia.dali.fn as fn\nraise RuntimeError('no such model')\n")
    with Server(data, pipeline=broken) as server:
        assert server.wait(60) == 2
    log = server.log()
    assert "broken.py failed to import: RuntimeError: no such model" in log
    assert "restarted" not in log


def test_a_corpus_of_broken_jpegs_is_served_ten_times_in_a_row_without_a_producer_death(tmp_path, stage_device):
    from dalishare.testing import corrupt_jpegs

    data = make_dataset(tmp_path / "data", {"good": 40})
    broken = corrupt_jpegs(sorted((data / "good").iterdir()), data / "odd", 110)
    names = _files(data)
    intact = {i for i, n in enumerate(names) if n.startswith("good_")}
    assert len(broken) >= 100
    served_sets = []
    for run in range(10):
        with Server(data, "--device", stage_device, "--batch-size", "16", "--epochs", "1") as server:
            with DaliShareIterator("t", batch_size=16, attach_timeout=60) as loader:
                (seen,) = _read_epochs(loader, 1)
            code = server.wait(120)
        assert code == 0, f"run {run}: the producer exited with {code}:\n{server.log()}"
        assert len(seen) == len(set(seen)), f"run {run}: a sample came twice"
        assert intact <= set(seen), f"run {run}: intact files missing: {sorted(intact - set(seen))}"
        served_sets.append(frozenset(seen))
    assert len(set(served_sets)) == 1  # the decodable set is a property of the files, not of a run
