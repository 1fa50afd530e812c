"""`DaliShareIterator`: a training job's side of dalishare.

It attaches to a producer by name (a `Session`), whose reader (reading.py: the ring's or the
cache's, chosen once from the producer's ``Welcome``) cuts batches of the job's own size: from the
ring, a job batch that lies inside one producer batch is a view of the ring (no copy), one that
spans producer batches is copied into a tensor the job owns (ring_reader.py); from a cache, each
pass is an epoch of the job's own, gathered into tensors it owns (cache_reader.py). The iterator
keeps what outlives a session: the public figures, the resume state (resume.py) and the reconnect.
Slots are given back by the rules of NOTE [ Slot ownership ] in shm/__init__.py: a yielded view
stays valid while it is in use, up to ``keep`` further batches (keep.py). The messages are
NOTE [ Control protocol ] in wire/messages.py.
"""

from __future__ import annotations

import logging
import math
import operator
import time
from typing import Callable

import torch

from ..errors import ConfigError, GroupBroken, ProducerLost, ProducerNotFound
from ..intervals import PRODUCER_POLL_S
from ..shm import names
from .group import attach_failed, check_consistent, membership
from .keep import KeepWindow
from .reading import ReadOptions
from .resume import Progress, check_state, job_order, make_state, same_data
from .session import Counters, Session

log = logging.getLogger(__name__)


def _shown(path: str, doc: str) -> property:
    """A read-only property showing ``self.<path>`` (a dotted path): the table of DaliShareIterator's figures."""
    return property(operator.attrgetter(path), doc=doc)


class DaliShareIterator:
    """Batches from a shared dalishare producer, as torch tensors.

    Each item is a dict: ``images`` (N, H, W, C) uint8 and ``labels`` (int64) where the ring is
    (the CPU, or the producer's GPU) or on ``device``, and ``indices`` (int64 on the CPU: the samples'
    stable dataset indices, for bookkeeping without a GPU sync). One pass over the iterator is one
    epoch (``loader.epoch`` says which); ``len(loader)`` is this job's batches per full epoch; the
    last batch of an epoch may be smaller than ``batch_size``. A job that attaches mid-epoch first
    gets the rest of that epoch.

    When the producer serves a cache (``dalishare serve --cache``), each pass is a whole epoch read
    at this job's own pace, from its first sample, whenever the job attached; its batches are
    gathered from the cache into tensors the job owns (so ``keep`` and ``copy`` do not matter), in
    the producer's order or, with ``seed``, the job's own.

    From a ring in host memory, ``images`` is a view of the ring (no copy) when it lies inside one
    producer batch and ``device`` is the CPU; the ring is mapped read-only, so a write faults instead
    of changing the other jobs' batches. From a ring in GPU memory, which CUDA IPC cannot map
    read-only, each batch is by default a copy the job owns (one device-to-device copy, queued on
    its stream); ``copy=False`` opts into views there too, and then a job that writes into ``images``
    (an in-place augmentation, ``images.sub_()``, a ``out=``) silently changes the pixels every other
    job reads. A view
    stays valid while anything refers to it, up to ``keep`` further batches: a loop that takes the
    next batch before it is done with this one (a one-ahead prefetcher, Lightning's fetcher, a
    pinning thread) is safe with the default ``keep=2``. A view still referenced after ``keep``
    further batches raises `BatchHeldTooLong` instead of changing under the job: ``.clone()`` what
    you keep longer, or pass ``copy=True``. On a GPU ring a slot is given back once the work queued on
    the current CUDA stream by then has finished (an event, polled), so queue the work that reads a
    batch on the current stream (or make it wait for yours). ``augment`` is any callable applied to
    each batch dict (a `dalishare.augment.Compose`, say); its result is yielded.

    `state_dict` and `load_state_dict` (torchdata's Stateful convention, as its
    ``StatefulDataLoader``; Lightning saves them in its checkpoints) resume a restarted job.
    `state_dict` is where the job's last pass is, at the batch it last handed out, whether that
    pass is still running or was left by ``break``: a job that breaks, saves and dies, and the job
    that loads the state, together read the epoch once. From a cache the resumed job reads on at
    exactly the next sample it had not been given; on the ring, in the same producer epoch, without
    any sample it had already been given (those served while it was away are missed for that epoch),
    except a group's ranks, which start together at an epoch's start as always. Without
    `load_state_dict`, a new pass (``iter()`` again) starts the next epoch, as it always has. See
    job/resume.py.

    Example:
        ```python
        with DaliShareIterator("imnet", batch_size=64) as loader:
            for epoch in range(10):
                for batch in loader:  # one pass = one epoch
                    x, y = batch["images"], batch["labels"]  # (64, 224, 224, 3) uint8 NHWC, int64
        ```

    Args:
        name: the producer's ``--name``.
        batch_size: this job's batch size (default: the producer's).
        device (torch.device | str | None): where batches go (default: where the ring is). Another
            GPU or the CPU costs one copy.
        augment: callable applied to each batch dict on this job's side.
        copy: True: tensors the job owns, never views of the ring; False: views wherever a batch lies
            in one producer batch, also of a GPU ring (zero copy; the hazard above); None (default):
            views of a host ring, copies of a GPU ring.
        keep: how many further batches the job may take while still using a view (default 2; 0:
            unchecked, a view is given back at the next step whatever refers to it).
        attach_timeout: seconds to wait for the producer to answer, then `ProducerNotFound`.
        batch_timeout: seconds to wait for the next batch from a live producer, then `ProducerLost`.
        heartbeat_interval: seconds between the heartbeats this job's background thread sends.
        reconnect: when the producer dies, fails or is stopped by a signal, wait up to
            ``reconnect_timeout`` seconds for a new producer of the same name and go on with it
            (the pass in progress ends there); without it, that is `ProducerLost` or the end.
        reconnect_timeout: with ``reconnect``, seconds to wait for the new producer.
        seed: read in an order of this job's own (a new permutation of the samples each epoch),
            not the producer's; needs a producer that serves a cache (`ConfigError` otherwise).
        group: make this process one rank of a consumer group (one DDP job) of that name: together
            its ranks read every sample of an epoch once, each the same number of batches
            (DistributedSampler's contract). Rank and world size come from ``rank``/``world_size``,
            else torchrun (LOCAL_RANK, LOCAL_WORLD_SIZE), else torch.distributed, else RANK and
            WORLD_SIZE. Batches then carry ``padded`` (bool per sample): True for the repeats that
            even out the tail. Every rank must create its iterator (at attach they compare their
            producers through torch.distributed); not with ``reconnect``.
        rank: this process's rank in its group (with ``group``; pass ``world_size`` too).
        world_size: the group's number of ranks (with ``group`` and ``rank``).
        drop_last: with ``group`` (or a sharded producer), drop the tail that does not divide evenly
            instead of padding it with repeats.
        taken_ahead: batches the training loop takes ahead of the step it runs (Lightning behind a
            wrapper without ``len()``: 1):
            ``state_dict()`` leaves them unread, so a resumed job reads them again instead of losing them.

    Attributes:
        name: the producer's name this job attached to.
        augment: the callable applied to each batch, or None.
        keep: how many further batches a view may stay in use (see ``keep`` above).
        reconnect_timeout: with ``reconnect``, seconds to wait for a new producer.
        epoch: the epoch of the pass in progress, or of the last one (None before the first).
    """

    def __init__(self, name: str = "default", batch_size: int | None = None, device=None,
                 augment: Callable | None = None, *, copy: bool | None = None, keep: int = 2, attach_timeout: float = 60.0,
                 batch_timeout: float = 600.0, heartbeat_interval: float = 1.0, reconnect: bool = False,
                 reconnect_timeout: float = 600.0, seed: int | None = None, group: str | None = None,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 taken_ahead: int = 0):
        """Attach to the producer ``name``, waiting up to ``attach_timeout`` seconds for it.

        Raises:
            ProducerNotFound: no producer of that name answered in time.
            ProducerLost: the producer stopped or died while it was starting.
            ProtocolError: the producer refused this job (another protocol version; a rank attached
                twice or a world size that differs from its group's).
            ConfigError: options that do not go together (``group`` with ``reconnect``, ``seed``
                on a producer without a cache, ...), or ranks of one DDP job that disagree.
            ValueError: a ``batch_size`` or ``keep`` out of range.
        """
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        KeepWindow(keep)  # checks keep before anything is opened
        self.name = names.check_name(name)
        self.augment, self.keep, self.reconnect_timeout = augment, keep, reconnect_timeout
        self.epoch: int | None = None  # the epoch of the pass in progress (or the last one)
        member = membership(group, rank, world_size, drop_last)  # None: an independent job
        if member is not None and reconnect:
            raise ConfigError("group= and reconnect=True: a rank that reconnects alone would end its pass at "
                              "another batch than its peers; restart the whole DDP job instead")
        # how the readers read; fixed for the iterator's life (the properties below show it)
        self._options = ReadOptions(batch_size=batch_size, device=torch.device(device) if device is not None else None,
                                    copy=copy, seed=seed, member=member, drop_last=drop_last,
                                    batch_timeout=batch_timeout, reconnect=reconnect)
        self._progress = Progress(taken_ahead)  # where state_dict() says the job is
        self._resume_at: tuple[int, int] | None = None  # (epoch, position) from load_state_dict, until a pass begins
        self._left_by_break = False  # the last pass was left by a break: after a reconnect, go on with the next epoch
        self._heartbeat_interval = heartbeat_interval
        self._endpoint = names.endpoint(name)
        self._counters = Counters()  # survive reconnects
        self._session: Session | None = None
        try:
            self._session = self._open(attach_timeout)
        except BaseException as exc:
            if self.member is not None:
                attach_failed(exc)  # the peers wait for this rank in check_consistent
            raise
        if self.member is not None:
            try:  # a collective: every rank attaches once, at the same point of its script
                check_consistent(self._session.fingerprint, self._session.shard, self.member, seed,
                                 self.samples_per_epoch)
            except BaseException:
                self.close()
                raise

    def _open(self, timeout: float) -> Session:
        return Session(self.name, self._endpoint, self._options, keep=self.keep, timeout=timeout,
                       heartbeat_interval=self._heartbeat_interval, counters=self._counters)

    def _reconnect(self) -> None:
        """``reconnect=True``: forget the lost producer and attach to its successor.

        Its batches, views and slots are dropped and a new session opens. The pass in progress ends
        here; from a cache of the same data, the next one goes on where it was in its epoch (as after
        `load_state_dict`), or with the next epoch if the job had left that pass by a break.
        """
        old = self._session
        log.warning("producer %r (pid %d) %s; waiting up to %.0f s for a new one", self.name,
                    old.producer_pid, old.lost, self.reconnect_timeout)
        deadline = time.monotonic() + self.reconnect_timeout
        while old.producer_alive() and time.monotonic() < deadline:
            time.sleep(PRODUCER_POLL_S)  # until it is gone, its socket could swallow our hello
        old.close(timeout=self.batch_timeout)  # kept as self._session until a new one opens
        self.epoch = None  # a new producer counts --epochs afresh (a cache of the same data: see below)
        try:
            self._session = self._open(self.reconnect_timeout)
        except ProducerNotFound as exc:
            raise ProducerLost(f"producer {self.name!r} {old.lost}, and no new one came: {exc}") from None
        if old.fingerprint.get("source") == "cache" and same_data(old.fingerprint, self._session.fingerprint):
            # the next pass goes on as it would have with the old producer
            point = (old.reader.passes, 0) if self._left_by_break else self._progress.saved()
            self._resume_at = self._session.reader.resume_point(*point)
        log.warning("job %d attached to the new producer %r (pid %d)", self.job_id, self.name, self.producer_pid)

    # -- public API -----------------------------------------------------------------------------

    # read-only: the options, fixed for the iterator's life
    device = _shown("_options.device", "Where batches go (a torch.device), or None: where the ring is.")
    copy = _shown("_options.copy", "True: copies the job owns; False: views; None: views of a host ring, copies "
                  "of a GPU one.")
    seed = _shown("_options.seed", "The seed of this job's own order (from a cache), or None: the producer's order.")
    member = _shown("_options.member", "This rank's place in its consumer group (name, rank, world), or None.")
    drop_last = _shown("_options.drop_last", "Whether a group's uneven tail is dropped instead of padded with repeats.")
    batch_timeout = _shown("_options.batch_timeout", "Seconds to wait for the next batch from a live producer.")
    reconnect = _shown("_options.reconnect", "Whether the job waits for a new producer of its name when it is gone.")

    # from the current session, or the last one once closed (job_id is None then)
    job_id = property(lambda self: self._session.job_id if self._session.channel is not None else None,
                      doc="The id the producer gave this job (None once closed).")
    producer_pid = _shown("_session.producer_pid", "The producer's pid, as it sees itself (in its own pid namespace).")
    classes = _shown("_session.classes", "The number of classes in the dataset.")
    samples_per_epoch = _shown("_session.reader.samples_per_epoch", "This job's samples per epoch (a rank's share).")
    producer_batch_size = _shown("_session.producer_batch_size", "The producer's ``--batch-size``.")
    batch_size = _shown("_session.reader.batch_size", "This job's batch size (the producer's unless it chose one).")
    ring_device = _shown("_session.data_device", "Where the producer's data is: its ring's device, or its cache's.")
    stop_reason = _shown("_session.stop_reason", "Why the producer stopped, once it has (None before).")
    excluded_samples = _shown("_counters.excluded", "Files the producer excluded because DALI cannot decode them.")
    missed_samples = _shown("_counters.missed", "Samples skipped while this job was suspended for stalling.")
    suspensions = _shown("_session.suspensions", "Times the producer suspended this job for stalling (this session).")
    handoff_ns = _shown("_counters.handoff_ns", "Nanoseconds from announcement sent to view ready, per batch.")
    # for tests: the ring mapped (or a GPU cache's rows) and a tensor over each slot (a cache has none)
    _ring = property(lambda self: getattr(self._session.reader, "ring", None)
                     or getattr(getattr(self._session.reader, "cache", None), "_ring", None))
    _slot_tensors = property(lambda self: getattr(self._session.reader, "slot_tensors", []))

    def __len__(self) -> int:
        """This job's batches per full epoch (a group rank: of its share)."""
        return math.ceil(self.samples_per_epoch / self.batch_size)

    def __iter__(self):
        """One pass: the batches of one epoch, as dicts of tensors (see the class docstring).

        Yields:
            dict: ``images``, ``labels``, ``indices`` (and ``padded`` for a group's rank), after
                ``augment`` if there is one.

        Raises:
            ProducerLost: the producer died, failed or went silent (without ``reconnect``).
            GroupBroken: another rank of this job's group is gone.
            BatchHeldTooLong: a view is still in use after ``keep`` further batches.
        """
        if not self._session.reader.leave_last_pass(self._resume_at):  # the producer was lost while that was given back
            self._reconnect()
        session, reader = self._session, self._session.reader
        start = reader.begin_pass(self._resume_at)
        if start is None:  # nothing to read: the producer finished, stopped or is lost
            if self.reconnect and session.lost:
                self._reconnect()
            return
        self._resume_at, self._left_by_break = None, False
        self.epoch, position = start
        self._progress.begin(self.epoch, position)
        try:
            while (batch := reader.next_batch()) is not None:
                session.read += len(batch["indices"])
                if self.augment is not None:
                    batch = self.augment(batch)
                self._progress.handed_out(self.epoch, reader.position)
                yield batch
                del batch  # this frame must not be what keeps a view alive (keep.py)
        except GeneratorExit:
            self._left_by_break = True
            raise
        finally:  # ended or left by a break: the pass counts (--epochs); the state stays where it is (resume.py)
            reader.end_pass()
        if reader.epoch_read:
            self._progress.epoch_read(self.epoch)
        if self.reconnect and session.lost:
            self._reconnect()

    def state_dict(self) -> dict:
        """Where this job is, to resume from after a restart.

        Returns:
            dict: the epoch of the job's last pass and the samples of it behind the job (minus
                ``taken_ahead`` batches), also after a ``break``: a plain dict for ``torch.save``
                or a checkpoint.
        """
        reader = self._session.reader
        return make_state(self._progress, reader.source, self._session.fingerprint, self._job_order, reader.passes)

    def load_state_dict(self, state: dict) -> None:
        """Go on from ``state`` (from `state_dict`, in an earlier run of this job).

        Call it before iterating: the next pass starts where the state says.

        Args:
            state: what `state_dict` returned.

        Raises:
            ConfigError: the state was saved from another dataset, stage, ``--seed`` or shard count,
                or by a job with another ``seed=``, group size or ``drop_last=``.
        """
        reader = self._session.reader
        epoch, position = check_state(state, reader.source, self._session.fingerprint, self._job_order)
        self._resume_at = reader.resume_point(epoch, position)
        self._progress.begin(*self._resume_at)

    @property
    def _job_order(self) -> dict:
        """What of this job a saved position depends on (resume.job_order)."""
        world = self.member.world if self.member is not None else 1
        return job_order(self.seed, world, self.drop_last and self._session.reader.splits)

    def close(self, failure: str = "") -> None:
        """Detach from the producer, stop the heartbeat, unmap the ring. Safe to call twice.

        Args:
            failure: the job leaves because of this error (the other ranks of its group are told).
        """
        if self._session is not None:  # kept: its figures (batch_size, len(), ...) stay readable
            self._session.close(timeout=self.batch_timeout, failure=failure)

    def __enter__(self) -> "DaliShareIterator":
        """Return the iterator itself; leaving the block closes it."""
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Close; leaving because of an exception tells the other ranks of this job's group."""
        self.close(failure=f"{kind.__name__}: {error}" if kind is not None and not issubclass(kind, GroupBroken) else "")
