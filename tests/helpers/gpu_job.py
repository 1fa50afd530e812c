"""A training job for the GPU tests and bench/gpu_check.py: records a checksum of every sample it got,
computed on the device the batch is on, asynchronously, as a training step would read it.

Spec (JSON in argv[1]): name, out, batch_size, device (None: where the ring is), passes,
``slow_ms`` (a GPU kernel that spins this long before the checksum kernels read the batch, queued
without waiting: the job runs ahead of its GPU), ``die`` = batches after which it SIGKILLs itself,
``expect_lost`` (the producer will be killed: record the error instead of failing), ``prefetch``
(take batch k+1 before queuing the step on batch k, as a one-ahead prefetcher does), ``copy``
(DaliShareIterator's), ``zero`` (write zeros into each batch after queuing its checksum, as an
in-place augmentation would), ``hold_s`` (keep the first batch, say so in OUT.holding, sleep this
long, then check it still holds the same pixels), ``close_first`` (close the iterator before waiting
for the queued checksums), ``expect_error`` (record a DalishareError at attach instead of failing).
"""

import json
import os
import signal
import sys

import torch

import time

from dalishare import DaliShareIterator, DalishareError, ProducerLost

_WEIGHTS: dict = {}


def checksum(images: torch.Tensor) -> torch.Tensor:
    """A position-sensitive int64 checksum per sample, on the images' device (no sync)."""
    flat = images.reshape(len(images), -1)
    key = (flat.shape[1], flat.device)
    if key not in _WEIGHTS:
        _WEIGHTS[key] = torch.arange(flat.shape[1], device=flat.device, dtype=torch.int64) % 251 + 1
    return (flat.to(torch.int64) * _WEIGHTS[key]).sum(dim=1)


def spin(ms: float) -> None:
    """Queue a kernel that keeps the current stream busy for about ``ms`` (the CPU goes on at once)."""
    global _CYCLES_PER_MS
    if _CYCLES_PER_MS is None:  # calibrate once
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        _CYCLES_PER_MS = 10_000_000 / start.elapsed_time(end)
    torch.cuda._sleep(int(ms * _CYCLES_PER_MS))


_CYCLES_PER_MS = None


def one_ahead(iterable):
    """Take batch k+1, then hand out batch k (apex's data_prefetcher, timm's PrefetchLoader)."""
    it = iter(iterable)
    upcoming = next(it, None)
    while upcoming is not None:
        current, upcoming = upcoming, next(it, None)
        yield current


def main() -> None:
    spec = json.loads(sys.argv[1])
    record = {"passes": [], "lost": None, "in_ring": 0, "copies": 0}
    sums, done, batch, images = [], 0, None, None
    try:
        loader = DaliShareIterator(spec["name"], batch_size=spec.get("batch_size"), device=spec.get("device"),
                                   copy=spec.get("copy"), attach_timeout=120)
    except DalishareError as exc:
        if not spec.get("expect_error"):
            raise
        with open(spec["out"], "w") as f:
            json.dump({"error": f"{type(exc).__name__}: {exc}"}, f)
        return
    open(spec["out"] + ".attached", "w").close()  # lets a test wait for the attach itself
    ring = loader._ring
    span = getattr(ring, "span", None)
    record["ring_device"] = str(loader.ring_device)
    try:
        for _ in range(spec.get("passes", 1)):
            indices = []
            for batch in (one_ahead(loader) if spec.get("prefetch") else loader):
                if spec.get("die") is not None and done == spec["die"]:
                    os.kill(os.getpid(), signal.SIGKILL)
                done += 1
                images = batch["images"]
                record["device"], record["dtype"], record["shape"] = str(images.device), str(images.dtype), list(images.shape[1:])
                if span is not None and images.is_cuda:
                    in_ring = span[0] <= images.data_ptr() < span[1]
                    record["in_ring"] += in_ring
                    record["copies"] += not in_ring
                if spec.get("slow_ms") and images.is_cuda:
                    spin(spec["slow_ms"])
                sums.append(checksum(images))
                if spec.get("zero"):
                    images.zero_()  # after the checksum on the same stream: this job's sums stay right
                if spec.get("hold_s") and done == 1:
                    held, held_sum = images, sums[-1]
                    open(spec["out"] + ".holding", "w").close()
                    time.sleep(spec["hold_s"])
                indices += batch["indices"].tolist()
            record["passes"].append({"epoch": loader.epoch, "indices": indices})
    except ProducerLost as exc:
        if not spec.get("expect_lost"):
            raise
        record["lost"] = str(exc)
    if spec.get("hold_s"):  # the producer was stopped meanwhile: it must not have freed what we hold
        record["held_intact"] = bool((checksum(held) == held_sum).all())
        del held
    if spec.get("close_first"):
        del batch, images
        loader.close()  # the checksums queued last still read the cache's rows
    flat = torch.cat(sums).tolist() if sums else []  # waits for the queued checksums
    record["checksums"] = flat
    record["handoff_ns"] = list(loader.handoff_ns)
    if not spec.get("close_first"):
        del batch, images
        loader.close()
    record["mapped_after_close"] = getattr(ring, "mapped", False)
    with open(spec["out"], "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
