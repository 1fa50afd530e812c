"""Benchmark: hand-off latency, and N jobs sharing one producer vs each running its own DALI.

    python bench/sharing.py [--device cpu|gpu] [--data DIR] [--jobs 4] [--step-ms 40] [--batches 40] [--slots N] [--out FILE]

Every job takes batches of 64x224x224x3 uint8 (the ResNet stage) and emulates a training step by
sleeping ``--step-ms`` per batch (no CPU), so the loader is what limits it. With ``--device gpu``
the producer and the jobs' own pipelines decode on the GPU, an own pipeline copies each batch into
a torch tensor (as DALI's PyTorch iterator does), and every job reads every pixel of each batch on
the GPU (a mean, waited for like a training step's ``loss.item()``). Phases, each with a
fresh producer: (1) hand-off latency, one job with no step, so it waits for each announcement; (2) the cost of
``next()`` in a job slower than the producer, so announcements are already queued; (3) one job alone
on a shared producer; (4) N jobs on one shared producer; (5) the same N jobs each running its own
DALI CPU pipeline. A bare ZeroMQ message's latency is printed for scale.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import torch

from dalishare.testing import jobs_on_producer, run_jobs

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "pipelines" / "resnet.py"
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera" / "train"
BATCH = 64


def shared_job(name: str, warmup: int, batches: int, step_s: float, copy: bool, q) -> None:
    """A job on the shared producer; records img/s, sent->tensor latency and next() time per batch,
    and where its batches were. ``copy`` is passed explicitly: the iterator's default depends on the
    ring (own copies on a GPU ring), and this benchmark says which it measures."""
    from dalishare import DaliShareIterator

    with DaliShareIterator(name, batch_size=BATCH, attach_timeout=120, copy=copy) as loader:
        done, images, t0, next_ns, it = 0, 0, None, [], iter(loader)
        while done < warmup + batches:
            start = time.perf_counter_ns()
            batch = next(it, None)
            if batch is None:  # end of an epoch: the next pass is the next epoch
                it = iter(loader)
                continue
            next_ns.append(time.perf_counter_ns() - start)
            assert batch["images"].shape[1:] == (224, 224, 3)
            read_every_pixel(batch["images"])
            time.sleep(step_s)
            done += 1
            images += len(batch["images"]) if t0 is not None else 0  # the last batch of an epoch is smaller
            if done == warmup:
                loader.handoff_ns.clear()
                next_ns.clear()
                t0 = time.monotonic()
        q.put({"img_s": images / (time.monotonic() - t0), "handoff_ns": list(loader.handoff_ns),
               "next_ns": next_ns, "device": str(batch["images"].device)})


def zmq_floor(samples: int = 200) -> list[int]:
    """One-way latency of a bare ZeroMQ ROUTER->DEALER message over ipc:// on this machine, same pattern."""
    import zmq

    endpoint = f"ipc://{tempfile.gettempdir()}/dalishare-bench-{os.getpid()}.sock"
    pid = os.fork()
    if pid == 0:
        with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
            sock.bind(endpoint)
            identity, _ = sock.recv_multipart()
            for _ in range(samples):
                time.sleep(0.02)
                sock.send_multipart([identity, str(time.monotonic_ns()).encode()])
            time.sleep(0.2)
        os._exit(0)
    lat = []
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.connect(endpoint)
        sock.send(b"hello")
        for _ in range(samples):
            if not sock.poll(5000):
                break
            lat.append(time.monotonic_ns() - int(sock.recv()))
    os.waitpid(pid, 0)
    return lat


def pct(values: list[int], q: float) -> float:
    """The ``q`` quantile of nanosecond ``values``, in microseconds (NaN for none)."""
    if not values:
        return float("nan")
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] / 1e3


def latency(values: list[int], what: str = "batches") -> str:
    """The median and p90 of nanosecond ``values`` as text, "median .. us, p90 .. us (N batches)";
    says so when there are none (a job on a cache, say, gets no hand-offs)."""
    if not values:
        return f"no hand-offs recorded (0 {what})"
    return f"median {pct(values, 0.5):.1f} us, p90 {pct(values, 0.9):.1f} us ({len(values)} {what})"


def read_every_pixel(images: torch.Tensor) -> None:
    if images.is_cuda:
        images.float().mean().item()


def as_torch(batch) -> torch.Tensor:
    """A `StageBatch` as a torch tensor the job owns: a view of DALI's CPU output, or a copy of its GPU one."""
    if not batch.on_gpu:
        return torch.from_numpy(batch.numpy())
    from nvidia.dali.plugin.pytorch import feed_ndarray

    out = torch.empty((batch.count, *batch.sample_shape), dtype=torch.uint8, device="cuda")
    return feed_ndarray(batch.data.as_tensor(), out, cuda_stream=torch.cuda.current_stream())


def endless_batches(stage, files: list, device: str):
    """``stage`` over ``files`` in order, epoch after epoch, from one DALI pipeline built once (before
    the first batch), as a job loading on its own builds its loader once, not per epoch. Each
    `StageBatch` is valid until the next; each epoch's last batch is smaller."""
    from dalishare.producer.stage import StageBatch, build_pipeline, read_encoded

    starts = itertools.cycle(range(0, len(files), BATCH))

    def source():
        start = next(starts)
        return read_encoded(files[start : start + BATCH])

    pipe = build_pipeline(stage, source, batch_size=BATCH, device=device)
    while True:
        (out,) = pipe.run()
        yield StageBatch.of(out)


def own_pipeline_job(data: str, device: str, warmup: int, batches: int, step_s: float, q) -> None:
    """A job running its own DALI pipeline: built once, before the warm-up batches, so the timed
    ones measure loading, not building."""
    from dalishare.producer.dataset import scan
    from dalishare.producer.stage import load_stage

    ds, stage = scan(data), load_stage(STAGE)
    images, t0 = 0, None
    for done, batch in enumerate(endless_batches(stage, ds.files, device), start=1):
        read_every_pixel(as_torch(batch))
        time.sleep(step_s)
        images += batch.count if t0 is not None else 0  # the last batch of an epoch is smaller
        if done == warmup:
            t0 = time.monotonic()
        if done == warmup + batches:
            break
    q.put({"img_s": images / (time.monotonic() - t0), "handoff_ns": []})


SERVE_OPTIONS: list[str] = []  # extra `dalishare serve` options from the command line (--slots, --cache)


def with_producer(data: str, consumers: int, target, args: tuple, device: str = "cpu",
                  options: tuple = ()) -> list[dict]:
    """``consumers`` jobs ``target(name, *args, queue)`` on a fresh producer serving ``data`` on
    ``device`` with SERVE_OPTIONS and ``options``; their results."""
    options = ("--batch-size", str(BATCH), "--device", device, *SERVE_OPTIONS, *options)
    return jobs_on_producer(data, options, target, args, consumers, pipeline=STAGE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(HYMENOPTERA) if HYMENOPTERA.is_dir() else None,
                        help="image folder (default: ../shared/data/hymenoptera/train, else generated)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="where the stages decode")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--step-ms", type=float, default=40.0, help="emulated GPU step per batch")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per job (after 5 warm-up)")
    parser.add_argument("--slots", type=int, help="the producer's ring size (default: dalishare serve's)")
    parser.add_argument("--cache", default="off", help="the producer's --cache (default: off, the ring this "
                                                        "benchmark is about; bench/hetero.py measures the cache)")
    parser.add_argument("--out", help="also write the figures to this file")
    args = parser.parse_args()
    tmp = None
    if args.data is None:
        from dalishare.testing import PATTERNS, make_image_folder

        tmp = tempfile.TemporaryDirectory(prefix="dalishare-bench-")
        args.data = str(make_image_folder(Path(tmp.name), {p: 128 for p in PATTERNS}))
    warmup, step = 5, args.step_ms / 1000

    if args.slots:
        SERVE_OPTIONS.extend(["--slots", str(args.slots)])
    SERVE_OPTIONS.extend(["--cache", args.cache])
    floor, dev = zmq_floor(), args.device
    paced = (warmup, args.batches, step, False)  # copy=False: the jobs read views of the ring
    handoff = with_producer(args.data, 1, shared_job, (warmup, args.batches, 0.0, False), dev)[0]["handoff_ns"]
    slow_job = with_producer(args.data, 1, shared_job, (warmup, 15, 0.25, False), dev)[0]  # slower than the producer
    lone = with_producer(args.data, 1, shared_job, paced, dev)[0]["img_s"]
    shared = [r["img_s"] for r in with_producer(args.data, args.jobs, shared_job, paced, dev)]
    own = [r["img_s"] for r in run_jobs(own_pipeline_job, (args.data, dev, warmup, args.batches, step), args.jobs)]

    lines = [
        f"dalishare {dev.upper()} sharing benchmark: {os.cpu_count()} cores, batches of {BATCH}x224x224x3 uint8, "
        f"data {args.data}, emulated step {args.step_ms:.0f} ms, {args.batches} timed batches per job, "
        f"ring slots: {args.slots or 'serve default'}, cache: {args.cache}",
        f"hand-off, job waiting (announcement sent -> tensor in job): {latency(handoff)}",
        f"hand-off, batch already announced (job with a 250 ms step; next() -> tensor, release included): "
        f"{latency(slow_job['next_ns'])}",
        f"bare ZeroMQ ipc one-way latency on this machine, for scale: median {pct(floor, 0.5):.1f} us, "
        f"p90 {pct(floor, 0.9):.1f} us",
        f"{'setup':<34}{'per-job img/s':>40}{'total img/s':>14}",
        f"{'1 job, shared producer':<34}{lone:>40.0f}{lone:>14.0f}",
        f"{f'{args.jobs} jobs, one shared producer':<34}{' '.join(f'{r:.0f}' for r in shared):>40}{sum(shared):>14.0f}",
        f"{f'{args.jobs} jobs, own DALI pipeline each':<34}{' '.join(f'{r:.0f}' for r in own):>40}{sum(own):>14.0f}",
        f"shared: slowest job gets {min(shared) / lone:.0%} of a lone job; "
        f"{args.jobs} jobs together {sum(shared) / sum(own):.2f}x the img/s of {args.jobs} own pipelines",
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
