"""The phases of bench/gpu_check.py. Each runs in a child process of its own (``gpu_check.py --phase
NAME``), in a process group of its own, and writes its rows as it goes (`Context.emit`), so a phase
killed at its timeout still leaves the rows it had written. A phase fails by raising (`CheckFailed`
for a check that did not hold); a failing figure is written with outcome "failed" first.

With ``--dry-run`` every phase runs on the CPU (device "cpu", few batches): the same code paths
but for the device, so a bug in the orchestration or a phase shows on any machine.

`sharing` (bench/sharing.py: the benchmark jobs) is imported inside the phases: it imports torch,
which the orchestrating parent does not need.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dalishare.testing import ProducerProcess, jobs_on_producer, run_jobs

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
JOBS = 3  # jobs sharing one pipeline, against as many pipelines of their own (2 in a dry run: 2 cores)
TEST_TIMEOUT_S = 90  # per GPU test, where pytest-timeout is installed
OFF = ("--cache", "off")  # the ring itself: "auto" would serve a small set from a memory cache


class CheckFailed(Exception):
    """A check of a phase did not hold; the phase ends with this message."""


@dataclass
class Context:
    """What a phase knows: its name, the data, dry run or not, and where its rows go."""

    phase: str
    data: str
    dry: bool
    rows: Path

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "gpu"

    def pick(self, gpu, dry):
        """``gpu`` on the GPU machine, ``dry`` in a dry run."""
        return dry if self.dry else gpu

    def emit(self, check: str, result: str = "", seconds: float | None = None, outcome: str = "", **extra) -> None:
        """Append one row now (flushed: a kill a moment later keeps it)."""
        row = {"phase": self.phase, "check": check, "outcome": outcome, "result": result,
               "seconds": None if seconds is None else round(seconds, 2), **extra}
        with open(self.rows, "a") as f:
            f.write(json.dumps(row) + "\n")


def die_with_parent() -> None:
    """Kill this phase's whole process group if the orchestrating parent dies (killed itself, say, by
    an outer timeout): the group was made to outlive nothing."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def since(t0: float) -> float:
    return time.monotonic() - t0


def each(rates: list[float]) -> str:
    return " ".join(f"{r:.0f}" for r in rates) + f"  (total {sum(rates):.0f})"


# -- phase: versions ----------------------------------------------------------------------------------

def versions(ctx: Context) -> None:
    """The machine and the versions; ``gpus``: the CUDA GPUs both torch and CuPy see (0: none)."""
    import torch

    parts, gpus = [], torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().replace("\n", "; ")
        parts.append(smi or "nvidia-smi printed nothing")
    except (OSError, subprocess.TimeoutExpired):
        parts.append("no nvidia-smi")
    parts.append(f"{os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__} "
                 f"(CUDA {torch.version.cuda})")
    for module, label in (("cupy", "CuPy"), ("nvidia.dali", "DALI"), ("zmq", "pyzmq")):
        try:
            parts.append(f"{label} {importlib.import_module(module).__version__}")
        except ImportError:
            parts.append(f"no {label}")
    try:
        import cupy

        gpus = min(gpus, cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no CuPy, no driver, no device: all mean no GPU the ring can use
        gpus = 0
    ctx.emit("machine", " | ".join(parts), gpus=gpus)


# -- phase: gpu-tests ---------------------------------------------------------------------------------

class RowPerTest:
    """A pytest plugin writing one row per test as it ends, so a phase killed mid-way keeps the
    outcomes of the tests that had finished."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or (report.when == "setup" and not report.passed) or \
                (report.when == "teardown" and report.failed):
            outcome = "error" if report.failed and report.when != "call" else report.outcome
            name = report.nodeid.split("::", 1)[-1]
            self.ctx.emit(name, self._message(report), report.duration, outcome)

    @staticmethod
    def _message(report) -> str:
        if report.skipped and isinstance(report.longrepr, tuple):
            return report.longrepr[2].removeprefix("Skipped: ")
        if report.failed:
            lines = [line for line in report.longreprtext.splitlines() if line.startswith("E ")]
            return (lines or report.longreprtext.strip().splitlines() or [""])[-1][:200]
        return ""


def gpu_tests(ctx: Context) -> None:
    """tests/gpu and the CUDA test of dalishare.augment, stopping at the first failure (-x)."""
    import pytest

    args = [str(ROOT / "tests" / "gpu"), str(ROOT / "tests" / "e2e" / "test_augment.py"), "-m", "gpu",
            "-x", "-q", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += ["--timeout", str(TEST_TIMEOUT_S)]
    else:  # bounded by the phase's timeout only: a hung test costs the rest of the phase
        ctx.emit("pytest-timeout", "not installed: no per-test timeout, only the phase's")
    code = pytest.main(args, plugins=[RowPerTest(ctx)])
    if code != 0:
        raise CheckFailed(f"pytest exited with {code!s}")


# -- phase: ring --------------------------------------------------------------------------------------

def ring(ctx: Context) -> None:
    """The device ring (``--cache off``): hand-off latency to a waiting job, then JOBS jobs sharing
    one pipeline against JOBS jobs each running its own DALI pipeline (built before the timed batches).
    Every job reads every pixel on the GPU, without a training step: the loader is what limits it."""
    import sharing

    warmup, batches, jobs = ctx.pick((5, 60, JOBS), (2, 4, 2))
    views = (warmup, batches, 0.0, False)  # no step: the job waits for each batch; views of the ring
    t0 = time.monotonic()
    lone = sharing.with_producer(ctx.data, 1, sharing.shared_job, views, ctx.device, options=OFF)[0]
    on_ring = lone["device"].startswith(ctx.pick("cuda", "cpu"))  # views of a GPU ring lie on the GPU
    ctx.emit("where a job's batches lie", lone["device"], outcome="passed" if on_ring else "failed")
    ctx.emit("hand-off: announcement sent -> tensor in a waiting job", sharing.latency(lone["handoff_ns"]),
             since(t0), "" if lone["handoff_ns"] else "failed")
    t0 = time.monotonic()
    shared = [r["img_s"] for r in sharing.with_producer(ctx.data, jobs, sharing.shared_job, views, ctx.device,
                                                        options=OFF)]
    ctx.emit(f"{jobs} jobs on one shared pipeline: img/s each", each(shared), since(t0))
    t0 = time.monotonic()
    own = [r["img_s"] for r in run_jobs(sharing.own_pipeline_job, (ctx.data, ctx.device, warmup, batches, 0.0), jobs)]
    ctx.emit(f"{jobs} jobs, own DALI pipeline each (built once, untimed): img/s each", each(own), since(t0))
    ctx.emit("shared / own, all jobs together", f"{sum(shared) / sum(own):.2f}x")
    if not lone["handoff_ns"] or not on_ring:
        raise CheckFailed("the ring was not measured (see the rows above)")


# -- phase: copy --------------------------------------------------------------------------------------

def copy_cost(ctx: Context) -> None:
    """What a job's own copy of each batch costs against zero-copy views (``copy=True`` vs
    ``copy=False``), one job at a time on one producer. With a step longer than a batch's decode the
    batches are already announced, so next() is the job's own cost, not the wait for the producer."""
    import sharing

    warmup, batches, step = ctx.pick((5, 40, 0.025), (2, 4, 0.0))
    name = f"gpucheck-{os.getpid()}"
    options = ("--batch-size", str(sharing.BATCH), "--device", ctx.device, *OFF)
    with ProducerProcess(ctx.data, *options, name=name, pipeline=sharing.STAGE):
        for copy in (False, True):
            t0 = time.monotonic()
            r = run_jobs(sharing.shared_job, (name, warmup, batches, step, copy), 1)[0]
            ctx.emit(f"copy={copy} ({'own copies' if copy else 'views'}), {step * 1000:.0f} ms step: img/s; next()",
                     f"{r['img_s']:.0f} img/s; next() {sharing.latency(r['next_ns'])} on {r['device']}", since(t0))


# -- phase: cache -------------------------------------------------------------------------------------

def epochs_job(name: str, device: str | None, epochs: int, q) -> None:
    """A job reading ``epochs`` passes (on ``device``; None: where the producer serves), every pixel
    read on the GPU; img/s per epoch."""
    import sharing

    from dalishare import DaliShareIterator

    with DaliShareIterator(name, batch_size=sharing.BATCH, device=device, attach_timeout=120) as loader:
        per_epoch = []
        for _ in range(epochs):
            images, t0 = 0, time.monotonic()
            for batch in loader:
                sharing.read_every_pixel(batch["images"])
                images += len(batch["images"])
            per_epoch.append(images / (time.monotonic() - t0))
        q.put({"per_epoch": per_epoch, "device": str(batch["images"].device)})


def cache(ctx: Context) -> None:
    """Two GPU jobs reading epochs from a filled ``--cache gpu`` against a filled ``--cache memory``
    (dry run: memory against a folder): img/s each over the epochs after the first (which fills)."""
    import sharing

    epochs, device = ctx.pick((6, "cuda"), (2, None))
    with tempfile.TemporaryDirectory(prefix="dalishare-gpu-check-cache-") as folder:  # the dry run's file cache
        caches = ctx.pick((("gpu", "gpu"), ("memory", "memory")), (("memory", "memory"), (folder, "DIR")))
        for cache_arg, label in caches:
            t0 = time.monotonic()
            options = ("--batch-size", str(sharing.BATCH), "--device", ctx.device, "--cache", cache_arg)
            results = jobs_on_producer(ctx.data, options, epochs_job, (device, epochs), 2, pipeline=sharing.STAGE)
            filled = [sum(r["per_epoch"][1:]) / (epochs - 1) for r in results]
            ctx.emit(f"--cache {label}: 2 jobs, img/s each in epochs 2-{epochs} (filled)",
                     f"{each(filled)} on {results[0]['device']}", since(t0))


# -- phase: augment -----------------------------------------------------------------------------------

def augment(ctx: Context) -> None:
    """bench/augment.py on CUDA: a training recipe per batch, dalishare.augment against torchvision."""
    options = ctx.pick(["--device", "cuda", "--reps", "5"], ["--device", "cpu", "--batch", "8", "--reps", "1"])
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(BENCH / "augment.py"), *options], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckFailed(f"bench/augment.py exited with {proc.returncode}: {(proc.stdout + proc.stderr)[-400:]}")
    header, *lines = proc.stdout.strip().splitlines()
    ctx.emit("augment: setup", header, since(t0))
    for line in lines:
        ctx.emit("augment: per batch", " ".join(line.split()))


# -- phase: threads -----------------------------------------------------------------------------------

def threads(ctx: Context) -> None:
    """The producer's img/s (one job, no step, ``--cache off``) with its DALI CPU threads capped
    against serve's default and all cores: what capping the mixed decoder's threads costs (DALI#5274:
    64 threads used 24 cores)."""
    import sharing

    warmup, batches = ctx.pick((5, 60), (2, 4))
    caps = ctx.pick((None, os.cpu_count(), 4), (None, 1))  # None: serve's default
    for cap in caps:
        t0 = time.monotonic()
        options = ("--batch-size", str(sharing.BATCH), "--device", ctx.device, *OFF,
                   *(("--threads", str(cap)) if cap else ()))
        r = jobs_on_producer(ctx.data, options, sharing.shared_job, (warmup, batches, 0.0, False), 1,
                             pipeline=sharing.STAGE)[0]
        label = f"--threads {cap}" if cap else "serve's default --threads"
        ctx.emit(f"producer with {label}: one job, no step", f"{r['img_s']:.0f} img/s", since(t0))
