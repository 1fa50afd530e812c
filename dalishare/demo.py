"""``dalishare demo``: one producer, three training jobs, and the same jobs each loading on its own.

Everything is made on the spot: a small labelled image dataset (three classes of synthetic
patterns), a producer of the ResNet stage, and three jobs training a tiny CNN on the CPU with
different batch sizes and augmentations. It ends with a table of images/s and loss per job.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .testing import PATTERNS, RESNET_STAGE as STAGE, ProducerProcess, join_or_kill, make_image_folder


# -- the jobs' side: augmentations and training ----------------------------------------------------

def make_augment(name: str, seed: int):
    """A job's own augmentation (dalishare.augment): a random crop resized to the tiny model's 64x64
    input, then the recipe's own twist; float NCHW out, the ring untouched."""
    import torch

    from dalishare.augment import ColorJitter, Compose, RandomHorizontalFlip, RandomResizedCrop, ToDtype

    crop = RandomResizedCrop(64, scale=(0.35, 1.0) if name == "crop+flip" else (0.9, 1.0))
    twist = {"flip": [RandomHorizontalFlip()], "crop+flip": [RandomHorizontalFlip()],
             "jitter": [ColorJitter(0.4, 0.4, 0.4)]}[name]
    return Compose([crop, *twist, ToDtype(torch.float32, scale=True)], seed=seed)


@dataclass(frozen=True)
class JobSpec:
    label: str
    batch_size: int
    augment: str  # a recipe of make_augment


JOBS = (JobSpec("A", 32, "flip"), JobSpec("B", 48, "crop+flip"), JobSpec("C", 100, "jitter"))


def _tiny_cnn(num_classes: int):
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def _train(spec: JobSpec, batches, epochs: int, num_classes: int, report) -> None:
    """Train the tiny CNN on ``batches(epoch)`` (augmented) for each epoch; report (samples, loss)."""
    import torch

    torch.manual_seed(0)
    model = _tiny_cnn(num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(epochs):
        for batch in batches(epoch):
            loss = torch.nn.functional.cross_entropy(model(batch["images"]), batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            report(len(batch["labels"]), loss.item())


def shared_job(spec: JobSpec, name: str, epochs: int, num_classes: int, q) -> None:
    from dalishare import DaliShareIterator

    import torch

    torch.set_num_threads(1)  # three jobs and a producer share two cores
    augment = make_augment(spec.augment, seed=ord(spec.label))
    with DaliShareIterator(name, batch_size=spec.batch_size, augment=augment, attach_timeout=120) as loader:
        _train(spec, lambda _epoch: loader, epochs, num_classes, lambda n, loss: q.put((spec.label, n, loss)))
    q.put((spec.label, None, None))


def alone_job(spec: JobSpec, data: str, epochs: int, num_classes: int, q) -> None:
    """The same job with its own DALI pipeline: what each job does without dalishare."""
    import torch

    from dalishare.producer.dataset import scan
    from dalishare.wire.order import epoch_order
    from dalishare.producer.stage import load_stage, standalone_batches

    torch.set_num_threads(1)
    ds, stage = scan(data), load_stage(STAGE)
    augment = make_augment(spec.augment, seed=ord(spec.label))

    def batches(epoch):
        order = epoch_order(len(ds), 0, epoch)
        files = [ds.files[i] for i in order]
        for start, batch in zip(range(0, len(files), spec.batch_size),
                                 standalone_batches(stage, files, spec.batch_size)):
            images = batch.numpy()
            labels = torch.from_numpy(ds.labels[order[start : start + len(images)]]).long()  # int32 in the listing
            yield augment({"images": torch.from_numpy(images), "labels": labels})

    _train(spec, batches, epochs, num_classes, lambda n, loss: q.put((spec.label, n, loss)))
    q.put((spec.label, None, None))


# -- the parent: start everything, show progress, print the table ---------------------------------

def _run_jobs(title: str, targets: list[tuple], total: int, timeout: float = 600) -> dict[str, dict]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=fn, args=(*args, q), daemon=True) for fn, args in targets]
    stats = {args[0].label: {"samples": 0, "losses": [], "start": None, "end": None} for _, args in targets}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn()) as progress:
        tasks = {label: progress.add_task(f"{title} job {label}", total=total, loss="-") for label in stats}
        for p in procs:
            p.start()
        deadline, running = time.monotonic() + timeout, len(procs)
        try:
            while running:
                try:
                    label, n, loss = q.get(timeout=1)
                except queue.Empty:
                    failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if failed or time.monotonic() > deadline:
                        raise RuntimeError(f"{title} jobs failed (exit codes {failed}) or ran past {timeout:.0f} s; "
                                           f"see their output above") from None
                    continue
                s = stats[label]
                if n is None:
                    s["end"], running = time.monotonic(), running - 1
                    continue
                s["start"] = s["start"] or time.monotonic()
                s["samples"] += n
                s["losses"].append(loss)
                progress.update(tasks[label], advance=n, loss=f"{loss:.3f}")
        finally:
            join_or_kill(procs)
    return stats


def _rate(s: dict) -> float:
    return s["samples"] / max(1e-9, (s["end"] or time.monotonic()) - s["start"]) if s["start"] else 0.0


def run_demo(images_per_class: int = 96, epochs: int = 3) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not STAGE.is_file():
        raise FileNotFoundError(f"the demo runs the stage {STAGE}: run it from a dalishare checkout")
    with tempfile.TemporaryDirectory(prefix="dalishare-demo-") as tmp:
        data = make_image_folder(Path(tmp) / "data", {p: images_per_class for p in PATTERNS})
        n = images_per_class * len(PATTERNS)
        console.print(f"made {n} images in {len(PATTERNS)} classes under {data}")
        name = f"demo-{os.getpid()}"
        with ProducerProcess(data, "--batch-size", "64", "--epochs", str(epochs), "--min-consumers", str(len(JOBS)),
                             name=name, pipeline=STAGE):
            shared = _run_jobs("shared", [(shared_job, (s, name, epochs, len(PATTERNS))) for s in JOBS], n * epochs)
        alone = _run_jobs("alone ", [(alone_job, (s, str(data), epochs, len(PATTERNS))) for s in JOBS], n * epochs)

    table = Table(title=f"dalishare demo: {n} images x {epochs} epochs, tiny CNN on the CPU")
    for col in ("job", "batch", "augment", "shared img/s", "shared loss", "alone img/s", "alone loss"):
        table.add_column(col, justify="right")
    for s in JOBS:
        sh, al = shared[s.label], alone[s.label]
        table.add_row(s.label, str(s.batch_size), s.augment, f"{_rate(sh):.0f}", f"{np.mean(sh['losses'][-3:]):.3f}",
                      f"{_rate(al):.0f}", f"{np.mean(al['losses'][-3:]):.3f}")
    table.add_row("all", "", "", f"{sum(_rate(shared[s.label]) for s in JOBS):.0f}", "",
                  f"{sum(_rate(alone[s.label]) for s in JOBS):.0f}", "")
    console.print(table)
    console.print("shared: one DALI pipeline decodes each image once for all three jobs; "
                  "alone: each job decodes every image itself. loss: mean of the last 3 steps.")
