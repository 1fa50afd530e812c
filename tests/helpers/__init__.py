"""The tests' helpers: the generated dataset's shape, producer and job processes, GPU detection,
and the GPU tests' reference checksums. One package, imported by every tier."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dalishare.testing import ProducerProcess, make_image_folder as make_dataset

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
RESNET = ROOT / "pipelines" / "resnet.py"
CUDA_DECODER_STAGE = HERE / "cuda_decoder_stage.py"  # the GPU tests' stage: the same pixels whichever run decodes
CLASS_SIZES = {"ants": 10, "bees": 7, "wasps": 13}
N_SAMPLES = sum(CLASS_SIZES.values())

__all__ = ["CUDA_DECODER_STAGE", "CLASS_SIZES", "GpuJob", "Job", "PRODUCER_BATCH", "check_exactly_once_and_pixels", "expected_checksums", "N_SAMPLES", "RESNET", "ROOT", "Server", "expected_labels", "gpu_count", "make_dataset"]


def gpu_count(torch_too: bool = True) -> int:
    """CUDA GPUs that CuPy (and torch, with ``torch_too``) see here (0 without CuPy, a driver or a device)."""
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        if torch_too:
            import torch

            count = min(count, torch.cuda.device_count())
        return count
    except Exception:  # no CuPy, no driver, no device: all mean no GPU here
        return 0


def expected_labels(root: Path) -> list[int]:
    """Label of each sample index, computed independently of dalishare.dataset."""
    labels = []
    for label, cls in enumerate(sorted(p.name for p in root.iterdir() if p.is_dir())):
        labels += [label] * len([p for p in (root / cls).iterdir() if p.suffix == ".jpg"])
    return labels


class Server(ProducerProcess):
    """``dalishare serve`` in a child process (named ``t`` unless told); stopped with SIGTERM at exit,
    and a producer that does not exit in time fails the test with its log. It streams through the
    ring (``--cache off``) unless the test passes ``--cache``: most tests are about the ring."""

    def __init__(self, data: Path, *args: str, name: str = "t", pipeline: Path = RESNET):
        if "--cache" not in args:
            args = (*args, "--cache", "off")
        super().__init__(data, *args, name=name, pipeline=pipeline)

    def wait(self, timeout: float = 60) -> int:
        code = super().wait(timeout)
        if code is None:
            pytest.fail(f"producer did not exit within {timeout} s; log:\n{self.log()}")
        return code

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.wait(30)


class Job:
    """tests/job_script.py (or another job ``script``) in a child process; its record is read back as JSON."""

    def __init__(self, out: Path, script: str = "job_script.py", own_pid_namespace: bool = False, **spec):
        self.out = out
        spec.setdefault("name", "t")
        command = [sys.executable, str(HERE / script), json.dumps({**spec, "out": str(out)})]
        if own_pid_namespace:  # as `docker run` without --pid=host: the job sees its own pids only. It runs
            # as pid 2 under a shell (pid 1, a namespace's init, ignores the SIGKILL a job sends itself)
            command = ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", f"{shlex.join(command)}; exit $?"]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_attached(self, timeout: float = 60) -> None:
        marker, deadline = Path(f"{self.out}.attached"), time.monotonic() + timeout
        while not marker.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"job did not attach within {timeout} s: {self.result()}")
            time.sleep(0.05)

    def result(self, timeout: float = 120) -> dict:
        try:
            output, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            output, _ = self.proc.communicate(timeout=10)
            pytest.fail(f"job did not finish within {timeout} s; output:\n{output}")
        assert self.proc.returncode == 0, f"job failed with exit code {self.proc.returncode}:\n{output}"
        return json.loads(self.out.read_text())


# -- the GPU tests' jobs and references (tests/gpu; their harness is checked on the CPU in tests/e2e) --

PRODUCER_BATCH = 8


def GpuJob(out, **spec) -> Job:
    return Job(out, script="gpu_job.py", **spec)


def expected_checksums(data, device: str, epochs: int, batch_size: int = PRODUCER_BATCH, pipeline: Path = RESNET) -> dict:
    """{(epoch, index): checksum} of the stage run directly in DALI, batch by batch as the producer
    cuts them (the mixed decoder may split a batch between its hardware and CUDA decoders)."""
    import torch
    from helpers.gpu_job import checksum

    from dalishare.producer.dataset import scan
    from dalishare.wire.order import epoch_order
    from dalishare.producer.stage import load_stage, standalone_batches

    ds, stage, expected = scan(data), load_stage(pipeline), {}
    for epoch in range(epochs):
        order = epoch_order(len(ds), 0, epoch)
        batches = standalone_batches(stage, [ds.files[i] for i in order], batch_size, device=device)
        position = 0
        for batch in batches:
            for value in checksum(torch.from_numpy(batch.numpy().copy())).tolist():
                expected[(epoch, int(order[position]))] = value
                position += 1
    return expected


def check_exactly_once_and_pixels(record: dict, expected: dict) -> None:
    position = 0
    for p in record["passes"]:
        assert sorted(p["indices"]) == list(range(N_SAMPLES)), "not every sample exactly once"
        for index in p["indices"]:
            assert record["checksums"][position] == expected[(p["epoch"], index)], f"sample {index} differs"
            position += 1
