"""A job's tensors over the ring: a zero-copy tensor per slot, and the producer batch being read."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ..errors import ConfigError
from ..wire.messages import Batch


class ProducerBatch:
    """A producer batch being consumed: its slot view and how far this job has read into it."""

    def __init__(self, msg: Batch, images: torch.Tensor):
        self.msg, self.images, self.offset = msg, images, 0
        self.labels = torch.from_numpy(np.frombuffer(msg.labels, dtype="<i8").astype(np.int64))
        self.indices = torch.from_numpy(np.frombuffer(msg.indices, dtype="<i8").astype(np.int64))

    @property
    def remaining(self) -> int:
        return self.msg.count - self.offset

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = slice(self.offset, self.offset + n)
        self.offset += n
        return self.images[s], self.labels[s], self.indices[s]


def leased_view(ring, slot: int, offset: int, shape: tuple, dtype: torch.dtype, device: torch.device):
    """Samples of ``slot`` from byte ``offset`` as a tensor of ``shape`` with storage of its own
    (zero copy), and the lease that lives as long as anything refers to that tensor (keep.py)."""
    nbytes = math.prod(shape) * dtype.itemsize
    buffer, lease = ring.lease(slot, offset, nbytes)
    if device.type == "cpu":
        with warnings.catch_warnings():  # read-only on purpose: a write faults instead of corrupting
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(buffer)
    else:
        with torch.cuda.device(device):
            flat = torch.from_dlpack(buffer)
    return flat.view(dtype).view(shape), lease


def slot_tensors(ring) -> tuple[list[torch.Tensor], torch.device]:
    """Zero-copy uint8 tensors over each slot of ``ring``, and the device they are on."""
    if ring.device is None:  # host memory, mapped read-only on purpose
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return [torch.frombuffer(ring.slot(k), dtype=torch.uint8) for k in range(ring.layout.slots)], torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"the producer keeps its ring on a GPU, but this job's torch {torch.__version__} has no "
                          f"CUDA: install a CUDA build of torch, or serve with --device cpu")
    device = torch.device("cuda", ring.device)
    with torch.cuda.device(device):
        return [torch.from_dlpack(ring.slot(k)) for k in range(ring.layout.slots)], device
