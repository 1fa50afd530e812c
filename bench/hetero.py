"""Benchmark: jobs of different speeds on one producer, with the decoded-sample cache and without.

    python bench/hetero.py [--data DIR] [--copies 3] [--epochs 3] [--out FILE]

The dataset is the hymenoptera photos (../shared/data/hymenoptera, train and val) copied ``--copies``
times into one image folder (1,191 real photos for 3), else 1,024 generated ones. Every job takes
batches of 64x224x224x3 uint8 (the ResNet stage) and emulates a training step by sleeping. Phases,
each with a fresh producer (``--cache memory`` and ``--cache off`` side by side where it applies):

1. a fast job (20 ms step) and a slow job (400 ms step), each alone, then both together: images/s
   over ``--epochs`` epochs from attach (the fill included), and the share of its lone rate each
   keeps while sharing;
2. the filling pass: one job with no step, its first epoch's images/s, against ``--cache off``;
3. four jobs (5 ms step) once the cache is full: total images/s against the stage's decode rate
   (the fill's, from the producer's log), the producer's CPU use meanwhile, and what the per-batch
   gather costs (a job's ``next()``, and the copy alone);
4. a restart on a persisted ``--cache DIR``: time from ``dalishare serve`` to a job's first batch,
   and the samples the new producer decoded.

Every job checks that each epoch held every sample exactly once. The figures are printed (and
written to ``--out``); nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from dalishare.producer.dataset import scan
from dalishare.testing import ProducerProcess, make_image_folder, run_each

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "pipelines" / "resnet.py"
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera"
BATCH = 64
FAST_S, SLOW_S, QUICK_S = 0.020, 0.400, 0.005


def paced_job(name: str, step_s: float, epochs: int, q) -> None:
    """Read ``epochs`` passes with a ``step_s`` sleep per batch; report images/s (from attach, and
    per epoch), next() times, when the first batch came, and whether each epoch was exactly once."""
    from dalishare import DaliShareIterator

    attached_at = time.monotonic()
    with DaliShareIterator(name, batch_size=BATCH, attach_timeout=300, batch_timeout=300) as loader:
        first_at, images, per_epoch, next_ns, exact = None, 0, [], [], True
        for _ in range(epochs):
            seen, start = [], time.monotonic()
            it = iter(loader)
            while True:
                t = time.perf_counter_ns()
                batch = next(it, None)
                if batch is None:
                    break
                next_ns.append(time.perf_counter_ns() - t)
                first_at = first_at or time.monotonic()
                seen += batch["indices"].tolist()
                time.sleep(step_s)
            images += len(seen)
            per_epoch.append(len(seen) / (time.monotonic() - start))
            exact &= sorted(seen) == list(range(loader.samples_per_epoch + loader.excluded_samples)) and \
                len(seen) == loader.samples_per_epoch
        q.put({"img_s": images / (time.monotonic() - attached_at), "per_epoch": per_epoch, "next_ns": next_ns,
               "first_at": first_at, "exact": exact, "step_s": step_s})


def on_producer(data: str, cache: str, jobs: list[tuple[float, int]], extra: tuple = ()) -> tuple[list[dict], str]:
    """One producer with ``--cache cache``; jobs (step_s, epochs) started together (``--min-consumers``
    of them); their results in the same order, and the producer's log."""
    name = f"hetero-{os.getpid()}"
    with ProducerProcess(data, "--batch-size", str(BATCH), "--cache", cache, "--min-consumers", str(len(jobs)),
                         *extra, name=name, pipeline=STAGE) as server:
        results = _run_mixed(name, jobs)
        log = server.log()
    return results, log


def _run_mixed(name: str, jobs: list[tuple[float, int]]) -> list[dict]:
    """Start one paced_job per (step_s, epochs) at once (testing.run_jobs starts identical ones);
    results sorted back into that order (the steps must differ)."""
    results = run_each(paced_job, [(name, step_s, epochs) for step_s, epochs in jobs], timeout=900)
    order = [step for step, _ in jobs]
    return sorted(results, key=lambda r: order.index(r["step_s"]))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fill_rate(log: str) -> float:
    match = re.search(r"the cache is full: (\d+) samples decoded in ([\d.]+) s", log)
    return int(match.group(1)) / float(match.group(2))


def build_dataset(root: Path, copies: int) -> Path:
    """The hymenoptera photos (train and val) ``copies`` times in one class-folder tree (JPEGs only:
    the folders also hold a .gif), else generated JPEGs (said on stdout)."""
    data = root / "data"
    if not HYMENOPTERA.is_dir():
        from dalishare.testing import PATTERNS

        per_class = 1024 // len(PATTERNS)
        print(f"{HYMENOPTERA} not found: generating {per_class * len(PATTERNS)} JPEGs instead (pass --data DIR "
              f"for real photos)", flush=True)
        return make_image_folder(data, {p: per_class for p in PATTERNS})
    for split in ("train", "val"):
        for src in sorted((HYMENOPTERA / split).glob("*/*")):
            if src.suffix.lower() not in (".jpg", ".jpeg"):
                continue
            for k in range(copies):
                dst = data / src.parent.name / f"{split}-{k}-{src.name}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="image folder (default: hymenoptera copied --copies times)")
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs each job of phase 1 reads")
    parser.add_argument("--out", help="also write the figures to this file")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="dalishare-hetero-")
    data = args.data or str(build_dataset(Path(tmp.name), args.copies))
    samples = len(scan(data))  # the images served (the folder also holds 3 non-image files)
    lines: list[str] = []
    say = lambda line: (print(line, flush=True), lines.append(line))  # noqa: E731
    say(f"dalishare heterogeneous-jobs benchmark: {os.cpu_count()} cores, {samples} images in {data}, "
        f"batches of {BATCH}x224x224x3 uint8; steps: fast {FAST_S * 1e3:.0f} ms, slow {SLOW_S * 1e3:.0f} ms "
        f"per batch; phase 1 reads {args.epochs} epochs per job")

    # 1. fast and slow, alone and together
    say(f"{'phase 1':<10}{'cache':<8}{'fast alone':>12}{'slow alone':>12}{'fast shared':>13}{'slow shared':>13}"
        f"{'fast kept':>11}{'slow kept':>11}  exactly once")
    for cache in ("memory", "off"):
        (fast,), _ = on_producer(data, cache, [(FAST_S, args.epochs)])
        (slow,), _ = on_producer(data, cache, [(SLOW_S, args.epochs)])
        (fast_s, slow_s), _ = on_producer(data, cache, [(FAST_S, args.epochs), (SLOW_S, args.epochs)])
        exact = all(r["exact"] for r in (fast, slow, fast_s, slow_s))
        say(f"{'':<10}{cache:<8}{fast['img_s']:>12.0f}{slow['img_s']:>12.0f}{fast_s['img_s']:>13.0f}"
            f"{slow_s['img_s']:>13.0f}{fast_s['img_s'] / fast['img_s']:>11.0%}{slow_s['img_s'] / slow['img_s']:>11.0%}"
            f"  {'yes' if exact else 'NO'}")

    # 2. the filling pass against the ring, decode-bound (no step); best of 2 each
    first = {cache: max(on_producer(data, cache, [(0.0, 1)])[0][0]["per_epoch"][0] for _ in range(2))
             for cache in ("memory", "off")}
    say(f"phase 2: a lone job's first epoch, no step: {first['memory']:.0f} img/s while filling the cache, "
        f"{first['off']:.0f} img/s with --cache off: the fill costs {1 - first['memory'] / first['off']:.1%}")

    # 3. four quick jobs on a full cache
    name = f"hetero-{os.getpid()}"
    with ProducerProcess(data, "--batch-size", str(BATCH), "--cache", "memory", name=name, pipeline=STAGE) as server:
        (filler,) = _run_mixed(name, [(0.0, 1)])
        deadline = time.monotonic() + 60
        while "the cache is full" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
        quick = _run_mixed(name, [(QUICK_S + i * 1e-6, 3) for i in range(4)])  # distinct steps keep the order
        cpu = (cpu_seconds(server.proc.pid) - cpu0) / (time.monotonic() - t0)
        decode = fill_rate(server.log())
        path = Path(re.search(r"cache (/dev/shm/\S+\.dscache)", server.log()).group(1))
        gather_ms = time_gather(path)
    total = sum(r["img_s"] for r in quick)
    nexts = [n for r in quick for n in r["next_ns"]]
    say(f"phase 3: 4 jobs ({QUICK_S * 1e3:.0f} ms step) on a full cache: {total:.0f} img/s in total "
        f"({' '.join(str(round(r['img_s'])) for r in quick)}), {total / decode:.1f}x the stage's decode rate of "
        f"{decode:.0f} img/s (the fill's); producer CPU meanwhile {cpu:.1%} of one core; "
        f"exactly once: {'yes' if all(r['exact'] for r in quick + [filler]) else 'NO'}")
    say(f"         a batch's gather (64 samples, {64 * 224 * 224 * 3 / 2**20:.1f} MiB, one copy into the job's "
        f"tensor): next() median {statistics.median(nexts) / 1e6:.2f} ms, p90 "
        f"{sorted(nexts)[int(0.9 * len(nexts))] / 1e6:.2f} ms with 4 jobs on {os.cpu_count()} cores; the copy "
        f"alone, one process: {gather_ms:.2f} ms ({64 * 224 * 224 * 3 / gather_ms / 1e6:.1f} GB/s)")

    # 4. restart on a persisted folder cache
    folder = Path(tmp.name) / "cache"
    folder.mkdir()
    on_producer(data, str(folder), [(0.0, 1)], ("--epochs", "1"))
    start = time.monotonic()
    with ProducerProcess(data, "--batch-size", str(BATCH), "--cache", str(folder), "--epochs", "1",
                         name=f"hetero-{os.getpid()}", pipeline=STAGE) as server:
        (again,) = _run_mixed(f"hetero-{os.getpid()}", [(0.0, 1)])
        server.wait(60)
        log = server.log()
    decoded = int(re.search(r"(\d+) samples decoded, \d+ stage worker restarts", log).group(1))
    say(f"phase 4: restart on a persisted --cache DIR: first batch {again['first_at'] - start:.2f} s after "
        f"`dalishare serve` started (job start-up included), {decoded} samples decoded, stage worker started: "
        f"{'yes' if 'stage worker started' in log else 'no'}; exactly once: {'yes' if again['exact'] else 'NO'}")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    tmp.cleanup()


def time_gather(path: Path, rounds: int = 50) -> float:
    """Milliseconds to gather 64 random rows of the cache into a fresh array (the job's copy)."""
    import numpy as np

    from dalishare.shm.cache import CacheView

    view = CacheView(path)
    rng = np.random.default_rng(0)
    out = np.empty((BATCH, *view.layout.sample_shape), dtype=view.layout.dtype)
    times = []
    for _ in range(rounds):
        idx = rng.choice(view.layout.samples, BATCH, replace=False)
        t = time.perf_counter()
        view.gather(idx, out)
        times.append(time.perf_counter() - t)
    view.close()
    return statistics.median(times) * 1e3


if __name__ == "__main__":
    main()
