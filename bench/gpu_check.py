"""GPU check: one command that checks and times the GPU path on a GPU machine (under 5 minutes on one H100).

    python bench/gpu_check.py [--data DIR] [--batches 60] [--out bench/results/gpu-check.txt]

1. Runs tests/gpu/test_gpu.py and times each test: zero copy (a job's tensors lie inside the opened IPC
   mapping), pixels equal to the stage run directly in DALI on the GPU, exactly-once for three jobs
   with batch sizes 4/5/11, a consumer whose kernels are slow on purpose (views and spanning copies)
   never seeing a torn or overwritten batch, a killed job reclaimed and a killed producer turned into
   ProducerLost, IPC mappings closed on close(), a CPU job of a GPU producer and a GPU job of a CPU
   producer (and a job on a second GPU, where there is one).
   Also the CUDA test of dalishare.augment (tests/e2e/test_augment.py).
2. In one run: images/s of one shared GPU pipeline feeding three jobs versus three jobs each running
   its own DALI GPU pipeline (bench/sharing.py's jobs: no emulated step, every pixel read on the GPU),
   and the hand-off latency (announcement sent -> tensor in a waiting job).
3. bench/augment.py on the GPU: a training recipe per 256x224x224 batch with dalishare.augment, and
   with torchvision transforms.v2 sample by sample where torchvision is installed.

Prints a table and writes it to ``--out``. Exits 1 if a check failed, 2 if there is no GPU.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dalishare.testing import run_jobs

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
import sharing  # bench/sharing.py (this script's folder is on sys.path): the jobs and producer runner

JOBS = 3


def versions() -> str:
    import cupy
    import nvidia.dali
    import torch

    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().replace("\n", "; ")
    except (OSError, subprocess.TimeoutExpired):
        smi = torch.cuda.get_device_name(0) + ", driver unknown"
    return (f"{smi} | Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"CuPy {cupy.__version__}, DALI {nvidia.dali.__version__}")


GPU_TESTS = {  # label -> pytest arguments
    "tests marked gpu": [str(ROOT / "tests"), "-m", "gpu"],  # tests/gpu/test_gpu.py, tests/e2e/test_augment.py
    "stage worker tests on the GPU": [str(ROOT / "tests" / "e2e" / "test_worker.py"), "--device", "gpu"],
}


def run_gpu_tests(label: str, timeout: float = 300) -> list[tuple[str, str, float, str]]:
    """(test, outcome, seconds, message) for each test of ``GPU_TESTS[label]``."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", *GPU_TESTS[label],
                                   "-q", "-p", "no:cacheprovider", f"--junitxml={report}"],
                                  cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [(label, "TIMEOUT", timeout, f"did not finish within {timeout:.0f} s")]
        if not report.exists():
            return [(label, "ERROR", 0.0, (proc.stdout + proc.stderr)[-300:])]
        rows = []
        for case in ET.parse(report).iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                found = case.find(tag)
                if found is not None:
                    outcome, message = tag, (found.get("message") or "").splitlines()[0][:120] if found.get("message") else ""
            rows.append((case.get("name"), outcome, float(case.get("time", 0)), message))
        return rows


def augment_costs(timeout: float = 120) -> list[str]:
    """bench/augment.py on the GPU: dalishare.augment (and torchvision per sample, where installed)."""
    try:
        proc = subprocess.run([sys.executable, str(BENCH / "augment.py"), "--device", "cuda", "--reps", "5"],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [f"bench/augment.py did not finish within {timeout:.0f} s"]
    lines = proc.stdout.strip().splitlines()[1:] if proc.returncode == 0 else [(proc.stdout + proc.stderr)[-300:]]
    return [" ".join(line.split()) for line in lines]


def throughput(data: str, batches: int) -> dict:
    warmup = 5
    handoff = sharing.with_producer(data, 1, sharing.shared_job, (warmup, batches, 0.0), "gpu")[0]["handoff_ns"]
    shared = [r["img_s"] for r in sharing.with_producer(data, JOBS, sharing.shared_job, (warmup, batches, 0.0), "gpu")]
    own = [r["img_s"] for r in run_jobs(sharing.own_pipeline_job, (data, "gpu", warmup, batches, 0.0), JOBS)]
    return {"handoff": handoff, "shared": shared, "own": own}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(sharing.HYMENOPTERA) if sharing.HYMENOPTERA.is_dir() else None,
                        help="image folder (default: ../shared/data/hymenoptera/train, else generated)")
    parser.add_argument("--batches", type=int, default=60, help="timed batches of 64 per job (after 5 warm-up)")
    parser.add_argument("--out", default=str(BENCH / "results" / "gpu-check.txt"), help="where to write the table")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible here; run it on a GPU machine", file=sys.stderr)
        return 2
    tmp = None
    if args.data is None:
        from dalishare.testing import PATTERNS, make_image_folder

        tmp = tempfile.TemporaryDirectory(prefix="dalishare-gpu-check-")
        args.data = str(make_image_folder(Path(tmp.name), {p: 128 for p in PATTERNS}))

    started = time.monotonic()
    device = versions()
    tests = [row for label in GPU_TESTS for row in run_gpu_tests(label)]
    t0 = time.monotonic()
    figures = throughput(args.data, args.batches)
    figures_s = time.monotonic() - t0
    augment = augment_costs()

    table = Table(title=f"dalishare GPU check: {device}", title_justify="left")
    for column, justify in (("check / figure", "left"), ("result", "left"), ("seconds", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for name, outcome, seconds, message in tests:
        table.add_row(name.removeprefix("test_").replace("_", " "), outcome + (f": {message}" if message else ""),
                      f"{seconds:.1f}")
    shared, own, handoff = figures["shared"], figures["own"], figures["handoff"]
    table.add_row(f"{JOBS} jobs, one shared GPU pipeline (img/s each)", " ".join(f"{r:.0f}" for r in shared) +
                  f"  (total {sum(shared):.0f})", "")
    table.add_row(f"{JOBS} jobs, own DALI GPU pipeline each (img/s each)", " ".join(f"{r:.0f}" for r in own) +
                  f"  (total {sum(own):.0f})", "")
    table.add_row("shared / own, all jobs together", f"{sum(shared) / sum(own):.2f}x", f"{figures_s:.1f}")
    table.add_row("hand-off, announcement sent -> tensor in a waiting job",
                  f"median {sharing.pct(handoff, 0.5):.0f} us, p90 {sharing.pct(handoff, 0.9):.0f} us "
                  f"({len(handoff)} batches)", "")
    for line in augment:
        table.add_row("augment, 256x224x224 batch (bench/augment.py)", line, "")
    table.add_row("whole check", f"data {args.data}, batches of 64x224x224x3 uint8, {args.batches} timed per job",
                  f"{time.monotonic() - started:.0f}")

    console = Console(record=True, width=140)
    console.print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(console.export_text())
    print(f"written to {args.out}")
    if tmp:
        tmp.cleanup()
    return 0 if all(outcome in ("passed", "skipped") for _, outcome, _, _ in tests) else 1


if __name__ == "__main__":
    sys.exit(main())
