"""Benchmark, side by side: four jobs on one image folder with the same per-sample work (decode, resize
the shorter side to 256, centre crop 224, uint8 HWC), each job emulating a GPU step, loading with

  (a) its own PyTorch DataLoader (PIL decode in ``--workers`` worker processes per job);
  (b) TensorSocket from PyPI: one producer process wrapping one such DataLoader, the jobs as consumers;
  (c) dalishare: ``dalishare serve pipelines/resnet.py`` (DALI on the CPU), with ``--cache memory``
      and with ``--cache off`` (the streaming ring).

    python bench/peers.py [--data DIR] [--copies 3] [--limit N] [--jobs 4] [--step-ms 20] [--workers 2]
                          [--worker-start fork] [--ts-producer-batches 2] [--variants ...] [--timeout S]
                          [--out STEM]

Install the extras first: ``pip install -e '.[bench]'`` (tensorsocket, matplotlib, psutil).

The dataset is the hymenoptera photos (../shared/data/hymenoptera, train and val, .jpg and .jpeg
only) copied ``--copies`` times into one class-folder tree (1,191 photos for 3), else ``--data DIR``,
else 1,023 generated JPEGs. ``--limit N`` keeps N of them (for smoke runs). Every job reads one
epoch in batches of 64 and sleeps ``--step-ms`` per batch as a GPU step would.

Printed per variant: each job's images/s and the total (images of all jobs over the time from the
common start to the last job's end), CPU seconds per 1,000 images read, counting every process the
variant started (producer, stage worker, jobs, DataLoader workers) from the common start to the end
(after each process imported its libraries) and, beside it, with the start-up included; the peak
of the summed PSS of those processes (sampled every 0.5 s); and whether each job got every sample
exactly once, with its right label, in its first epoch. The text goes to STEM.txt and a bar chart to
STEM.png (default: bench/results/cpu-peers-<cores>core). Nothing is asserted.

How the processes are counted: all of them are descendants of this one, which makes itself their
"child subreaper", so an orphaned grandchild is reparented to it and reaped here too. The CPU
of everything reaped is in getrusage(RUSAGE_CHILDREN); the CPU spent before the common start is read
from /proc (psutil) at that moment and subtracted.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import io
import logging
import os
import resource
import socket
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import psutil

from dalishare.producer.dataset import scan
from dalishare.testing import ProducerProcess, run_each
from hetero import HYMENOPTERA, build_dataset  # the same photos as the other benchmarks

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "pipelines" / "resnet.py"
RESULTS = ROOT / "bench" / "results"
BATCH = 64
RESIZE, CROP = 256, 224
PSS_INTERVAL_S = 0.5
START_TIMEOUT_S = 300  # imports of torch in every process, on 2 busy cores
VARIANTS = ("dataloader", "tensorsocket", "dalishare-memory", "dalishare-off")


# ---------------------------------------------------------------- the dataset and the per-sample work


def limit_dataset(data: Path, limit: int, root: Path) -> Path:
    """A folder of symbolic links to ``limit`` of ``data``'s images, spread over all of them (so every
    class keeps some)."""
    dataset = scan(data)
    step = max(1, len(dataset.files) // limit)
    subset = root / "subset"
    for path in dataset.files[::step][:limit]:
        link = subset / path.relative_to(data)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
    return subset


class ResizeCropFolder:
    """Map-style dataset for a DataLoader: sample i is the file dalishare calls sample i, decoded with
    PIL, its shorter side resized to 256, centre-cropped to 224; (uint8 HWC tensor, label, index)."""

    def __init__(self, data: str):
        dataset = scan(data)
        self.files, self.labels = [str(p) for p in dataset.files], dataset.labels.tolist()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import numpy as np
        import torch
        from PIL import Image

        with Image.open(self.files[i]) as img:
            img = img.convert("RGB")
        w, h = img.size
        scale = RESIZE / min(w, h)
        img = img.resize((max(RESIZE, round(w * scale)), max(RESIZE, round(h * scale))), Image.BILINEAR)
        left, top = (img.width - CROP) // 2, (img.height - CROP) // 2
        img = img.crop((left, top, left + CROP, top + CROP))
        return torch.from_numpy(np.array(img)), self.labels[i], i


def make_loader(data: str, workers: int, worker_start: str, seed: int):
    """The DataLoader of (a) and (b). Its workers start as ``worker_start`` says: by default "fork",
    what a training script run from a shell gets on Linux before Python 3.14. (These jobs are spawned
    by the bench, so left alone their workers would be spawned too, each importing torch again.)"""
    from torch import Generator
    from torch.utils.data import DataLoader

    return DataLoader(ResizeCropFolder(data), batch_size=BATCH, shuffle=True, num_workers=workers,
                      multiprocessing_context=worker_start if workers else None,
                      generator=Generator().manual_seed(seed))


# ---------------------------------------------------------------- the processes of each variant
# Each runs as a spawned child: it imports what it needs, waits at the common start (a barrier the
# bench also waits at, to read the CPU spent so far), then works; a hung one dumps its stacks and exits.


def start_child(timeout_s: float) -> None:
    faulthandler.dump_traceback_later(timeout_s, exit=True)


def read_epoch(batches, step_s: float) -> dict:
    """Indices, labels and image shapes of one pass over ``batches`` of (images, labels, indices),
    sleeping ``step_s`` per batch."""
    indices, labels, shapes = [], [], set()
    for images, batch_labels, batch_indices in batches:
        shapes.add(f"{tuple(images.shape[1:])} {images.dtype}")
        indices += batch_indices.tolist()
        labels += batch_labels.tolist()
        time.sleep(step_s)
    return {"indices": indices, "labels": labels, "shapes": shapes}


def report(q, role: str, start: float, epoch: dict | None = None) -> None:
    epoch = epoch or {"indices": [], "labels": [], "shapes": set()}
    q.put({"role": role, "start": start, "end": time.monotonic(), **epoch})


def dataloader_job(data: str, workers: int, worker_start: str, seed: int, step_s: float, barrier, timeout_s: float,
                   q) -> None:
    """(a) A job with its own DataLoader; its workers start with the epoch (not persistent)."""
    start_child(timeout_s)
    loader = make_loader(data, workers, worker_start, seed)
    barrier.wait(START_TIMEOUT_S)
    start = time.monotonic()
    report(q, "job", start, read_epoch(loader, step_s))


class LazyEpochs:
    """The DataLoader as TensorProducer sees it. TensorProducer calls iter() in its constructor and
    again as soon as an epoch ends, and a DataLoader's iter() starts its workers, which prefetch.
    Here iter() is lazy: the workers start at `prime` (called at the common start, so nothing is
    decoded before it, yet they decode while the consumers register) or with the first batch asked
    for; the next epoch's, which this one-epoch benchmark never reads, is never decoded."""

    def __init__(self, loader):
        self.loader, self._primed = loader, None

    def __len__(self) -> int:
        return len(self.loader)

    def prime(self) -> None:
        self._primed = iter(self.loader)

    def __iter__(self):
        it, self._primed = self._primed or iter(self.loader), None
        try:
            yield from it
        finally:
            del it  # TensorProducer leaves the epoch's last iterator unfinished: shut its workers down now


def quiet_tensorsocket() -> None:
    """tensorsocket's consumer module sets the root logger to DEBUG; its payload warns per batch."""
    logging.getLogger().setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")


def tensorsocket_producer(data: str, workers: int, worker_start: str, ports: list[int], consumers: int,
                          producer_batches: int, barrier, timeout_s: float, q) -> None:
    """(b) TensorSocket's producer around one DataLoader: waits until every consumer's heartbeat is
    registered (else the first ones would start the epoch alone), serves one epoch, stops."""
    start_child(timeout_s)
    import tensorsocket.producer
    from tensorsocket import TensorProducer

    quiet_tensorsocket()
    tensorsocket.producer.LOCALHOST = "tcp://127.0.0.1"  # it binds its 4 ports on every interface otherwise
    epochs = LazyEpochs(make_loader(data, workers, worker_start, seed=0))
    producer = TensorProducer(epochs, port=ports[0], ack_port=ports[1], heart_ports=(ports[2], ports[3]),
                              producer_batch_size=producer_batches)
    barrier.wait(START_TIMEOUT_S)
    start = time.monotonic()
    epochs.prime()
    deadline = start + START_TIMEOUT_S
    while len(producer.hb.consumers) < consumers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(producer.hb.consumers)} of {consumers} TensorSocket consumers came")
        time.sleep(0.05)
    for _ in producer:  # one epoch: get_sample() loads, broadcasts and waits for acks; StopIteration ends it
        pass
    producer.join()
    report(q, "producer", start)


def tensorsocket_job(ports: list[int], step_s: float, barrier, timeout_s: float, q) -> None:
    """(b) A TensorSocket consumer: batches are the DataLoader's (images, labels, indices)."""
    start_child(timeout_s)
    from tensorsocket import TensorConsumer

    quiet_tensorsocket()
    barrier.wait(START_TIMEOUT_S)
    start = time.monotonic()
    consumer = TensorConsumer(port=ports[0], ack_port=ports[1], heart_ports=(ports[2], ports[3]), batch_size=BATCH)
    report(q, "job", start, read_epoch(consumer, step_s))  # the pass ends on the producer's stop_iteration


def dalishare_job(name: str, step_s: float, barrier, timeout_s: float, q) -> None:
    """(c) A job attached to the dalishare producer."""
    start_child(timeout_s)
    from dalishare import DaliShareIterator

    barrier.wait(START_TIMEOUT_S)
    start = time.monotonic()
    with DaliShareIterator(name, batch_size=BATCH, attach_timeout=START_TIMEOUT_S, batch_timeout=300) as loader:
        batches = ((b["images"], b["labels"], b["indices"]) for b in loader)
        epoch = read_epoch(batches, step_s)
    report(q, "job", start, epoch)


ROLES = {"dataloader": dataloader_job, "ts-producer": tensorsocket_producer, "ts-job": tensorsocket_job,
         "dalishare": dalishare_job}


def run_role(role: str, *args) -> None:
    """One target for testing.run_each, which starts a list of (target args) processes."""
    ROLES[role](*args)


# ---------------------------------------------------------------- measuring


def become_subreaper() -> None:
    """Orphaned descendants (a DataLoader worker whose job died, a stage worker whose producer died)
    get reparented to this process instead of init, so they are reaped, killed if left, and counted."""
    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_CHILD_SUBREAPER) failed ({os.strerror(ctypes.get_errno())}): the CPU of a process "
              f"orphaned by a crash would not be counted")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_so_far(proc: psutil.Process) -> float:
    """CPU of a live process and of its children it has reaped (those it has not are still listed)."""
    try:
        t = proc.cpu_times()
        return t.user + t.system + t.children_user + t.children_system
    except psutil.Error:
        return 0.0


def pss(proc: psutil.Process) -> int:
    try:
        return proc.memory_full_info().pss
    except psutil.Error:
        return 0


@dataclass
class Meter:
    """CPU and peak summed PSS of every process started while it is open (this process's
    descendants, less those it had before)."""

    peak_pss: int = 0
    cpu_before_start: float = 0.0
    cpu_all: float = 0.0
    leftovers: int = 0
    _known: set = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "Meter":
        self._known = {p.pid for p in psutil.Process().children(recursive=True)}
        self._cpu0 = children_cpu()
        self._sampler = threading.Thread(target=self._sample_pss, daemon=True)
        self._sampler.start()
        return self

    def new_processes(self) -> list[psutil.Process]:
        return [p for p in psutil.Process().children(recursive=True) if p.pid not in self._known]

    def mark_start(self) -> None:
        """Called at the common start: what was spent until now is start-up."""
        self.cpu_before_start = children_cpu() - self._cpu0 + sum(cpu_so_far(p) for p in self.new_processes())

    def _sample_pss(self) -> None:
        while not self._stop.wait(PSS_INTERVAL_S):
            self.peak_pss = max(self.peak_pss, sum(pss(p) for p in self.new_processes()))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sampler.join(timeout=10)
        left = self.new_processes()
        for p in left:  # nothing should be left: kill and reap what is (and say so)
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)
        self.leftovers = len(left)
        self.cpu_all = children_cpu() - self._cpu0

    @property
    def cpu_work(self) -> float:
        return self.cpu_all - self.cpu_before_start


def mark_at_barrier(barrier, meter: Meter) -> threading.Thread:
    """Wait at the common start with the children (in a thread: run_each holds the main one)."""

    def wait() -> None:
        try:
            barrier.wait(START_TIMEOUT_S)
            meter.mark_start()
        except threading.BrokenBarrierError:
            pass  # a child failed to start; run_each reports it

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports free on the loopback now (TensorSocket needs 4)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Outcome:
    label: str
    job_img_s: list[float]
    total_img_s: float
    images: int
    cpu_work: float
    cpu_all: float
    peak_pss: int
    exact: list[str]  # per job: "yes" or what was wrong
    leftovers: int

    @property
    def cpu_per_1000(self) -> float:
        return 1000 * self.cpu_work / self.images if self.images else float("nan")

    @property
    def cpu_all_per_1000(self) -> float:
        return 1000 * self.cpu_all / self.images if self.images else float("nan")


SHAPE = f"{(CROP, CROP, 3)} torch.uint8"


def check_epoch(epoch: dict, expected_labels: list[int]) -> str:
    """'yes' when the epoch held every sample once, with its label, as a 224x224x3 uint8 image; else
    what went wrong."""
    indices, n = epoch["indices"], len(expected_labels)
    seen = set(indices)
    wrong_labels = sum(expected_labels[i] != y for i, y in zip(indices, epoch["labels"]) if 0 <= i < n)
    wrong_shapes = epoch["shapes"] - {SHAPE}
    if sorted(indices) == list(range(n)) and not wrong_labels and not wrong_shapes:
        return "yes"
    faults = [f"{n - len(seen & set(range(n)))} missing", f"{len(indices) - len(seen)} twice",
              f"{wrong_labels} wrong labels", *(f"images {s}" for s in sorted(wrong_shapes))]
    return f"no: {len(seen)} of {n} ({', '.join(f for f in faults if not f.startswith('0 '))})"


def exactly_once_cell(checks: list[str]) -> str:
    if len(set(checks)) == 1:
        return f"{checks[0]}, every job" if checks[0] != "yes" else "yes, every job"
    return "; ".join(f"job {k}: {c}" for k, c in enumerate(checks))


def run_variant(label: str, each_args: list[tuple], expected_labels: list[int], timeout_s: float,
                barrier, start_producer=None) -> Outcome:
    """Start the variant's processes (first ``start_producer()``'s ProducerProcess, if any), measure,
    check."""
    producer = None
    with Meter() as meter:
        try:
            producer = start_producer() if start_producer else None
            marker = mark_at_barrier(barrier, meter)
            results = run_each(run_role, each_args, timeout=timeout_s)
            marker.join(timeout=10)
            if producer is not None:  # --epochs 1: it ends by itself once every job read its epoch
                producer.wait(60)
        finally:
            barrier.abort()  # frees the marker thread if a child never came
            if producer is not None:
                producer.stop()
    jobs = [r for r in results if r["role"] == "job"]
    start, end = min(r["start"] for r in results), max(r["end"] for r in jobs)
    images = sum(len(r["indices"]) for r in jobs)
    return Outcome(label, [len(r["indices"]) / (r["end"] - r["start"]) for r in jobs], images / (end - start),
                   images, meter.cpu_work, meter.cpu_all, meter.peak_pss,
                   [check_epoch(r, expected_labels) for r in jobs], meter.leftovers)


def measure_dataloader(data: str, args, expected: list[int], ctx) -> Outcome:
    barrier = ctx.Barrier(args.jobs + 1)
    each = [("dataloader", data, args.workers, args.worker_start, seed, args.step_ms / 1000, barrier, args.timeout)
            for seed in range(args.jobs)]
    return run_variant(f"DataLoader per job ({args.workers} workers each)", each, expected, args.timeout, barrier)


def measure_tensorsocket(data: str, args, expected: list[int], ctx) -> Outcome:
    barrier, ports = ctx.Barrier(args.jobs + 2), free_ports(4)
    producer = ("ts-producer", data, args.workers, args.worker_start, ports, args.jobs, args.ts_producer_batches,
                barrier, args.timeout)
    jobs = [("ts-job", ports, args.step_ms / 1000, barrier, args.timeout)] * args.jobs
    label = f"TensorSocket {version('tensorsocket')} (1 DataLoader, {args.workers} workers)"
    return run_variant(label, [producer, *jobs], expected, args.timeout, barrier)


def measure_dalishare(data: str, args, expected: list[int], ctx, cache: str) -> Outcome:
    barrier, name = ctx.Barrier(args.jobs + 1), f"peers-{os.getpid()}"
    each = [("dalishare", name, args.step_ms / 1000, barrier, args.timeout)] * args.jobs

    def start_producer() -> ProducerProcess:  # its start-up, like the jobs' imports, is before the common start
        return ProducerProcess(data, "--batch-size", str(BATCH), "--cache", cache, "--min-consumers", str(args.jobs),
                               "--epochs", "1", name=name, pipeline=STAGE)

    return run_variant(f"dalishare --cache {cache}", each, expected, args.timeout, barrier, start_producer)


# ---------------------------------------------------------------- output


def table_text(outcomes: list[Outcome], header: list[str], width: int = 1000) -> str:
    """The figures as a rich table, rendered to plain text (the same on the screen and in the file);
    wide enough that no cell wraps."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for title, justify in (("variant", "left"), ("per-job img/s", "right"), ("total img/s", "right"),
                           ("CPU s / 1k img", "right"), ("(with start-up)", "right"), ("peak PSS", "right"),
                           ("every sample once in epoch 1", "left")):
        table.add_column(title, justify=justify)
    for o in outcomes:
        table.add_row(o.label, " ".join(f"{v:.0f}" for v in o.job_img_s), f"{o.total_img_s:.0f}",
                      f"{o.cpu_per_1000:.2f}", f"{o.cpu_all_per_1000:.2f}", f"{o.peak_pss / 2**30:.2f} GiB",
                      exactly_once_cell(o.exact))
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, soft_wrap=False).print(table)
    rows = [line.rstrip() for line in out.getvalue().splitlines()]
    return "\n".join(header + rows) + "\n"


def comparison_lines(outcomes: list[Outcome]) -> list[str]:
    """dalishare (with its cache) against TensorSocket: the issue's targets, as figures."""
    ts = next((o for o in outcomes if o.label.startswith("TensorSocket")), None)
    ds = next((o for o in outcomes if "cache memory" in o.label), None)
    if ts is None or ds is None:
        return []
    return [f"dalishare --cache memory vs TensorSocket: {ds.total_img_s / ts.total_img_s:.2f}x the total img/s "
            f"(target >= 2x), {ds.cpu_per_1000 / ts.cpu_per_1000:.2f}x the CPU s per 1,000 images "
            f"(target <= 0.5x; with start-up {ds.cpu_all_per_1000 / ts.cpu_all_per_1000:.2f}x)"]


def save_chart(outcomes: list[Outcome], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [o.label.replace(" (", "\n(") for o in outcomes]
    panels = (("total images/s (higher is better)", [o.total_img_s for o in outcomes], "{:.0f}"),
              ("CPU s per 1,000 images (lower is better)", [o.cpu_per_1000 for o in outcomes], "{:.2f}"),
              ("peak PSS, GiB (lower is better)", [o.peak_pss / 2**30 for o in outcomes], "{:.2f}"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    colours = ["#8c8c8c", "#d9822b", "#2b7bd9", "#7fb0ea"][: len(outcomes)]
    for ax, (name, values, fmt) in zip(axes, panels):
        bars = ax.barh(range(len(values)), values, color=colours)
        ax.set_yticks(range(len(values)), labels if ax is axes[0] else [""] * len(values), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=10)
        ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=8, padding=2)
        ax.margins(x=0.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="image folder (default: hymenoptera's JPEGs copied --copies times)")
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--limit", type=int, help="use only this many images, for smoke runs (TensorSocket needs more "
                        "than --ts-producer-batches batches: with fewer its consumers get none and wait forever)")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--step-ms", type=float, default=20.0, help="emulated GPU step per batch of 64")
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers, in each job (a) and in TensorSocket's producer (b)")
    parser.add_argument("--worker-start", choices=("fork", "spawn", "forkserver"), default="fork",
                        help="how DataLoader workers start (default: fork, Linux's default before Python 3.14)")
    parser.add_argument("--ts-producer-batches", type=int, default=2,
                        help="TensorSocket's producer_batch_size (its default is 8; 1 fails in its collate)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--timeout", type=float, default=1200, help="seconds a variant may take before it is killed")
    parser.add_argument("--out", default=str(RESULTS / f"cpu-peers-{os.cpu_count()}core"),
                        help="write STEM.txt and STEM.png (default: %(default)s)")
    args = parser.parse_args()

    import multiprocessing as mp
    from multiprocessing import resource_tracker

    become_subreaper()
    resource_tracker.ensure_running()  # started now, so no variant counts it as its own
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="dalishare-peers-") as tmp:
        if args.data:
            data, source = Path(args.data), args.data
        else:
            data = build_dataset(Path(tmp), args.copies)
            source = f"hymenoptera train+val JPEGs x{args.copies}" if HYMENOPTERA.is_dir() else "generated JPEGs"
        if args.limit:
            data = limit_dataset(data, args.limit, Path(tmp))
        expected = scan(data).labels.tolist()
        header = [f"dalishare side-by-side benchmark: {os.cpu_count()} cores, {len(expected)} images in "
                  f"{source}{f' (--limit {args.limit})' if args.limit else ''}, "
                  f"{args.jobs} jobs reading 1 epoch each in batches of {BATCH}, {args.step_ms:g} ms emulated GPU "
                  f"step per batch; per sample: decode, resize shorter side to {RESIZE}, centre crop {CROP}, "
                  f"uint8 HWC; DataLoader workers start by {args.worker_start}; TensorSocket producer_batch_size "
                  f"{args.ts_producer_batches}"]
        print(header[0], flush=True)
        measures = {"dataloader": lambda: measure_dataloader(str(data), args, expected, ctx),
                    "tensorsocket": lambda: measure_tensorsocket(str(data), args, expected, ctx),
                    "dalishare-memory": lambda: measure_dalishare(str(data), args, expected, ctx, "memory"),
                    "dalishare-off": lambda: measure_dalishare(str(data), args, expected, ctx, "off")}
        outcomes, notes = [], []
        for variant in args.variants:
            print(f"running {variant} ...", flush=True)
            try:
                outcomes.append(measures[variant]())
            except Exception as error:  # one variant failing (its processes killed) leaves the others' figures
                notes.append(f"{variant} failed: {error} (its processes' stacks, if one hung, are above)")
                print(notes[-1], flush=True)
                continue
            if outcomes[-1].leftovers:
                notes.append(f"{variant}: {outcomes[-1].leftovers} processes were left over and killed")
    text = table_text(outcomes, header) + "".join(f"{line}\n" for line in comparison_lines(outcomes) + notes)
    print("\n" + text, end="")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(text)
    if not outcomes:
        return
    save_chart(outcomes, out.with_suffix(".png"),
               f"{args.jobs} jobs, 1 epoch of {len(expected)} images each, {args.step_ms:g} ms step per batch "
               f"of {BATCH}, {os.cpu_count()} cores")
    print(f"wrote {out.with_suffix('.txt')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
