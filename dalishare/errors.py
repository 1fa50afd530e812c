"""Every error dalishare raises on purpose derives from `DalishareError`."""


class DalishareError(Exception):
    """Base class: catch this to handle any dalishare failure."""


class ConfigError(DalishareError):
    """Bad setup given by the user: a path, an option, a pipeline file."""


class DatasetError(ConfigError):
    """The data folder is missing, empty or unreadable."""


class StageError(ConfigError):
    """A pipeline file does not import or defines no stage."""


class StageFailed(DalishareError):
    """The shared stage's worker kept failing and no file explained it (a broken stage, a lost GPU,
    too little memory): the producer gave up after a bounded number of restarts."""


class ProtocolError(DalishareError):
    """A control message is malformed, unknown or from another protocol version."""


class ProducerNotFound(DalishareError):
    """No producer of the requested name answered within the attach timeout."""


class ProducerLost(DalishareError):
    """The producer a job was attached to died or stopped answering."""


class GroupBroken(DalishareError):
    """A rank of this job's consumer group died or became unreachable: the group (one DDP job) cannot
    go on without it."""


class AlreadyServing(DalishareError):
    """Another live producer already serves under this name."""


class BatchHeldTooLong(DalishareError):
    """A job still holds a view of a batch after taking more further batches than its ``keep``
    allows: releasing the slot would let the producer overwrite pixels the job may still read."""


class GpuWorkTimeout(DalishareError):
    """A job's own GPU work that reads a slot did not finish in time."""


class SlotReused(DalishareError):
    """A slot no longer holds the batch the job was reading: the producer suspended the job.
    Internal to the iterator: it catches it, counts ``lost`` samples as missed and goes on."""

    def __init__(self, lost: int):
        super().__init__(f"{lost} samples lost")
        self.lost = lost
