"""Hyper-parameter sweeps on one shared producer: examples/sweep_optuna.py (trials in parallel worker
processes, one journal-file study) and examples/sweep_ray_tune.py (trials in Ray actor processes),
each run as a user runs it, against a live producer. Every trial must train with its own
hyper-parameters (its batch size included) and see each sample exactly once per epoch, and the
sweep must name a best trial."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import N_SAMPLES, ROOT, Server

EPOCHS = 2


def run_sweep(script: str, *args: str, timeout: float, env: dict | None = None) -> str:
    """The example in its own session, so that a hung sweep is killed with all its trial processes."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / script), "--name", "t", "--epochs", str(EPOCHS), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=10)
        pytest.fail(f"{script} did not finish within {timeout} s; output:\n{output}")
    assert proc.returncode == 0, f"{script} failed with exit code {proc.returncode}:\n{output}"
    return output


def check_trials(record: Path, trials: int, output: str) -> None:
    records = [json.loads(p.read_text()) for p in sorted(record.glob("trial*.json"))]
    assert len(records) == trials, output
    assert len({r["params"]["lr"] for r in records}) == trials, "trials share hyper-parameters"
    for r in records:
        assert len(r["epochs"]) == EPOCHS, r
        for epoch, seen in enumerate(r["epochs"]):
            assert sorted(seen) == list(range(N_SAMPLES)), f"trial {r['trial']} epoch {epoch}: not every sample once"
        assert r["steps"] == [math.ceil(N_SAMPLES / r["params"]["batch_size"])] * EPOCHS, r  # its own batch size
        assert math.isfinite(r["loss"]) and r["images_per_s"] > 0
    study = json.loads((record / "study.json").read_text())
    assert study["trials"] == trials
    assert study["best"]["params"] in [r["params"] for r in records]
    assert study["best"]["loss"] == pytest.approx(min(r["loss"] for r in records))
    assert "best trial" in output


@pytest.mark.parametrize("serving", ["cache", "ring"])
def test_an_optuna_sweep_of_parallel_trial_processes_shares_one_producer(dataset, tmp_path, serving):
    pytest.importorskip("optuna")
    if serving == "cache":  # more trials than at a time: later trials attach while others read
        options, trials, parallel = ("--cache", "memory"), 4, 2
    else:  # the ring: trials started together, the producer waiting for all of them
        options, trials, parallel = ("--min-consumers", "2"), 2, 2
    with Server(dataset, "--batch-size", "8", *options):
        output = run_sweep("sweep_optuna.py", "--trials", str(trials), "--parallel", str(parallel),
                           "--record", str(tmp_path), timeout=150)
    check_trials(tmp_path, trials, output)


def ray_processes(temp: str) -> list[str]:
    """Processes of the Ray instance whose temporary files are under ``temp`` (raylet, GCS, workers)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp in cmdline:
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def test_a_ray_tune_sweep_on_one_node_shares_one_producer(dataset, tmp_path):
    pytest.importorskip("ray.tune")
    # Ray's session files (and its sockets: short paths) in a folder of the test's own; the runtime
    # dir the leak fixture set reaches the trials through the example's runtime_env
    with tempfile.TemporaryDirectory(prefix="ray-") as temp:
        with Server(dataset, "--batch-size", "8", "--cache", "memory"):
            output = run_sweep("sweep_ray_tune.py", "--trials", "3", "--parallel", "2", "--record", str(tmp_path / "record"),
                               "--storage", str(tmp_path / "results"), timeout=240, env={"TMPDIR": temp, "RAY_TMPDIR": temp})
        check_trials(tmp_path / "record", 3, output)
        assert not ray_processes(temp), "Ray processes outlived the sweep"
