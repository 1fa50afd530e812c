"""Support for the tests, the benchmarks and the demo: synthetic labelled JPEG folders, and
``dalishare serve`` in a child process. Imports neither torch nor DALI."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESNET_STAGE = Path(__file__).resolve().parents[1] / "pipelines" / "resnet.py"  # in a checkout
PATTERNS = ("stripes", "bars", "checks")  # one visual pattern per class of a synthetic folder


def make_image_folder(root: Path, class_sizes: dict[str, int], seed: int = 0) -> Path:
    """Write JPEGs of varying sizes into class folders; each class has its own visual pattern."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, (cls, n) in enumerate(class_sizes.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = int(rng.integers(200, 400)), int(rng.integers(200, 400))
            y, x = np.mgrid[0:h, 0:w]
            period = int(rng.integers(12, 40))
            pattern = [(y // period) % 2, (x // period) % 2, ((x // period) + (y // period)) % 2][label % 3]
            colour = rng.integers(60, 256, 3)
            img = pattern[..., None] * colour + rng.integers(0, 50, (h, w, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / cls / f"{cls}_{i:04d}.jpg", quality=90)
    return root


CORRUPTIONS = ("truncated", "flipped", "bad-marker", "spliced")


def corrupt_jpegs(sources: list[Path], folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Write ``count`` broken JPEGs into ``folder``, made from the real JPEGs ``sources`` the way
    decoder test suites break them, one kind after the other (CORRUPTIONS): cut at a random point,
    random bytes flipped past the headers, a marker byte overwritten (a random 0xFF xx pair), a
    chunk of another file spliced in. Some still decode: they are odd, not necessarily bad."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for n in range(count):
        kind = CORRUPTIONS[n % len(CORRUPTIONS)]
        data = bytearray(sources[int(rng.integers(len(sources)))].read_bytes())
        if kind == "truncated":
            data = data[: int(rng.integers(2, len(data) - 2))]
        elif kind == "flipped":
            for i in rng.integers(200, len(data), int(rng.integers(1, 40))):
                data[i] ^= int(rng.integers(1, 256))
        elif kind == "bad-marker":
            markers = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] not in (0x00, 0xFF)]
            for i in rng.choice(markers, size=min(3, len(markers)), replace=False):
                data[i + 1] = int(rng.integers(0, 256))
        else:
            other = sources[int(rng.integers(len(sources)))].read_bytes()
            at, start = int(rng.integers(2, len(data))), int(rng.integers(0, len(other) - 1))
            data[at:at] = other[start : start + int(rng.integers(64, 4096))]
        path = folder / f"{kind}_{n:04d}.jpg"
        path.write_bytes(bytes(data))
        written.append(path)
    return written


class ProducerProcess:
    """``dalishare serve PIPELINE --data DATA --name NAME OPTIONS...`` in a child process. Its output
    goes to a temporary file, not a pipe (a full pipe would block the producer). Leaving the ``with``
    block stops it with SIGTERM and waits; `wait` kills it after its timeout."""

    def __init__(self, data: Path | str, *options: str, name: str = "default", pipeline: Path | str = RESNET_STAGE):
        self.name = name
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dalishare", "serve", str(pipeline), "--data", str(data), "--name", name, *options],
            stdout=self._log, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"})  # a hung producer's stacks go to its log (see wait)

    def wait(self, timeout: float = 60) -> int | None:
        """The exit code, or None if it had to be killed after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to the log
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            return None

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def __enter__(self) -> "ProducerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def join_or_kill(procs, timeout: float = 30.0) -> None:
    """Join child processes (multiprocessing), killing any that outlive ``timeout`` seconds."""
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def run_jobs(target, args: tuple, n: int, timeout: float = 600) -> list[dict]:
    """Run ``n`` processes of ``target(*args, queue)`` (spawned) and collect the one result each puts
    on the queue; a crashed job fails the run at once, a hung one after ``timeout`` seconds."""
    return run_each(target, [args] * n, timeout)


def run_each(target, each_args: list[tuple], timeout: float = 600) -> list[dict]:
    """`run_jobs` with arguments of their own per process: ``target(*args, queue)`` for each; the
    results in the order they came."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, q)) for args in each_args]
    for p in procs:
        p.start()
    results, deadline = [], time.monotonic() + timeout
    try:
        while len(results) < len(procs):
            try:
                results.append(q.get(timeout=1))
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(f"{target.__name__} jobs failed (exit codes {failed}) or timed out") from None
        return results
    finally:
        join_or_kill(procs)


def jobs_on_producer(data, options: tuple, target, args: tuple, n: int, pipeline=RESNET_STAGE,
                     timeout: float = 600) -> list[dict]:
    """Start a producer (``dalishare serve`` with ``options``, waiting for ``n`` jobs), run ``n`` jobs
    ``target(name, *args, queue)`` against it, return their results, stop it."""
    name = f"bench-{os.getpid()}"
    with ProducerProcess(data, *options, "--min-consumers", str(n), name=name, pipeline=pipeline):
        return run_jobs(target, (name, *args), n, timeout)
