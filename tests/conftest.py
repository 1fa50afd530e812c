"""Shared fixtures: a generated JPEG dataset and a leak check on every test; the tiers' markers.
Helpers (processes, GPU detection) live in tests/helpers."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

from helpers import CLASS_SIZES, make_dataset


def pytest_addoption(parser) -> None:
    parser.addoption("--device", default="cpu", choices=("cpu", "gpu"),
                     help="where the stage worker tests (tests/e2e/test_worker.py) run the stage (default: cpu)")


@pytest.fixture
def stage_device(request) -> str:
    """The ``--device`` the worker tests serve with; ``gpu`` skips where there is none."""
    device = request.config.getoption("--device")
    if device == "gpu":
        from helpers import gpu_count

        if not gpu_count(torch_too=False):
            pytest.skip("--device gpu, and no CUDA GPU is visible here")
    return device


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), CLASS_SIZES)


def _children() -> list[str]:
    """This test process's descendants (a producer's stage worker and probes are grandchildren),
    and any orphaned stage process (one that outlived its producer)."""
    me, procs = os.getpid(), {}
    for name in os.listdir("/proc"):  # stat only: the command line is read for the few that matter
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            procs[int(name)] = (int(fields[1]), fields[0].decode())

    def descends(pid: int) -> bool:
        for _ in range(64):
            pid = procs.get(pid, (0,))[0]
            if pid == me:
                return True
            if pid <= 1:
                return False
        return False

    def cmdline(pid: int) -> str:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            return ""

    return [f"pid {pid} ({cmdline(pid)[:120]})" for pid, (ppid, state) in procs.items()
            if (descends(pid) and not (state == "Z" and ppid != me))  # a zombie of ours: a child not waited for
            or (ppid == 1 and "dalishare.producer.worker" in cmdline(pid))]


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
    while True:
        left = {"processes": _children(), "segments": sorted(_segments() - before), "runtime files": os.listdir(rundir)}
        if not any(left.values()) or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    os.rmdir(rundir) if not left["runtime files"] else None
    assert not any(left.values()), f"test left resources behind: {left}"


def pytest_collection_modifyitems(items) -> None:
    """Tiers by folder: tests/unit (fast, no DALI, no producer), tests/e2e (real processes, DALI,
    ZeroMQ, shared memory), tests/gpu (needs a CUDA GPU; skips without one)."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in ("e2e", "gpu"):
            item.add_marker(getattr(pytest.mark, tier))
