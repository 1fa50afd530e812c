"""A job's tensors over the ring: a zero-copy tensor per slot, a piece's samples, and leased views."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ..errors import ConfigError
from .rebatch import Piece


def piece_tensors(slot: torch.Tensor, piece: Piece, sample_shape: tuple, dtype: torch.dtype):
    """``piece``'s images (a view of the slot's uint8 tensor, for copying out of), labels and indices."""
    sample_bytes = math.prod(sample_shape) * dtype.itemsize
    start, end = piece.offset * sample_bytes, (piece.offset + piece.count) * sample_bytes
    images = slot[start:end].view(dtype).view(piece.count, *sample_shape)
    rows = slice(piece.offset, piece.offset + piece.count)
    labels = np.frombuffer(piece.msg.labels, dtype="<i8")[rows].astype(np.int64)
    indices = np.frombuffer(piece.msg.indices, dtype="<i8")[rows].astype(np.int64)
    return images, torch.from_numpy(labels), torch.from_numpy(indices)


def piece_padded(piece: Piece) -> torch.Tensor:
    """``piece``'s padding flags: True for the repeats a sharded producer adds (all False otherwise)."""
    rows = slice(piece.offset, piece.offset + piece.count)
    if not piece.msg.padded:
        return torch.zeros(piece.count, dtype=torch.bool)
    return torch.from_numpy(np.frombuffer(piece.msg.padded, dtype=np.uint8)[rows].astype(bool))


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
