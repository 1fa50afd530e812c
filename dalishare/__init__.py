"""dalishare: one DALI pipeline decodes a dataset once; many training jobs on the machine share its batches.

The public names: `DaliShareIterator` (a training job's side) and the errors, all subclasses of
`DalishareError`; the jobs' augmentations are in `dalishare.augment`, the producer is the
``dalishare serve`` command.

Rooms, by process role (imports flow one way): `errors`; `shm` (slot memory, names and places);
`wire` (control messages); `producer` (the serve side, never torch); `job` (`DaliShareIterator`,
never DALI); `augment` (the jobs' augmentations). `DaliShareIterator` is loaded on first use, so
``dalishare serve`` never imports torch.
"""

from .errors import (AlreadyServing, BatchHeldTooLong, ConfigError, DalishareError, DatasetError, GpuWorkTimeout,
                     GroupBroken, ProducerLost, ProducerNotFound, ProtocolError, StageError)

__all__ = ["DaliShareIterator", "DalishareError", "ConfigError", "DatasetError", "StageError", "ProtocolError",
           "ProducerNotFound", "ProducerLost", "GroupBroken", "AlreadyServing", "BatchHeldTooLong", "GpuWorkTimeout"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "DaliShareIterator":  # torch is only needed on the job side
        from .job import DaliShareIterator

        return DaliShareIterator
    raise AttributeError(f"module 'dalishare' has no attribute {name!r}")
