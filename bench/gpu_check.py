"""GPU check: one command that checks and times the GPU path on a GPU machine, and cannot waste it.

    python bench/gpu_check.py [--dry-run] [--data DIR] [--out FILE] [--budget-s 420] [--phases a,b,...]

The checks are the phases of PHASES below, in order of value: the GPU tests first, the figures
after. Each phase runs as a child (``gpu_check.py --phase NAME``) in a process group of its own,
with a timeout of its own; when it ends, or at its timeout, the whole group is SIGKILLed (producers,
stage workers and jobs it started included) and ``dalishare cleanup`` removes what they left. A
phase that fails or times out does not stop the later ones; the whole run stays within
``--budget-s`` (a phase gets at most what is left of it). bench/gpu_run.sh runs this on the GPU
machine, the install of the carried wheels included, within 8 minutes on one H100/H200.

Results, written as each phase ends (so a timeout still leaves the earlier ones):
  FILE           the table (rich), rewritten after every phase
  FILE.jsonl     one JSON row per check or figure, and one per phase (``"kind": "phase"``)
  FILE-logs/     each phase's output (PHASE.log) and the rows it wrote (PHASE.jsonl)

``--dry-run`` runs the same orchestration and every phase on the CPU (device "cpu", a tiny
generated data set, few batches; the GPU tests skip): tests/e2e/test_gpu_check_dry_run.py runs it,
so a bug in this script shows there, not on the GPU.

Exit code: 0 every check passed (or skipped), 1 a check failed, timed out or was not run,
2 no CUDA GPU (without --dry-run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table
from rich.text import Text

import gpu_phases  # bench/gpu_phases.py (this script's folder is on sys.path)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera" / "train"
FAILING = ("failed", "error", "TIMEOUT", "NOT RUN")  # outcomes that make the exit code 1
MIN_PHASE_S = 5  # a phase that would get less of the budget is not started


@dataclass(frozen=True)
class Phase:
    name: str
    run: Callable[[gpu_phases.Context], None]  # in the child process
    gpu_s: int  # timeout on one H100/H200 (they sum to 400 s: the budget's 420 less the data and cleanups)
    dry_s: int  # timeout of --dry-run on a 2-core CPU machine (generous: ~90 s in all)
    what: str


PHASES = (
    Phase("versions", gpu_phases.versions, 15, 30, "the machine and the versions (no GPU: exit 2)"),
    Phase("gpu-tests", gpu_phases.gpu_tests, 190, 90, "pytest tests/gpu and the CUDA augment test, -x, 90 s a test"),
    Phase("ring", gpu_phases.ring, 65, 90, "device ring (--cache off): hand-off; 3 jobs sharing vs own pipelines"),
    Phase("copy", gpu_phases.copy_cost, 25, 60, "a job's own copy of each batch vs views: img/s, next()"),
    Phase("cache", gpu_phases.cache, 45, 60, "--cache gpu vs --cache memory for 2 GPU jobs, from a filled cache"),
    Phase("augment", gpu_phases.augment, 20, 30, "bench/augment.py on CUDA"),
    Phase("threads", gpu_phases.threads, 40, 60, "producer img/s: serve's DALI thread cap vs all cores vs 4"),
)
BY_NAME = {phase.name: phase for phase in PHASES}


# -- the parent: runs each phase in its own process group, writes the results -------------------------

def orchestrate(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.budget_s
    report = Report(Path(args.out), args.dry_run)
    with data_folder(args.data, args.dry_run) as data:
        for phase in args.phases:
            rows = run_phase(phase, args, data, deadline, report.logs)
            report.add(rows)
            print(f"[{report.elapsed():5.0f} s] {phase.name}: {rows[0]['outcome']} in {rows[0]['seconds']:.1f} s"
                  f"  {rows[0]['result']}", flush=True)
            if phase.name == "versions" and not args.dry_run and not any(r.get("gpus") for r in rows):
                report.add([{"phase": phase.name, "check": "a CUDA GPU", "outcome": "failed", "seconds": None,
                             "result": "none visible here: the check ends (exit 2)"}])
                print("gpu_check: no CUDA GPU here; run it on a GPU machine (or use --dry-run)", file=sys.stderr)
                return 2
    Console(width=180).print(report.table())
    print(f"written to {report.out} and {report.jsonl}; phase logs in {report.logs}")
    return 1 if report.failing() else 0


def run_phase(phase: Phase, args: argparse.Namespace, data: str, deadline: float, logs: Path) -> list[dict]:
    """Run ``phase`` in a child in its own process group; its rows, after a row for the phase itself."""
    timeout = min(args.timeouts.get(phase.name, phase.dry_s if args.dry_run else phase.gpu_s),
                  deadline - time.monotonic())
    if timeout < MIN_PHASE_S:
        return [phase_row(phase, "NOT RUN", 0.0, "the run's budget is spent")]
    rows_file, log = logs / f"{phase.name}.jsonl", logs / f"{phase.name}.log"
    command = [sys.executable, __file__, "--phase", phase.name, "--data", data, "--rows", str(rows_file),
               *(["--dry-run"] if args.dry_run else [])]
    started = time.monotonic()
    code, killed = run_in_group(command, log, timeout)
    seconds = time.monotonic() - started
    if code is None:
        outcome, notes = "TIMEOUT", [f"killed after {timeout:.0f} s with the {killed} processes of its group"]
    else:
        outcome, notes = ("passed", ["exit 0"]) if code == 0 else ("failed", [f"exit {code}: {last_line(log)}"])
        notes += [f"{killed} processes outlived it (killed)"] if killed else []
    notes += [cleanup()]
    return [phase_row(phase, outcome, seconds, "; ".join(n for n in notes if n)), *read_rows(rows_file)]


def run_in_group(command: list[str], log: Path, timeout: float) -> tuple[int | None, int]:
    """Run ``command`` in a new session (so a process group of its own), output to ``log``; at its
    end or at ``timeout`` kill whatever of its group is left. (exit code, or None at the timeout;
    processes killed)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        code = None
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:  # on a timeout, and on an interrupt of this script too: nothing of the phase outlives it
            killed = end_group(proc.pid, grace_s=2.0 if code is not None else 0.0)
            proc.wait()
    return code, killed


def phase_row(phase: Phase, outcome: str, seconds: float, result: str) -> dict:
    return {"phase": phase.name, "kind": "phase", "check": f"phase {phase.name}: {phase.what}", "outcome": outcome,
            "result": result, "seconds": round(seconds, 2)}


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):  # state, ppid, pgrp
                members.append(int(entry))
    return members


def end_group(pgid: int, grace_s: float) -> int:
    """SIGKILL what is left of process group ``pgid`` after ``grace_s`` (a normal exit's stragglers
    end by themselves), and wait until it is gone, so that `cleanup` sees its segments' owners dead.
    Returns how many processes were killed. Nothing a phase starts makes a session or group of its
    own, so the group is everything it started."""
    wait_for(lambda: not group_members(pgid), grace_s)
    killed: set[int] = set()
    # multiprocessing's resource trackers last: once everything that registered with one is dead, it
    # unlinks their semaphores (/dev/shm/sem.mp-*) and exits; killed first, they would leak them
    while workers := [pid for pid in group_members(pgid) if not is_resource_tracker(pid)]:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.update(workers)
        time.sleep(0.05)  # and again, for a child forked meanwhile
    wait_for(lambda: not group_members(pgid), 3.0 if killed else 0.0)
    killed.update(group_members(pgid))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    wait_for(lambda: not group_members(pgid), 10.0)
    return len(killed)


def is_resource_tracker(pid: int) -> bool:
    try:
        return b"multiprocessing.resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def cleanup() -> str:
    """``dalishare cleanup``: segments, sockets and lifelines of dead producers and jobs; "" if none."""
    try:
        proc = subprocess.run([sys.executable, "-m", "dalishare", "cleanup"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "dalishare cleanup did not finish within 60 s"
    first = (proc.stdout.strip().splitlines() or [f"dalishare cleanup exited with {proc.returncode}"])[0]
    return "" if first.startswith("removed 0 ") else f"dalishare cleanup: {first}"


def read_rows(path: Path) -> list[dict]:
    """The rows a phase wrote; a line cut by its kill is left out."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


@contextlib.contextmanager
def data_folder(data: str | None, dry: bool):
    """``data``; else the hymenoptera photos (not in a dry run); else a generated set, removed after."""
    if data or (not dry and HYMENOPTERA.is_dir()):
        yield data or str(HYMENOPTERA)
        return
    from dalishare.testing import PATTERNS, make_image_folder

    with tempfile.TemporaryDirectory(prefix="dalishare-gpu-check-") as tmp:
        yield str(make_image_folder(Path(tmp), {p: 32 if dry else 128 for p in PATTERNS}))


class Report:
    """The results files: FILE.jsonl gets each phase's rows as it ends, and FILE, the table, is
    rewritten then; FILE-logs/ holds each phase's output."""

    def __init__(self, out: Path, dry: bool):
        self.out, self.jsonl, self.logs = out, out.with_suffix(".jsonl"), out.parent / f"{out.stem}-logs"
        self.title = "dalishare GPU check" + (" (dry run, on the CPU)" if dry else "")
        self.rows: list[dict] = []
        self.started = time.monotonic()
        shutil.rmtree(self.logs, ignore_errors=True)  # the last run's
        self.logs.mkdir(parents=True)
        self.jsonl.write_text("")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def add(self, rows: list[dict]) -> None:
        self.rows += rows
        with open(self.jsonl, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        console = Console(record=True, width=180, file=io.StringIO())
        console.print(self.table())
        self.out.write_text(console.export_text())

    def table(self) -> Table:
        table = Table(title=f"{self.title}, {self.elapsed():.0f} s", title_justify="left")
        for column, justify in (("phase", "left"), ("check / figure", "left"), ("outcome", "left"),
                                ("result", "left"), ("seconds", "right")):
            table.add_column(column, justify=justify, overflow="fold")
        for i, row in enumerate(self.rows):
            phase = row["phase"] if row.get("kind") == "phase" else ""
            seconds = "" if row["seconds"] is None else f"{row['seconds']:.1f}"
            last_of_phase = i + 1 == len(self.rows) or self.rows[i + 1].get("kind") == "phase"
            cells = (phase, row["check"], row["outcome"], row["result"], seconds)  # Text: "[views]" is no markup
            table.add_row(*map(Text, cells), end_section=last_of_phase)
        return table

    def failing(self) -> list[dict]:
        return [row for row in self.rows if row["outcome"] in FAILING]


# -- the child: one phase ------------------------------------------------------------------------------

def run_child(args: argparse.Namespace) -> int:
    gpu_phases.die_with_parent()
    ctx = gpu_phases.Context(args.phase, args.data, args.dry_run, Path(args.rows))
    try:
        BY_NAME[args.phase].run(ctx)
    except gpu_phases.CheckFailed as exc:
        print(f"gpu_check: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every phase on the CPU, tiny data (for CI)")
    parser.add_argument("--data", help="image folder (default: ../shared/data/hymenoptera/train, else generated)")
    parser.add_argument("--out", help="the table; FILE.jsonl and FILE-logs/ beside it (default: "
                                      "bench/results/gpu-check.txt, or in the temp folder for --dry-run)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="the whole run's limit (default: %(default)s)")
    parser.add_argument("--phases", default=",".join(BY_NAME), help="which phases, in their order (default: all)")
    parser.add_argument("--phase-timeout", action="append", default=[], metavar="NAME=S", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=list(BY_NAME), help=argparse.SUPPRESS)  # in a phase's child
    parser.add_argument("--rows", help=argparse.SUPPRESS)  # in a phase's child
    args = parser.parse_args(argv)
    unknown = [n for n in args.phases.split(",") if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown phases {unknown}; the phases are {list(BY_NAME)}")
    args.phases = [p for p in PHASES if p.name in args.phases.split(",")]
    args.timeouts = {name: float(s) for name, s in (item.split("=", 1) for item in args.phase_timeout)}
    args.out = args.out or (str(Path(tempfile.gettempdir()) / "dalishare-gpu-check-dry-run.txt") if args.dry_run
                            else str(BENCH / "results" / "gpu-check.txt"))
    return args


def main() -> int:
    args = parse_args()
    if args.phase:
        return run_child(args)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwinds: run_phase's finally
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
