"""A job's mapping of a producer's cache (`CachedSamples`); how a job reads it is cache_reader.py
(NOTE [ Cache protocol ] in producer/filling.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ProducerLost
from ..shm import RingLayout, attach_ring
from ..shm.cache import CacheView, Mark
from .views import slot_tensors


class CachedSamples:
    """The producer's cache as this job maps it: the marks and labels (host memory) and the rows
    (host memory, read-only; or the producer's GPU, through its IPC handle)."""

    def __init__(self, wire: dict):
        self.view = CacheView(Path(wire["path"]))
        layout = self.layout = self.view.layout
        self.marks, self.labels = self.view.marks, self.view.labels
        self._ring, self._gpu_rows = None, None
        self.device = torch.device("cpu")
        if not layout.rows_in_file:
            try:
                self._ring = attach_ring(RingLayout.from_wire(wire["rows"]))
                tensors, self.device = slot_tensors(self._ring)
            except BaseException:
                self.close()
                raise
            self._gpu_rows = tensors[0][: layout.rows_bytes].view(layout.samples, layout.sample_bytes)

    def excluded(self) -> int:
        return int(np.count_nonzero(self.marks == Mark.EXCLUDED))

    def valid(self) -> int:
        return int(np.count_nonzero(self.marks == Mark.VALID))

    def gather(self, indices: np.ndarray, shape: tuple, dtype: torch.dtype, target: torch.device) -> torch.Tensor:
        """The samples ``indices`` (all VALID) as one tensor this job owns, on ``target``: one copy
        from the cache (a gather on the GPU for a GPU cache), plus one to ``target`` if it is elsewhere."""
        n = len(indices)
        if self._gpu_rows is None and not self.layout.rows_in_file:
            raise ProducerLost("the producer stopped and this job has unmapped its GPU cache; read no further")
        if self._gpu_rows is not None:
            index = torch.from_numpy(indices).pin_memory().to(self.device, non_blocking=True)
            images = self._gpu_rows.index_select(0, index).view(dtype).view(n, *shape)  # on the current stream
            return images if images.device == target else images.to(target)
        images = torch.empty((n, *shape), dtype=dtype, pin_memory=target.type == "cuda")
        self.view.gather(indices, images.numpy())
        return images if target.type == "cpu" else images.to(target, non_blocking=True)

    def unmap_rows(self) -> bool:
        """Unmap a GPU cache's rows, after the gathers queued on this job's streams have read them
        (unmapping memory a kernel still reads is undefined); whether the mapping is gone."""
        ring, self._ring, self._gpu_rows = self._ring, None, None
        if ring is None:
            return True
        try:
            if self.device.type == "cuda":  # else the rows never got as far as tensors
                torch.cuda.synchronize(self.device)
        finally:
            ring.close()
        return not ring.mapped

    def close(self) -> None:
        self.unmap_rows()
        self.marks = self.labels = None
        self.view.close()

