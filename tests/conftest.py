"""Shared fixtures: a generated JPEG dataset, producer and job processes, and a leak check on every test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dalishare.testing import ProducerProcess, make_image_folder as make_dataset

HERE = Path(__file__).parent
ROOT = HERE.parent
RESNET = ROOT / "pipelines" / "resnet.py"
CLASS_SIZES = {"ants": 10, "bees": 7, "wasps": 13}
N_SAMPLES = sum(CLASS_SIZES.values())


def expected_labels(root: Path) -> list[int]:
    """Label of each sample index, computed independently of dalishare.dataset."""
    labels = []
    for label, cls in enumerate(sorted(p.name for p in root.iterdir() if p.is_dir())):
        labels += [label] * len([p for p in (root / cls).iterdir() if p.suffix == ".jpg"])
    return labels


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), CLASS_SIZES)


def _children() -> list[str]:
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            found.append(f"pid {stat.parent.name} ({stat.read_text().split(')')[0].split('(')[1]})")
    return found


def _segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("dalishare.*")}


@pytest.fixture(autouse=True)
def no_leaks(monkeypatch):
    """Each test gets its own runtime dir; fail any test that leaves a process, socket or segment."""
    rundir = tempfile.mkdtemp(prefix="ds-")  # short: ipc:// paths are limited to ~107 characters
    monkeypatch.setenv("DALISHARE_RUNTIME_DIR", rundir)
    before = _segments()
    yield Path(rundir)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (_children() or _segments() - before or os.listdir(rundir)):
        time.sleep(0.1)
    left = {"processes": _children(), "segments": sorted(_segments() - before), "runtime files": os.listdir(rundir)}
    os.rmdir(rundir) if not left["runtime files"] else None
    assert not any(left.values()), f"test left resources behind: {left}"


class Server(ProducerProcess):
    """``dalishare serve`` in a child process (named ``t`` unless told); stopped with SIGTERM at exit,
    and a producer that does not exit in time fails the test with its log."""

    def __init__(self, data: Path, *args: str, name: str = "t", pipeline: Path = RESNET):
        super().__init__(data, *args, name=name, pipeline=pipeline)

    def wait(self, timeout: float = 60) -> int:
        code = super().wait(timeout)
        if code is None:
            pytest.fail(f"producer did not exit within {timeout} s; log:\n{self.log()}")
        return code

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.wait(30)


class Job:
    """tests/job_script.py (or another job ``script``) in a child process; its record is read back as JSON."""

    def __init__(self, out: Path, script: str = "job_script.py", **spec):
        self.out = out
        spec.setdefault("name", "t")
        self.proc = subprocess.Popen([sys.executable, str(HERE / script), json.dumps({**spec, "out": str(out)})],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_attached(self, timeout: float = 60) -> None:
        marker, deadline = Path(f"{self.out}.attached"), time.monotonic() + timeout
        while not marker.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"job did not attach within {timeout} s: {self.result()}")
            time.sleep(0.05)

    def result(self, timeout: float = 120) -> dict:
        try:
            output, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            output, _ = self.proc.communicate(timeout=10)
            pytest.fail(f"job did not finish within {timeout} s; output:\n{output}")
        assert self.proc.returncode == 0, f"job failed with exit code {self.proc.returncode}:\n{output}"
        return json.loads(self.out.read_text())
