"""dalishare: one DALI pipeline decodes a dataset once; many training jobs on the machine share its batches."""

from .errors import (AlreadyServing, BatchHeldTooLong, ConfigError, DalishareError, DatasetError, ProducerLost,
                     ProducerNotFound, ProtocolError, StageError)
from .iterator import DaliShareIterator

__all__ = ["DaliShareIterator", "DalishareError", "ConfigError", "DatasetError", "StageError", "ProtocolError",
           "ProducerNotFound", "ProducerLost", "AlreadyServing", "BatchHeldTooLong"]
__version__ = "0.1.0"
