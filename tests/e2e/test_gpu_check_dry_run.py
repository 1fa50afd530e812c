"""bench/gpu_check.py --dry-run: the GPU check's orchestration and every one of its phases, run on
the CPU, so that a bug in the script shows here and not in a GPU machine's few minutes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import ROOT

CHECK = ROOT / "bench" / "gpu_check.py"
PHASES = ("versions", "gpu-tests", "ring", "copy", "cache", "augment", "threads")  # gpu_check.PHASES, in order
MARK = "DALISHARE_GPU_CHECK_TEST_MARK"


def survivors(mark: str, wait_s: float = 5.0) -> list[str]:
    """Live processes that carry ``mark`` in their environment: everything the check started, orphans
    included (the leak fixture walks this test's descendants, and an orphan is no longer one)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if f"{MARK}={mark}".encode() in environ:
                found.append(f"pid {entry}: {cmdline[:150]}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def run_check(tmp_path: Path, *options: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run the dry run (results in tmp_path/x.txt, x.jsonl); fail if any process it started survives it."""
    mark = uuid.uuid4().hex
    proc = subprocess.run([sys.executable, str(CHECK), "--dry-run", "--out", str(tmp_path / "x.txt"), *options],
                          cwd=ROOT, env={**os.environ, MARK: mark}, capture_output=True, text=True, timeout=timeout)
    left = survivors(mark)
    assert not left, f"processes of the check survived it: {left}"
    rows = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    return proc, rows


def phase_rows(rows: list[dict]) -> dict[str, dict]:
    return {row["phase"]: row for row in rows if row.get("kind") == "phase"}


@pytest.mark.timeout(300)
def test_the_dry_run_runs_every_phase_on_the_cpu_writes_its_results_and_leaves_nothing(tmp_path):
    proc, rows = run_check(tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    phases = phase_rows(rows)
    assert list(phases) == list(PHASES), output
    assert all(row["outcome"] == "passed" for row in phases.values()), phases
    tests = [row for row in rows if row["phase"] == "gpu-tests" and row["check"].startswith("test_")]
    assert tests and all(row["outcome"] in ("passed", "skipped") for row in tests), tests  # skipped without a GPU
    for name in PHASES:  # each phase wrote rows of its own, and the table has them
        assert any(row["phase"] == name and row.get("kind") != "phase" for row in rows), f"no rows from {name}"
    assert not [row for row in rows if row["outcome"] in ("failed", "error", "TIMEOUT", "NOT RUN")]
    table = (tmp_path / "x.txt").read_text()
    assert all(f"phase {name}:" in table for name in PHASES), table
    assert "no hand-offs recorded" not in table
    assert (tmp_path / "x-logs" / "ring.log").is_file()


def test_a_phase_past_its_timeout_is_killed_with_all_it_started_and_the_later_phases_still_run(tmp_path):
    proc, rows = run_check(tmp_path, "--phases", "ring,augment", "--phase-timeout", "ring=8", timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    phases = phase_rows(rows)
    assert list(phases) == ["ring", "augment"]
    assert phases["ring"]["outcome"] == "TIMEOUT", phases["ring"]
    killed = re.search(r"killed after 8 s with the (\d+) processes of its group", phases["ring"]["result"])
    assert killed and int(killed.group(1)) >= 2, phases["ring"]  # the phase and its producer, at least
    assert phases["augment"]["outcome"] == "passed", phases["augment"]
    assert "TIMEOUT" in (tmp_path / "x.txt").read_text()


def test_a_phase_left_no_budget_is_not_run_and_the_run_fails(tmp_path):
    proc, rows = run_check(tmp_path, "--phases", "versions,augment", "--budget-s", "3", timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert {name: row["outcome"] for name, row in phase_rows(rows).items()} == {"versions": "NOT RUN",
                                                                                 "augment": "NOT RUN"}
