"""`DaliShareIterator`: a training job's side of dalishare.

It attaches to a producer by name (a `Session`), and turns the producer's batch announcements into
batches of the job's own size (a `Rebatcher` decides the cuts): a job batch that lies inside one
producer batch is a view of the ring (no copy); one that spans producer batches is copied into a
tensor the job owns. Slots are given back by the rules of NOTE [ Slot ownership ] in
shm/__init__.py: a yielded view stays valid while it is in use, up to ``keep`` further batches
(keep.py). The messages are NOTE [ Control protocol ] in wire/messages.py.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np
import torch

from ..errors import ConfigError, DatasetError, GroupBroken, ProducerLost, ProducerNotFound, SlotReused
from ..shm import names
from ..shm.cache import Mark
from ..wire.order import epoch_order, share
from .cached import take
from .group import attach_failed, check_consistent, check_same_epoch, membership
from .keep import KeepWindow
from .rebatch import Piece
from .resume import Progress, check_state, make_state, reader, same_data
from ..intervals import PRODUCER_POLL_S
from .session import Counters, Session
from .views import leased_view, piece_padded, piece_tensors

log = logging.getLogger(__name__)


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

    ``images`` is a view of the ring (no copy) when it lies inside one producer batch and ``device``
    is where the ring is. Never write to it (host memory is mapped read-only, so that faults). It
    stays valid while anything refers to it, up to ``keep`` further batches: a loop that takes the
    next batch before it is done with this one (a one-ahead prefetcher, Lightning's fetcher, a
    pinning thread) is safe with the default ``keep=2``. A view still referenced after ``keep``
    further batches raises `BatchHeldTooLong` instead of changing under the job: ``.clone()`` what
    you keep longer, or pass ``copy=True``. On a GPU ring a slot is given back once the work queued on
    the current CUDA stream by then has finished (an event, polled), so queue the work that reads a
    batch on the current stream (or make it wait for yours). ``augment`` is any callable applied to
    each batch dict (a `dalishare.augment.Compose`, say); its result is yielded.

    Args:
        name: the producer's ``--name``.
        batch_size: this job's batch size (default: the producer's).
        device: where batches go (default: where the ring is). Another GPU or the CPU costs one copy.
        augment: callable applied to each batch dict on this job's side.
        copy: yield tensors the job owns instead of views of the ring.
        keep: how many further batches the job may take while still using a view (default 2; 0:
            unchecked, a view is given back at the next step whatever refers to it).
        attach_timeout: seconds to wait for the producer to answer, then `ProducerNotFound`.
        batch_timeout: seconds to wait for the next batch from a live producer, then `ProducerLost`.
        reconnect: when the producer dies, fails or is stopped by a signal, wait up to
            ``reconnect_timeout`` seconds for a new producer of the same name and go on with it
            (the pass in progress ends there); without it, that is `ProducerLost` or the end.
        seed: read in an order of this job's own (a new permutation of the samples each epoch),
            not the producer's; needs a producer that serves a cache (`ConfigError` otherwise).
        group: make this process one rank of a consumer group (one DDP job) of that name: together
            its ranks read every sample of an epoch once, each the same number of batches
            (DistributedSampler's contract). Rank and world size come from ``rank``/``world_size``,
            else torchrun (LOCAL_RANK, LOCAL_WORLD_SIZE), else torch.distributed, else RANK and
            WORLD_SIZE. Batches then carry ``padded`` (bool per sample): True for the repeats that
            even out the tail. Every rank must create its iterator (at attach they compare their
            producers through torch.distributed); not with ``reconnect``.
        drop_last: with ``group`` (or a sharded producer), drop the tail that does not divide evenly
            instead of padding it with repeats.
        taken_ahead: batches the training loop takes ahead of the step it runs (Lightning behind a
            wrapper without ``len()``: 1):
            ``state_dict()`` leaves them unread, so a resumed job reads them again instead of losing them.

    ``state_dict()`` and ``load_state_dict(state)`` (torchdata's Stateful convention; Lightning saves
    them in its checkpoints) resume a restarted job: from a cache at exactly the next sample it had not
    been given; on the ring, in the same producer epoch, without any sample it had already been given
    (those served while it was away are missed for that epoch), except a group's ranks, which start
    together at an epoch's start as always. See job/resume.py.
    """

    def __init__(self, name: str = "default", batch_size: int | None = None, device=None,
                 augment: Callable | None = None, *, copy: bool = False, keep: int = 2, attach_timeout: float = 60.0,
                 batch_timeout: float = 600.0, heartbeat_interval: float = 1.0, reconnect: bool = False,
                 reconnect_timeout: float = 600.0, seed: int | None = None, group: str | None = None,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 taken_ahead: int = 0):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        KeepWindow(keep)  # checks keep before anything is opened
        self.name = names.check_name(name)
        self.augment, self.copy, self.keep = augment, copy, keep
        self.batch_timeout, self.reconnect, self.reconnect_timeout = batch_timeout, reconnect, reconnect_timeout
        self.device = torch.device(device) if device is not None else None
        self.epoch: int | None = None  # the epoch of the pass in progress (or the last one)
        self.seed = seed
        self.member = membership(group, rank, world_size, drop_last)  # None: an independent job
        if self.member is not None and reconnect:
            raise ConfigError("group= and reconnect=True: a rank that reconnects alone would end its pass at "
                              "another batch than its peers; restart the whole DDP job instead")
        self.drop_last = drop_last
        self._last_sample = None  # a group rank on the ring: its last sample (images, label, index), to repeat
        self._passes_read = 0  # with a cache: passes this job finished or left (its epochs)
        self._progress = Progress(taken_ahead)  # where state_dict() says the job is
        self._resume_at: tuple[int, int] | None = None  # (epoch, position) from load_state_dict, until used
        self._requested_batch_size, self._heartbeat_interval = batch_size, heartbeat_interval
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
        self._epoch_checked = self.member is None or self._session.shard[1] == 1  # check_same_epoch is due

    def _open(self, timeout: float) -> Session:
        session = Session(self.name, self._endpoint, keep=self.keep, batch_size=self._requested_batch_size,
                          timeout=timeout, heartbeat_interval=self._heartbeat_interval, counters=self._counters,
                          member=self.member)
        try:
            self._target = self.device or session.ring_device
            if self._target.type == "cuda" and self._target.index is None:
                self._target = torch.device("cuda", torch.cuda.current_device())
            if session.cache is not None and self._splits(session):
                session.samples_per_epoch = len(self._my_share(session, 0)[0])
            if self.seed is not None and session.cache is None:
                raise ConfigError(f"seed={self.seed}: producer {self.name!r} streams one shared order through its "
                                  f"ring; a job's own order needs a producer with a cache (serve with --cache "
                                  f"memory, gpu or DIR), or drop seed=")
        except BaseException:
            session.close(timeout=0)
            raise
        return session

    def _reconnect(self) -> None:
        """``reconnect=True``: forget the lost producer (its batches, views and slots) and attach to
        its successor in a new session. The pass in progress ends here; from a cache of the same data,
        the next one goes on where it was in its epoch (as after `load_state_dict`)."""
        old = self._session
        log.warning("producer %r (pid %d) %s; waiting up to %.0f s for a new one", self.name,
                    old.producer_pid, old.lost, self.reconnect_timeout)
        deadline = time.monotonic() + self.reconnect_timeout
        while old.producer_alive() and time.monotonic() < deadline:
            time.sleep(PRODUCER_POLL_S)  # until it is gone, its socket could swallow our hello
        old.close(timeout=self.batch_timeout)  # kept as self._session until a new one opens
        self.epoch, self._passes_read = None, 0  # a new producer counts --epochs afresh (a cache: see below)
        try:
            self._session = self._open(self.reconnect_timeout)
        except ProducerNotFound as exc:
            raise ProducerLost(f"producer {self.name!r} {old.lost}, and no new one came: {exc}") from None
        if old.fingerprint.get("source") == "cache" and same_data(old.fingerprint, self._session.fingerprint):
            self._resume_at = self._progress.saved()
            self._passes_read = self._resume_at[0]
        log.warning("job %d attached to the new producer %r (pid %d)", self.job_id, self.name, self.producer_pid)

    # -- public API -----------------------------------------------------------------------------

    # from the current session, or the last one once closed (job_id is None then)
    job_id = property(lambda self: self._session.job_id if self._session.channel is not None else None)
    producer_pid = property(lambda self: self._session.producer_pid)
    classes = property(lambda self: self._session.classes)
    @property
    def samples_per_epoch(self) -> int:
        """Samples this job reads per epoch (a group rank: its share)."""
        n = self._session.samples_per_epoch
        if self.member is not None and self._session.cache is None:  # the ring announces the whole epoch's size
            n = n // self.member.world if self.drop_last else -(-n // self.member.world)
        return n

    producer_batch_size = property(lambda self: self._session.producer_batch_size)
    batch_size = property(lambda self: self._session.rebatcher.batch_size)
    ring_device = property(lambda self: self._session.ring_device)
    stop_reason = property(lambda self: self._session.stop_reason,
                           doc="why the producer stopped, once it has")
    excluded_samples = property(lambda self: self._counters.excluded,
                                doc="files the producer excluded because DALI cannot decode them")
    missed_samples = property(lambda self: self._counters.missed,
                              doc="samples skipped while this job was suspended for stalling")
    suspensions = property(lambda self: self._session.suspensions,
                           doc="times the producer suspended this job for stalling (this attachment)")
    handoff_ns = property(lambda self: self._counters.handoff_ns, doc="announcement sent -> view ready, per batch")
    _ring = property(lambda self: self._session.ring)
    _slot_tensors = property(lambda self: self._session.slot_tensors)

    def __len__(self) -> int:
        return math.ceil(self.samples_per_epoch / self.batch_size)

    def __iter__(self):
        if self._session.cache is not None:
            yield from self._cached_pass()
            return
        self._skip_rest_of_epoch()
        session = self._session
        session.receive_all()  # a Suspended message may void the queued head
        head = session.peek(self.batch_timeout, self.reconnect)
        if head is None:
            if self.reconnect and session.lost:
                self._reconnect()
            return
        self.epoch = head.epoch
        if not self._epoch_checked:  # the first pass of a rank of a job across sharded ring producers
            self._epoch_checked = True
            check_same_epoch(head.epoch)
        session.rebatcher.begin_epoch()
        self._share_read = 0  # a group rank: samples of its share read in this pass ...
        self._share_target = self.samples_per_epoch  # ... of this many (fixed for the pass: the ranks agree on it)
        resumed = self._resume_at is not None and self._resume_at[0] == head.epoch
        self._progress.begin(head.epoch, max(head.start, self._resume_at[1]) if resumed else head.start)
        try:
            while (batch := self._next_batch()) is not None:
                session.read += len(batch["indices"])
                if self.augment is not None:
                    batch = self.augment(batch)
                self._progress.handed_out(head.epoch, self._ring_position())
                yield batch
                del batch  # this frame must not be what keeps a view alive (keep.py)
        except GeneratorExit:  # left (a break): the rest of the epoch is skipped, in the state too
            self._progress.epoch_read(head.epoch)
            raise
        last = session.rebatcher.last
        if last is not None and last.last and last.epoch == head.epoch and session.rebatcher.current is None:
            self._progress.epoch_read(head.epoch)

    def state_dict(self) -> dict:
        """Where this job is: its epoch and the samples of it behind it (minus ``taken_ahead`` batches).
        A plain dict for ``torch.save`` or a checkpoint."""
        session = self._session
        return make_state(self._progress, self._source, session.fingerprint, self._reader, self._passes_read)

    def load_state_dict(self, state: dict) -> None:
        """Go on from ``state`` (from `state_dict`, in an earlier run of this job): call it before
        iterating. `ConfigError` if it was saved from another dataset, stage, --seed or shard count, or by
        a job with another seed=, group size or drop_last=."""
        epoch, position = check_state(state, self._source, self._session.fingerprint, self._reader)
        if self._source == "ring" and self.member is not None:
            position = 0  # a group on the ring starts together at an epoch's start, whatever was read
        self._resume_at = (epoch, position)
        self._progress.begin(epoch, position)
        if self._source == "cache":
            self._passes_read = epoch

    _source = property(lambda self: "cache" if self._session.cache is not None else "ring")
    _reader = property(lambda self: reader(self.seed, self.member.world if self.member else 1,
                                           self.drop_last and self._splits(self._session)))

    def close(self, failure: str = "") -> None:
        """Detach from the producer, stop the heartbeat, unmap the ring. Safe to call twice.
        ``failure``: the job leaves because of this error (the other ranks of its group are told)."""
        if self._session is not None:  # kept: its figures (batch_size, len(), ...) stay readable
            self._session.close(timeout=self.batch_timeout, failure=failure)

    def __enter__(self) -> "DaliShareIterator":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failure=f"{kind.__name__}: {error}" if kind is not None and not issubclass(kind, GroupBroken) else "")

    # -- reading a cache: NOTE [ Cache protocol ] in producer/filling.py --------------------------

    def _cached_pass(self):
        """One epoch of this job's own from the cache, batch by batch; it counts (``EpochDone``)
        when it ends or is left."""
        session = self._session
        if self._resume_at is not None and self._resume_at[1] >= self._pass_length(session):
            self._passes_read, self._resume_at = self._resume_at[0] + 1, None  # saved after its last batch
        limit = session.producer_epochs
        if limit and self._passes_read >= limit:
            session.stop_reason = session.stop_reason or f"finished {limit} epochs"
            return
        if not session.producer_serves(self.reconnect):
            if self.reconnect and session.lost:
                self._reconnect()
            return
        self.epoch = self._passes_read
        self._count_excluded()
        if self._splits(session):
            indices, padded = self._my_share(session, self.epoch)
            start = self._resume_position(len(indices))
            batches = self._shared_batches(indices, padded, start)
        else:
            order = epoch_order(session.cache.layout.samples, self._order_seed(session), self.epoch)
            start = self._resume_position(len(order))
            batches = self._cached_batches(order, start)
        self._progress.begin(self.epoch, start)
        try:
            if (yield from self._hand_out(batches)):
                self._progress.epoch_read(self.epoch)
        except GeneratorExit:  # left (a break): the next pass is the next epoch, in the state too
            self._progress.epoch_read(self.epoch)
            raise
        finally:
            self._passes_read += 1
            session.epoch_done(self._passes_read)
        if self.reconnect and session.lost:
            self._reconnect()

    def _pass_length(self, session: Session) -> int:
        """Positions in each of this job's passes over the cache (its order, or its share of it)."""
        return len(self._my_share(session, 0)[0]) if self._splits(session) else session.cache.layout.samples

    def _resume_position(self, length: int) -> int:
        """Where this pass starts in an order of ``length``: 0, or where a loaded state left it."""
        if self._resume_at is None:
            return 0
        (epoch, position), self._resume_at = self._resume_at, None
        return position if epoch == self.epoch and position < length else 0

    def _hand_out(self, batches):
        """Yield the batches of a pass from ``batches`` (``(indices, padded, position)`` items; it
        returns whether it read its order to the end), recording each position; return that."""
        session, cache = self._session, self._session.cache
        while True:
            try:
                indices, padded, position = next(batches)
            except StopIteration as end:
                return end.value
            labels = torch.from_numpy(cache.labels[indices].astype(np.int64))
            if self._target.type != "cpu":
                labels = labels.pin_memory().to(self._target, non_blocking=True)
            batch = {"images": cache.gather(indices, session.sample_shape, session.dtype, self._target),
                     "labels": labels, "indices": torch.from_numpy(indices)}
            if padded is not None:
                batch["padded"] = torch.from_numpy(padded)
            if self.augment is not None:
                batch = self.augment(batch)
            self._progress.handed_out(self.epoch, position)
            session.read += len(indices)
            yield batch
            del batch

    def _order_seed(self, session: Session) -> int:
        return session.producer_seed if self.seed is None else self.seed

    def _splits(self, session: Session) -> bool:
        """Whether this job reads a share of each epoch: it is a rank of a group, or its producer
        serves one node's shard."""
        return self.member is not None or session.shard[1] > 1

    def _my_share(self, session: Session, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This job's samples of ``epoch`` and which are padding: the node's share of the producer's
        order (``--shard``), then this rank's share of that (``group``), DistributedSampler's cuts
        (wire/order.py). Excluded files stay in: every rank and node must cut the same order; they
        are replaced by repeats when read."""
        order = epoch_order(session.cache.layout.samples, self._order_seed(session), epoch)
        padded = np.zeros(len(order), dtype=bool)
        index, shards = session.shard
        if shards > 1:
            order, padded = share(order, index, shards, self.drop_last)
        if self.member is not None:
            order, padded = share(order, self.member.rank, self.member.world, self.drop_last, padded)
        return order, padded

    def _shared_batches(self, indices: np.ndarray, padded: np.ndarray, first: int = 0):
        """(indices, padded, position after it) of each batch of a share from position ``first``:
        waits for samples not cached yet; an excluded sample is replaced by a repeat of a readable
        one of the batch (or the one before), flagged as padding, so every rank still gets the same
        count. Returns whether it read the share to its end (not if the producer stopped first)."""
        session, marks, size = self._session, self._session.cache.marks, self.batch_size
        before = indices[:first][marks[indices[:first]] == Mark.VALID]  # resumed at ``first``: what came before
        stand_in = int(before[-1]) if before.size else -1  # the last readable sample: an all-excluded batch repeats it
        next_check = time.monotonic() + PRODUCER_POLL_S
        for start in range(first, len(indices), size):
            chunk, flags = indices[start : start + size].copy(), padded[start : start + size].copy()
            while (missing := np.flatnonzero(marks[chunk] == Mark.MISSING)).size:
                if not session.await_sample(int(chunk[missing[0]]), self.batch_timeout, self.reconnect):
                    return False
            excluded = marks[chunk] == Mark.EXCLUDED
            readable = chunk[~excluded]
            stand_in = int(readable[0]) if readable.size else stand_in
            if excluded.any():
                if stand_in < 0:
                    raise DatasetError(f"job {self.job_id}: none of the samples before its batch at {start} of "
                                       f"epoch {self.epoch} can be decoded, so there is nothing to repeat in their place")
                chunk[excluded], flags[excluded] = stand_in, True
            stand_in = int(chunk[-1])
            if time.monotonic() >= next_check:  # the producer's Stop, failure or death, or the group's loss
                if not session.producer_serves(self.reconnect):
                    return False
                self._count_excluded()
                next_check = time.monotonic() + PRODUCER_POLL_S
            yield chunk, flags, start + len(chunk)
        return True

    def _count_excluded(self) -> None:
        """The files the producer excluded so far (the fill finds them), and so the epoch's size."""
        cache = self._session.cache
        self._counters.excluded = cache.excluded()
        if not self._splits(self._session):  # a share keeps its size: excluded samples are replaced by repeats
            self._session.samples_per_epoch = cache.layout.samples - self._counters.excluded

    def _cached_batches(self, order: np.ndarray, pos: int = 0):
        """(sample indices, None, position after them) of each batch of ``order`` from position
        ``pos``: full batches of VALID samples, excluded ones skipped, the last one smaller; waits for
        samples not cached yet. Returns whether it read the order to its end (not if the producer
        stopped first)."""
        session, marks, size = self._session, self._session.cache.marks, self.batch_size
        parts, have = [], 0
        next_check = time.monotonic() + PRODUCER_POLL_S
        while pos < len(order):
            got, pos, missing = take(marks, order, pos, size - have)
            parts.append(got)
            have += len(got)
            if have == size:
                yield np.concatenate(parts), None, pos
                parts, have = [], 0
            if missing >= 0:
                if not session.await_sample(missing, self.batch_timeout, self.reconnect):
                    return False
            elif time.monotonic() >= next_check:  # the producer's Stop, failure or death, while reading
                if not session.producer_serves(self.reconnect):
                    return False
                self._count_excluded()
                next_check = time.monotonic() + PRODUCER_POLL_S
        self._count_excluded()
        if have:
            yield np.concatenate(parts), None, pos
        return True

    # -- rebatching ----------------------------------------------------------------------------

    def _next_batch(self) -> dict | None:
        self._session.give_back()
        while True:
            try:
                batch = self._assemble()
                if batch is not None:
                    self._session.window.stepped()
                return batch
            except SlotReused as exc:  # suspended while reading: the batch is lost, go on after it
                lost = self._session.rebatcher.current
                if lost is not None:  # nothing more comes from it: its views alone decide when it goes back
                    self._session.window.consumed(lost.seq)
                self._session.rebatcher.lose_current()
                self._counters.missed += exc.lost
                self._session.await_suspension(self.batch_timeout)

    def _reading(self) -> bool:
        """Whether a producer batch of this pass is being read, beginning the next one if needed."""
        session, rebatcher = self._session, self._session.rebatcher
        while True:
            if rebatcher.epoch_over:
                return False
            if rebatcher.current is None and session.begin_next(self.epoch, self.batch_timeout,
                                                                self.reconnect) is None:
                rebatcher.end_epoch()
                if self.reconnect and session.lost:
                    self._reconnect()
                return False
            if self._resume_at is None or not self._skip_read_before_resume():
                return True

    def _skip_read_before_resume(self) -> bool:
        """After load_state_dict on the ring: give back, unread, the samples of the producer batch
        being begun that the job had been given before it restarted. True if that was all of it."""
        rebatcher = self._session.rebatcher
        msg = rebatcher.current
        epoch, position = self._resume_at
        if msg.epoch != epoch:  # the producer is past that epoch (or is another, counting afresh)
            self._resume_at = None
            return False
        skip = min(position - msg.start - rebatcher.offset, rebatcher.remaining)
        if skip <= 0:
            self._resume_at = None
            return False
        self._finish(rebatcher.take(skip))
        return rebatcher.current is None

    def _ring_position(self) -> int:
        """Samples of the producer's epoch order up to the end of the last piece taken."""
        rebatcher = self._session.rebatcher
        last = rebatcher.last
        if last is None:
            return 0
        return last.start + (rebatcher.offset if rebatcher.current is not None else last.count)

    def _assemble(self) -> dict | None:
        session, rebatcher = self._session, self._session.rebatcher
        if self.member is not None:
            return self._assemble_share()
        if not self._reading():
            return None
        if rebatcher.next_is_view():  # inside one producer batch: a view
            piece = rebatcher.take(self.batch_size)
            images, labels, indices = self._tensors(piece)
            padded = piece_padded(piece)
            if images.device != self._target:
                images = images.to(self._target)  # one copy: to the CPU (synchronous), another GPU, or a GPU
            elif self.copy:
                images = images.clone()
            else:  # a view with a storage of its own, so the window knows while it is referenced
                images, lease = leased_view(session.ring, piece.msg.slot, piece.offset * self._sample_bytes,
                                            (piece.count, *session.sample_shape), session.dtype, session.ring_device)
                session.window.viewed(piece.msg.seq, lease)
            self._finish(piece)
        else:  # spans producer batches: assemble into a tensor this job owns, up to the epoch's end
            size = self.batch_size
            images = torch.empty((size, *session.sample_shape), dtype=session.dtype, device=self._target)
            labels, indices = torch.empty(size, dtype=torch.int64), torch.empty(size, dtype=torch.int64)
            padded = torch.zeros(size, dtype=torch.bool)
            filled = 0
            while filled < size and self._reading():
                piece = rebatcher.take(size - filled)
                n = piece.count
                for out, part in zip((images, labels, indices, padded), (*self._tensors(piece), piece_padded(piece))):
                    out[filled : filled + n] = part
                # rewritten while we copied? (host rings; on a device ring the copy is only queued
                # here, and the GPU rule of NOTE [ Slot ownership ] is what protects it)
                if not session.ring.holds(piece.msg.slot, piece.msg.seq):
                    raise SlotReused(filled + n + piece.rest)
                filled += n
                self._finish(piece)
            if filled < size:  # the epoch (or the producer) ended first: a last, smaller batch
                images, labels, indices, padded = images[:filled], labels[:filled], indices[:filled], padded[:filled]
        if self._target.type != "cpu":  # pinned and non-blocking: a plain copy would wait for the GPU
            labels = labels.pin_memory().to(self._target, non_blocking=True)
        batch = {"images": images, "labels": labels, "indices": indices}
        if session.shard[1] > 1:  # a sharded producer's repeats, flagged as a group's are
            batch["padded"] = padded
        return batch

    def _assemble_share(self) -> dict | None:
        """A group rank's batch from the ring: its positions of the epoch (p % world == rank, as
        DistributedSampler takes them) out of the producer batches, copied into tensors it owns.
        The tail is evened out with a flagged repeat of its last sample, or dropped (``drop_last``)."""
        session, rebatcher, member = self._session, self._session.rebatcher, self.member
        size = self.batch_size
        images = torch.empty((size, *session.sample_shape), dtype=session.dtype, device=self._target)
        labels, indices = torch.empty(size, dtype=torch.int64), torch.empty(size, dtype=torch.int64)
        padded = torch.zeros(size, dtype=torch.bool)
        filled = 0
        while filled < size and self._share_read < self._share_target and self._reading():
            msg, first = rebatcher.current, rebatcher.offset
            mine = range(first + (member.rank - msg.start - first) % member.world, msg.count, member.world)
            chosen = mine[: min(size - filled, self._share_target - self._share_read)]
            end = chosen[-1] + 1 if 0 < len(chosen) < len(mine) else msg.count  # all of mine here: the whole rest
            piece = rebatcher.take(end - first)
            if chosen:
                # every world-th sample: a strided view, copied in one go (index_select is ~50x slower on uint8)
                rows, n = slice(chosen[0] - piece.offset, chosen[-1] - piece.offset + 1, member.world), len(chosen)
                for out, part in zip((images, labels, indices, padded), (*self._tensors(piece), piece_padded(piece))):
                    out[filled : filled + n].copy_(part[rows])  # padded: the node's repeats (a sharded producer)
                if not session.ring.holds(piece.msg.slot, piece.msg.seq):  # rewritten while we copied (host ring)
                    raise SlotReused(filled + n + piece.rest)
                filled, self._share_read = filled + n, self._share_read + n
            self._finish(piece)
        epoch_read = rebatcher.current is None and rebatcher.last is not None and rebatcher.last.last
        if epoch_read and filled < size and self._share_read < self._share_target:  # the tail: repeats
            pads = min(size - filled, self._share_target - self._share_read)
            source = (images[filled - 1], labels[filled - 1], indices[filled - 1]) if filled else self._last_sample
            if source is None:
                raise DatasetError(f"job {self.job_id}: rank {member.rank} of {member.world} got no sample of epoch "
                                   f"{self.epoch} to repeat: the epoch has fewer samples than the group has ranks")
            for out, value in zip((images, labels, indices), source):
                out[filled : filled + pads] = value
            padded[filled : filled + pads] = True
            filled, self._share_read = filled + pads, self._share_read + pads
        if not filled:
            return None
        self._last_sample = (images[filled - 1].clone(), labels[filled - 1].clone(), indices[filled - 1].clone())
        images, labels, indices, padded = images[:filled], labels[:filled], indices[:filled], padded[:filled]
        if self._target.type != "cpu":
            labels = labels.pin_memory().to(self._target, non_blocking=True)
        return {"images": images, "labels": labels, "indices": indices, "padded": padded}

    @property
    def _sample_bytes(self) -> int:
        return math.prod(self._session.sample_shape) * self._session.dtype.itemsize

    def _tensors(self, piece: Piece):
        session = self._session
        return piece_tensors(session.slot_tensors[piece.msg.slot], piece, session.sample_shape, session.dtype)

    def _finish(self, piece: Piece) -> None:
        """If ``piece`` ended its producer batch, that batch is given back as soon as no view of it
        is in use (keep.py)."""
        if piece.rest:
            return
        self._session.window.consumed(piece.msg.seq)
        self._session.give_back()

    def _skip_rest_of_epoch(self) -> None:
        """A new pass starts a new epoch: release what is left of an abandoned one."""
        self._session.give_back()
        rebatcher = self._session.rebatcher
        while self._reading():
            self._finish(rebatcher.take(rebatcher.remaining))
