"""Benchmark: a 4-rank consumer group on one producer, the same 4 ranks on two shard producers (two
"nodes" on this machine), and 4 independent jobs on one producer; each with ``--cache memory`` and
with ``--cache off`` (the ring).

    python bench/groups.py [--data DIR] [--copies 3] [--epochs 5] [--step-ms 20] [--out FILE]

The dataset is the one of bench/hetero.py (the hymenoptera photos ``--copies`` times). Every
producer serves the ResNet stage; every rank or job reads ``--epochs`` epochs
in batches of 64, sleeping ``--step-ms`` per batch as a training step would. Printed per setup:
images/s in total (all ranks or jobs, from the first attach to the last batch, the fill included),
the images each process read, and CPU seconds per 1,000 images read, counting every process
(producers, stage workers, jobs). Each group epoch checks that the ranks' real samples are every
sample once, and each independent job's epochs that it got every sample once. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path

from hetero import build_dataset  # the same photos as the heterogeneous-jobs benchmark

from dalishare.producer.dataset import scan
from dalishare.testing import ProducerProcess, run_each

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "pipelines" / "resnet.py"
BATCH = 64


def reader(name: str, rank: int | None, world: int | None, epochs: int, step_s: float, q) -> None:
    """A rank of group "g" (``rank`` of ``world``) or, with rank None, an independent job."""
    from dalishare import DaliShareIterator

    group = "g" if rank is not None else None
    start = time.monotonic()
    with DaliShareIterator(name, batch_size=BATCH, group=group, rank=rank, world_size=world,
                           attach_timeout=300, batch_timeout=300) as loader:
        passes = []
        for _ in range(epochs):
            seen = []
            for batch in loader:
                pads = batch["padded"].tolist() if "padded" in batch else [False] * len(batch["indices"])
                seen += [(i, p) for i, p in zip(batch["indices"].tolist(), pads)]
                time.sleep(step_s)
            passes.append(seen)
        q.put({"rank": rank, "name": name, "start": start, "end": time.monotonic(), "passes": passes,
               "samples": loader.samples_per_epoch if rank is None else None})


def run(data: str, cache: str, producers: list[tuple[str, list[str]]], readers: list[tuple], epochs: int,
        step_s: float) -> dict:
    """Start the producers (name, options), then the readers (name, rank, world); figures of the run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    servers = [ProducerProcess(data, "--batch-size", str(BATCH), "--cache", cache, *options, "--min-consumers",
                               str(sum(r[0] == name for r in readers)), name=name, pipeline=STAGE)
               for name, options in producers]
    try:
        results = run_each(reader, [(*spec, epochs, step_s) for spec in readers], timeout=1200)
    finally:
        for server in servers:
            server.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    images = sum(len(p) for r in results for p in r["passes"])
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"results": results, "images": images, "img_s": images / seconds, "cpu_per_1000": 1000 * cpu / images,
            "cpu": cpu, "seconds": seconds}


def exactly_once_as_group(results: list[dict], epochs: int, samples: int) -> bool:
    for epoch in range(epochs):
        real = Counter(i for r in results for i, pad in r["passes"][epoch] if not pad)
        if sorted(real) != list(range(samples)) or set(real.values()) != {1}:
            return False
    return len({len(r["passes"][e]) for r in results for e in range(epochs)}) == 1  # equal counts per rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="image folder (default: hymenoptera copied --copies times)")
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--out", help="also write the figures to this file")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="dalishare-groups-")
    data = args.data or str(build_dataset(Path(tmp.name), args.copies))
    samples = len(scan(data))
    step, pid = args.step_ms / 1000, os.getpid()
    one, n0, n1 = f"g1-{pid}", f"n0-{pid}", f"n1-{pid}"
    setups = {}
    for cache in ("memory", "off"):
        setups[f"4-rank group, one producer, --cache {cache}"] = run(
            data, cache, [(one, [])], [(one, r, 4) for r in range(4)], args.epochs, step)
        setups[f"4 ranks, two shard producers, --cache {cache}"] = run(
            data, cache, [(n0, ["--shard", "0/2"]), (n1, ["--shard", "1/2"])],
            [(n0, 0, 2), (n0, 1, 2), (n1, 0, 2), (n1, 1, 2)], args.epochs, step)
        setups[f"4 independent jobs, one producer, --cache {cache}"] = run(
            data, cache, [(one, [])], [(one, None, None)] * 4, args.epochs, step)
    lines = [f"dalishare groups benchmark: {os.cpu_count()} cores, {samples} images in {data}, batches of "
             f"{BATCH}x224x224x3 uint8, {args.epochs} epochs per process, {args.step_ms:.0f} ms step",
             f"{'setup':<50}{'img/s total':>12}{'images per process':>30}{'CPU s / 1000 img':>18}  exactly once"]
    for label, figures in setups.items():
        results = figures["results"]
        if "independent" in label:
            exact = all(sorted(i for i, _ in p) == list(range(samples)) for r in results for p in r["passes"])
        else:  # the 4 ranks together, per epoch, across both nodes for the shards
            exact = exactly_once_as_group(results, args.epochs, samples)
        per = " ".join(str(sum(len(p) for p in r["passes"])) for r in results)
        lines.append(f"{label:<50}{figures['img_s']:>12.0f}{per:>30}{figures['cpu_per_1000']:>18.2f}  "
                     f"{'yes' if exact else 'NO'}")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    tmp.cleanup()


if __name__ == "__main__":
    main()
