"""Every error dalishare raises on purpose derives from `DalishareError`.

Each class says when it is raised and what to do about it; docs/failures.md has them as a table.
"""


class DalishareError(Exception):
    """Base class: catch this to handle any dalishare failure.

    ``dalishare serve`` turns any of them into one line on stderr (``dalishare: error: ...``) and
    exit code 2.
    """


class ConfigError(DalishareError):
    """Bad setup given by the user: a path, an option, a pipeline file.

    Raised by ``dalishare serve`` for an option out of range (``--slots``, ``--shard``, ``--cache``,
    ``--cache-limit``), ``--cache gpu`` without ``--device gpu``, an explicit cache that does not
    fit, a ``--metrics-port`` already in use, or ``--device gpu`` without a usable GPU or CuPy; and
    by a job for ``seed=`` on a producer without a cache, ``group=`` with ``reconnect=True``,
    ``rank=`` without ``world_size=``, a `DaliShareIterator.load_state_dict` state saved from
    another dataset or job, ranks of one DDP job that disagree on their producers or options, or a
    GPU ring it cannot open (another pid namespace, a MIG instance, torch without CUDA).

    Fix: the message names the option or the difference, and the fix.
    """


class DatasetError(ConfigError):
    """The data folder is missing, empty or unreadable.

    Raised by ``dalishare serve`` when ``--data`` does not exist, holds no image, is a file list
    with a malformed line, names shards that do not exist, or when none of its files decodes; and
    by a job when a rank would get no sample.

    Fix: correct the path or the list (the message names the line or the shard); check that the
    files are images.
    """


class StageError(ConfigError):
    """A pipeline file does not import or defines no stage.

    Raised by ``dalishare serve`` at start when the stage file does not exist, has a syntax error,
    raises on import, or defines no ``stage(jpegs, decoder_device)``; also when its pipeline fails
    in a probe or answers out of order.

    Fix: correct the stage file (the message names the line or the exception).
    """


class StageFailed(DalishareError):
    """The shared stage's worker kept failing and no file explained it.

    Raised in the producer when its stage worker failed several times in a row (with a backoff
    between the restarts) and no file explained it: a broken stage, a lost GPU, too little memory.
    The producer stops; its jobs receive it as `ProducerLost`, with this reason.

    Fix: check the stage, the device and free memory, then serve again.
    """


class ProtocolError(DalishareError):
    """A control message is malformed, unknown or from another protocol version.

    Raised in a job when its producer refuses it (another protocol version, a rank already attached,
    ranks that disagree on the world size) or sends a message or ring layout this dalishare cannot
    read.

    Fix: install the same dalishare version for the producer and its jobs; give each rank its own
    ``rank=``.
    """


class ProducerNotFound(DalishareError):
    """No producer of the requested name answered within the attach timeout.

    Raised by `DaliShareIterator` when nothing serves its ``name`` within ``attach_timeout``
    seconds.

    Fix: start ``dalishare serve PIPELINE --data DIR --name NAME`` (in containers, with the same
    ``DALISHARE_RUNTIME_DIR`` and ``/dev/shm`` as the job); check the name with ``dalishare
    status``; or pass a longer ``attach_timeout``.
    """


class ProducerLost(DalishareError):
    """The producer a job was attached to died or stopped answering.

    Raised in a job when its producer died, failed (its error, such as `StageFailed`, is in the
    message), stopped while it was starting, or sent no batch for ``batch_timeout`` seconds while
    alive.

    Fix: see the producer's log; restart it and the job, or pass ``reconnect=True`` so the job
    waits for a new producer of the same name. A live producer that sends nothing is usually held
    back by another job on the ring: ``dalishare status`` shows which job sets the pace.
    """


class GroupBroken(DalishareError):
    """A rank of this job's consumer group died or became unreachable.

    Raised in the other ranks of a consumer group (one DDP job, ``group=``) at their next batch when
    one rank died, became unreachable or left with an exception: the group cannot go on without it.

    Fix: restart the whole DDP job (``reconnect=True`` is refused with ``group=``).
    """


class AlreadyServing(DalishareError):
    """Another live producer already serves under this name.

    Raised by ``dalishare serve`` at start; the message names the running producer's pid.

    Fix: stop that producer first, or serve under another ``--name``.
    """


class BatchHeldTooLong(DalishareError):
    """A job still holds a view of a batch after taking more further batches than its ``keep`` allows.

    Raised by the iterator instead of giving the slot back, since the producer would then overwrite
    pixels the job may still read; also when a job holds views of every slot of the ring and asks
    for more. Nothing is given back, so the pixels stay as they were.

    Fix: ``.clone()`` what you keep longer, pass ``copy=True``, or a larger ``keep=`` (the
    producer then needs ``--slots`` of at least keep + 2).
    """


class GpuWorkTimeout(DalishareError):
    """A job's own GPU work that reads a slot did not finish in time.

    Raised in a job on a GPU ring when the work queued on its CUDA stream that reads ring slots has
    not finished after the batch timeout (a hung kernel?).

    Fix: check the training step's kernels; queue the work that reads a batch on the current
    stream, or make the current stream wait for yours.
    """


class SlotReused(DalishareError):
    """A slot no longer holds the batch the job was reading: the producer suspended the job.

    Internal to the iterator: it catches it, counts ``lost`` samples as missed and goes on.
    """

    def __init__(self, lost: int):
        """Say how many samples of the batch were lost (``lost``)."""
        super().__init__(f"{lost} samples lost")
        self.lost = lost
