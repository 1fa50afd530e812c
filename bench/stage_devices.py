"""Run one stage file on the CPU and on a GPU (DALI's mixed decoder) and compare pixels and speed.

    python bench/stage_devices.py --data DIR [--stage pipelines/resnet.py] [--batch 64] [--out FILE]

Checks that the same stage definition runs on both devices (what `dalishare serve --device` relies
on), how close the decoders' pixels are (libjpeg-turbo on the CPU, nvJPEG on the GPU: close, not
identical), and the images/s of each. Needs a GPU; says so in one line without one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_stage(stage, files: list[str], batch: int, device_id: int | None, repeats: int) -> tuple[np.ndarray, float]:
    """All samples in file order, and images/s over ``repeats`` passes after one warm-up pass."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=batch, num_threads=os.cpu_count(), device_id=device_id, prefetch_queue_depth=2)
    def pipe():
        jpegs, _ = fn.readers.file(files=files, random_shuffle=False, pad_last_batch=True, name="reader")
        return stage(jpegs, "cpu" if device_id is None else "mixed")

    p = pipe()
    p.build()
    steps = -(-len(files) // batch)

    def one_pass():
        out = []
        for _ in range(steps):
            (images,) = p.run()
            if device_id is not None:
                images = images.as_cpu()
            out.append(np.asarray(images.as_tensor()))
        return np.concatenate(out)[: len(files)]

    first = one_pass()
    start = time.perf_counter()
    for _ in range(repeats):
        one_pass()
    return first, repeats * len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--stage", default=str(ROOT / "pipelines" / "resnet.py"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()

    from nvidia.dali.backend import GetCUDADeviceCount

    from dalishare.producer.dataset import scan
    from dalishare.producer.stage import load_stage

    if GetCUDADeviceCount() == 0:
        sys.exit("stage_devices: no CUDA GPU here; run it on a GPU machine")
    stage, files = load_stage(args.stage), [str(f) for f in scan(args.data).files]
    cpu, cpu_rate = run_stage(stage, files, args.batch, None, args.repeats)
    gpu, gpu_rate = run_stage(stage, files, args.batch, args.gpu, args.repeats)
    diff = np.abs(cpu.astype(np.int16) - gpu.astype(np.int16))
    lines = [
        f"stage {args.stage} over {len(files)} files of {args.data}, batches of {args.batch}",
        f"shapes: cpu {list(cpu.shape)} {cpu.dtype}, gpu {list(gpu.shape)} {gpu.dtype}",
        f"pixels cpu vs gpu: mean |diff| {diff.mean():.3f}, max {int(diff.max())}, "
        f"{(diff > 8).mean():.4%} of values differ by more than 8",
        f"images/s: cpu ({os.cpu_count()} threads) {cpu_rate:.0f}, gpu {args.gpu} (mixed decoder) {gpu_rate:.0f}",
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if cpu.shape != gpu.shape:
        sys.exit("stage_devices: the stage gave different shapes on the two devices")


if __name__ == "__main__":
    main()
