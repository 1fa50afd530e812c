"""Shared stages: loading ``pipelines/*.py`` and building the DALI pipeline that runs one.

A stage file defines ``stage(jpegs, decoder_device)``: it gets the DALI node of a batch of encoded
images and the device for ``fn.decoders.image`` ("cpu", or "mixed" on a GPU) and returns the node of
the decoded, resized images, one fixed HWC shape per sample. Later ops follow their input's device, so
the same definition runs on the CPU and on a GPU.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import ConfigError, StageError


def load_stage(path: str | Path) -> Callable:
    """Import a stage file and return its ``stage`` function; any failure is one-line `StageError`."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"pipeline file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"dalishare_stage_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise StageError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:
        raise StageError(f"{path} failed to import: {type(exc).__name__}: {exc}") from None
    stage = getattr(module, "stage", None)
    if not callable(stage):
        raise StageError(f"{path} defines no stage: add a function `stage(jpegs, decoder_device)`")
    return stage


def parse_device(device: str) -> int | None:
    """``"cpu"`` -> None (DALI's CPU-only mode); ``"gpu"`` -> 0, ``"gpu:K"`` -> K, once GPU K is
    known to be visible (else one-line `ConfigError`)."""
    if device == "cpu":
        return None
    match = re.fullmatch(r"gpu(?::(\d+))?", device)
    if match is None:
        raise ConfigError(f"unknown device {device!r}: use 'cpu', 'gpu' or 'gpu:K'")
    from ..shm.device import check_gpu

    index = int(match.group(1) or 0)
    check_gpu(index)
    return index


@dataclass
class StageBatch:
    """One batch out of the stage: DALI's TensorList (CPU or GPU; valid until the pipeline runs
    again) and what it holds."""

    data: object
    count: int
    sample_shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, out) -> "StageBatch":
        from nvidia.dali.types import to_numpy_type

        shapes = {tuple(s) for s in out.shape()}
        if len(shapes) != 1:
            raise ConfigError(f"the stage produced samples of shapes {sorted(shapes)[:3]}...: it must output "
                              f"one fixed shape (add a crop)")
        return cls(out, len(out), shapes.pop(), np.dtype(to_numpy_type(out.dtype)))

    @property
    def nbytes(self) -> int:
        return self.count * math.prod(self.sample_shape) * self.dtype.itemsize

    def copy_to(self, address: int) -> None:
        """Copy the whole batch, densely, to ``address`` (host memory for a CPU batch, device memory
        on the same GPU for a GPU one). Returns when the copy has finished."""
        self.data.copy_to_external(ctypes.c_void_p(address))  # GPU: blocking, on a DALI stream

    def copy_samples_to(self, addresses: list[int], stream=None) -> None:
        """Copy sample i to ``addresses[i]`` straight from DALI's buffers: host memory for a CPU
        batch; for a GPU one, device memory on the same GPU, queued on ``stream`` (an object with
        the CUDA stream handle as ``.ptr``, a CuPy Stream; None: one blocking copy each). Returns
        when every copy has finished."""
        if len(addresses) != self.count:
            raise ValueError(f"{len(addresses)} addresses for a batch of {self.count}")
        # the batch is ready: DALI's outputs() returns host-synchronised when given no stream. DALI
        # reads the stream as a ctypes pointer (an int or a CuPy Stream would be NULL, or crash)
        queued = self.on_gpu and stream is not None
        for i, address in enumerate(addresses):
            if queued:
                self.data[i].copy_to_external(ctypes.c_void_p(address), cuda_stream=ctypes.c_void_p(stream.ptr),
                                              non_blocking=True)
            else:
                self.data[i].copy_to_external(ctypes.c_void_p(address))  # blocking
        if queued:
            stream.synchronize()

    @property
    def on_gpu(self) -> bool:
        from nvidia.dali.tensors import TensorListGPU

        return isinstance(self.data, TensorListGPU)

    def numpy(self) -> np.ndarray:
        """The batch as a NumPy array (copied off the GPU if it is there)."""
        data = self.data.as_cpu() if self.on_gpu else self.data
        return np.asarray(data.as_tensor())  # a view of DALI's CPU buffer


def read_encoded(locators: Iterable) -> list[np.ndarray]:
    """The encoded samples at ``locators`` (paths, or tar members: dataset.read_sample)."""
    from .listing import read_sample

    return [read_sample(str(locator)) for locator in locators]


def build_fed_pipeline(stage: Callable, *, batch_size: int, device: str = "cpu", num_threads: int | None = None,
                       seed: int = 0):
    """The stage worker's pipeline: fed batch by batch (``feed_input("encoded", images)`` then
    ``schedule_run()``; ``outputs()`` in the same order). Several batches may be scheduled at once:
    with a prefetch depth of 1 DALI runs each as soon as it is fed, and no output waits for a later
    input (a deeper prefetch would hold the first output until enough inputs came)."""
    return build_pipeline(stage, None, batch_size=batch_size, device=device, num_threads=num_threads, seed=seed,
                          prefetch=1)


GPU_STAGE_THREADS = 8
"""The default cap on a GPU stage's DALI CPU threads (``--threads`` overrides it). The mixed decoder
still parses and Huffman-decodes on the CPU what its hardware decoder does not take, but one thread
per core starves the jobs' own CPU work: with 64 threads it used 24 cores (DALI#5274).
bench/gpu_check.py measures what the cap costs against all cores."""


def default_threads(device_id: int | None) -> int:
    """DALI CPU threads when ``--threads`` is not given: every core on the CPU, at most
    GPU_STAGE_THREADS with a GPU."""
    cores = os.cpu_count() or 1
    return cores if device_id is None else min(cores, GPU_STAGE_THREADS)


def build_pipeline(stage: Callable, source: Callable | None, *, batch_size: int, device: str = "cpu",
                   num_threads: int | None = None, seed: int = 0, prefetch: int = 2, **options):
    """A DALI pipeline that feeds ``source()`` (a list of encoded images, up to ``batch_size``; None:
    fed with ``feed_input("encoded", ...)``) to ``stage``; ``options`` go to DALI's ``pipeline_def``."""
    from nvidia.dali import fn, pipeline_def, types

    device_id = parse_device(device)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads or default_threads(device_id),
                  device_id=device_id, seed=seed, prefetch_queue_depth=prefetch, **options)
    def pipeline():
        jpegs = fn.external_source(source=source, batch=True, dtype=types.UINT8, name="encoded") if source \
            else fn.external_source(dtype=types.UINT8, name="encoded")
        return stage(jpegs, "cpu" if device_id is None else "mixed")

    pipe = pipeline()
    pipe.build()
    return pipe


def stateful_ops(pipe) -> list[str]:
    """The operators of a built pipeline whose output may change from run to run (DALI marks them
    stateful: ``fn.random.*``, random crops, jitter, noise, ``fn.python_function``), other than the
    input: a stage with any of them cannot be cached (its samples are not the same every epoch)."""
    from nvidia.dali import backend, fn

    found = []
    for op in pipe._ops:  # DALI has no public graph walk; _ops is the built graph's operator list
        name = getattr(op._op, "schema_name", "ExternalSource")  # the input has no schema here
        schema = backend.GetSchema(name)
        if name != "ExternalSource" and schema.IsStateful():
            found.append("fn." + ".".join([*schema.ModulePath(), fn._to_snake_case(schema.OperatorName())]))
    return sorted(set(found))


def one_line(exc: BaseException) -> str:
    """The gist of a DALI error (which spans many lines: the op, the user's traceback, the cause)."""
    text = str(exc)
    op = re.search(r"operator `(?:nvidia\.dali\.)?([^`]+)`", text)
    cause = text.split("encountered:", 1)[-1]
    lines = [line.strip() for line in cause.splitlines()
             if line.strip() and not line.startswith("Current pipeline object")]
    gist = re.sub(r"\[/[^\]]*\]\s*", "", lines[0] if lines else "").rstrip(" :")  # drop DALI source paths
    return (f"{op.group(1)}: {gist}" if op else f"{type(exc).__name__}: {gist}")[:300]


def standalone_batches(stage: Callable, files: list[Path], batch_size: int, *, device: str = "cpu",
                       num_threads: int | None = None):
    """Run ``stage`` over ``files`` in order, yielding a `StageBatch` per batch (valid until the
    next one): a job loading on its own. The baseline of the demo and the benchmarks."""
    starts = iter(range(0, len(files), batch_size))

    def source():
        start = next(starts, None)
        if start is None:
            raise StopIteration
        return read_encoded(files[start : start + batch_size])

    pipe = build_pipeline(stage, source, batch_size=batch_size, device=device, num_threads=num_threads)
    try:
        while True:
            try:
                (out,) = pipe.run()
            except StopIteration:
                return
            yield StageBatch.of(out)
    finally:
        del pipe
