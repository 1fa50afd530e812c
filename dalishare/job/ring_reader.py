"""`RingReader`: a job's batches from the producer's ring, one producer epoch per pass.

The producer announces each slot it fills (NOTE [ Control protocol ], wire/messages.py) and a
`Rebatcher` cuts those producer batches into batches of the job's size. One code path cuts a whole
epoch and a group rank's share: a share is positions p with p % world == rank of the epoch's stream
(wire/order.share's rule, `share_size` of them), a whole epoch is share 0 of 1 with no limit. A
batch of a whole epoch that lies inside one producer batch is a view of the ring (no copy); any
other batch is copied into tensors the job owns, from pieces of consecutive producer batches. A
share the epoch ends short of is evened out with flagged repeats of the rank's last sample (the
ring no longer holds the epoch's first samples, which DistributedSampler would repeat), or cut
(``drop_last``). When a slot may be given back: NOTE [ Slot ownership ] (shm/__init__.py), keep.py.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from ..errors import BatchHeldTooLong, DatasetError, SlotReused
from ..wire.messages import Batch
from .group import check_same_epoch
from .reading import ReadOptions, labels_to, share_size, target_device
from .rebatch import Piece, Rebatcher
from .views import leased_view, piece_padded, piece_tensors, slot_tensors

log = logging.getLogger(__name__)


class RingReader:
    """Reads the producer's stream through ``ring`` (mapped from the ``Welcome``) for ``session``."""

    source = "ring"
    passes = 0  # the producer counts the ring's epochs; a job keeps no count of its own

    def __init__(self, session, ring, options: ReadOptions):
        self.session, self.ring, self.options = session, ring, options  # the ring is closed by open_reader if this fails
        self.slot_tensors, self.device = slot_tensors(ring)
        self.target = target_device(options.device, self.device)
        # own copies unless asked otherwise where the ring is writable (GPU memory: a job writing into
        # a view would change every job's batch); a host ring is mapped read-only, so views are safe
        self.copies = options.copy if options.copy is not None else ring.device is not None
        self.rebatcher = Rebatcher(options.batch_size or session.producer_batch_size)
        self.batch_size = self.rebatcher.batch_size
        self.splits = options.member is not None or session.shard[1] > 1  # batches carry "padded"
        member = options.member
        self._rank, self._world = (member.rank, member.world) if member else (0, 1)  # a whole epoch: share 0 of 1
        # a rank of a job across sharded producers: its first pass checks that its peers start at its epoch
        self._same_epoch_due = member is not None and session.shard[1] > 1
        self.epoch_size = session.samples_per_epoch  # the whole epoch, as the last producer batch begun says
        self.epoch_read = False  # the pass ended with the epoch's last producer batch, all of it read
        self._epoch: int | None = None  # the epoch of the pass in progress
        self._limit: int | None = None  # a share: its samples this pass (fixed: the ranks agree); None: no limit
        self._read = 0                  # samples of the pass copied out, repeats included (a share: <= _limit)
        self._resume: tuple[int, int] | None = None  # (epoch, position) of a loaded state, until passed
        self._going_on = False  # the next pass goes on in the epoch of the pass left by a break (a loaded state)
        self._last_sample = None        # a share: its last sample (image, label, index), to repeat at the tail
        keep = session.window.keep
        if ring.layout.slots < keep + 2:
            log.warning("producer %r has %d slots: a job that uses keep=%d views at once needs %d; it will "
                        "get BatchHeldTooLong if it does (serve with more --slots, or lower keep)", session.name,
                        ring.layout.slots, keep, keep + 2)

    @property
    def samples_per_epoch(self) -> int:
        return share_size(self.epoch_size, self._world, self.options.drop_last)

    @property
    def position(self) -> int:
        """Samples of the producer's epoch order up to the end of the last piece taken."""
        rebatcher = self.rebatcher
        last = rebatcher.last
        if last is None:
            return 0
        return last.start + (rebatcher.offset if rebatcher.current is not None else last.count)

    def resume_point(self, epoch: int, position: int) -> tuple[int, int]:
        """Where a loaded state resumes: a group's ranks start together at an epoch's start."""
        return epoch, 0 if self.options.member is not None else position

    def leave_last_pass(self, resume: tuple[int, int] | None = None) -> bool:
        """A new pass starts a new epoch: give back what is left of one left by a break, unless
        ``resume`` (a state loaded since) is in that epoch: then the next pass goes on in it. False
        if the producer was lost meanwhile (``reconnect=True``: the caller reconnects)."""
        self.session.give_back()
        self._going_on = resume is not None and resume[0] == self._epoch and not self.rebatcher.epoch_over \
            and self.options.member is None  # a group's ranks start together at an epoch's start
        if not self._going_on:
            self._give_back_rest_of_epoch()
        return not (self.options.reconnect and self.session.lost)

    def _give_back_rest_of_epoch(self) -> None:
        while self._ensure_producer_batch():
            self._finish(self.rebatcher.take(self.rebatcher.remaining))

    def begin_pass(self, resume: tuple[int, int] | None) -> tuple[int, int] | None:
        """The pass reads the epoch of the next announcement, from its start (a late job: from
        there), or from ``resume`` in that epoch: samples before it are given back unread (all of
        them, for a state saved after its last sample: then the pass reads the next epoch)."""
        if self._going_on:  # a state of the pass left by a break was loaded: read on from there
            self._going_on, self._resume = False, resume
            return self._epoch, max(self.position, resume[1])
        while True:
            self.session.receive_all()  # a Suspended message may void the queued head
            head = self._peek()
            if head is None:
                return None
            if resume is None or resume[0] != head.epoch or resume[1] < head.epoch_size:
                break
            self._epoch, self._resume, resume = head.epoch, None, None  # that epoch was read to its end
            self.rebatcher.begin_epoch()
            self._give_back_rest_of_epoch()
        self._epoch, self.epoch_read = head.epoch, False
        if self._same_epoch_due:
            self._same_epoch_due = False
            check_same_epoch(head.epoch)
        self.rebatcher.begin_epoch()
        self._read, self._limit = 0, self.samples_per_epoch if self.options.member is not None else None
        self._resume = resume if resume is not None and resume[0] == head.epoch else None
        return head.epoch, max(head.start, self._resume[1]) if self._resume else head.start

    def next_batch(self) -> dict | None:
        """The pass's next batch, or None at its end. A batch lost to a suspension is skipped."""
        self.session.give_back()
        while True:
            try:
                batch = self._cut()
            except SlotReused as exc:  # suspended while reading: the batch is lost, go on after it
                lost = self.rebatcher.current
                if lost is not None:  # nothing more comes from it: its views alone decide when it goes back
                    self.session.window.consumed(lost.seq)
                self.rebatcher.lose_current()
                self.session.counters.missed += exc.lost
                self.session.await_suspension(self.options.batch_timeout)
                continue
            if batch is None:
                last = self.rebatcher.last
                self.epoch_read = self._read_last_batch() and last.epoch == self._epoch
            else:
                self.session.window.stepped()
            return batch

    def end_pass(self) -> None:
        """Nothing to count: what a pass left unread is given back when the next begins."""

    def unmap_device_memory(self) -> bool:
        """The producer stops: the rest of the batch being read is not read; the ring is unmapped."""
        ring = self.ring
        self.rebatcher.end_epoch()
        self.close()
        return ring is None or not ring.mapped

    def close(self) -> None:
        if self.ring is not None:
            self.slot_tensors = []
            self.ring.close()
            self.ring = None

    # -- cutting -----------------------------------------------------------------------------------

    def _cut(self) -> dict | None:
        if self._limit is None:  # a whole epoch
            if not self._ensure_producer_batch():
                return None
            if self.rebatcher.next_is_view():
                return self._view()
        return self._copy()

    def _view(self) -> dict:
        """The next batch, inside the producer batch being read: a view of the ring where it can be."""
        session, piece = self.session, self.rebatcher.take(self.batch_size)
        images, labels, indices = self._tensors(piece)
        if images.device != self.target:
            images = images.to(self.target)  # one copy: to the CPU (synchronous), another GPU, or a GPU
        elif self.copies:
            images = images.clone()  # on a GPU: one device-to-device copy, queued on the job's stream
        else:  # a view with a storage of its own, so the window knows while it is referenced
            sample_bytes = math.prod(session.sample_shape) * session.dtype.itemsize
            images, lease = leased_view(self.ring, piece.msg.slot, piece.offset * sample_bytes,
                                        (piece.count, *session.sample_shape), session.dtype, self.device)
            session.window.viewed(piece.msg.seq, lease)
        self._finish(piece)
        return self._batch(images, labels, indices, piece_padded(piece))

    def _copy(self) -> dict | None:
        """The next batch, copied from the pieces of producer batches that hold its samples, up to
        the epoch's end (a share: repeats make up its tail)."""
        session, size = self.session, self.batch_size
        out = (torch.empty((size, *session.sample_shape), dtype=session.dtype, device=self.target),
               torch.empty(size, dtype=torch.int64), torch.empty(size, dtype=torch.int64),
               torch.zeros(size, dtype=torch.bool))
        filled = 0
        while filled < size and (self._limit is None or self._read < self._limit) and self._ensure_producer_batch():
            piece, rows = self._take_mine(size - filled)
            n = len(range(rows.start, rows.stop, rows.step))
            if n:  # every world-th sample: a strided view, copied in one go (index_select is ~50x slower on uint8)
                for buffer, part in zip(out, (*self._tensors(piece), piece_padded(piece))):
                    buffer[filled : filled + n].copy_(part[rows])  # padded: a sharded producer's repeats
                # rewritten while we copied? (host rings; on a device ring the copy is only queued
                # here, and the GPU rule of NOTE [ Slot ownership ] is what protects it)
                if not self.ring.holds(piece.msg.slot, piece.msg.seq):
                    raise SlotReused(filled + n + piece.rest)
                filled, self._read = filled + n, self._read + n
            self._finish(piece)
        filled = self._repeat_tail(out, filled)
        if not filled:
            return None
        if self._limit is not None:
            self._last_sample = tuple(t[filled - 1].clone() for t in out[:3])
        return self._batch(*(t[:filled] for t in out))

    def _take_mine(self, want: int) -> tuple[Piece, slice]:
        """Take the producer batch being read up to this job's ``want`` next samples (the whole
        rest where it has fewer): the piece, and the rows of it that are this job's."""
        msg, first = self.rebatcher.current, self.rebatcher.offset
        mine = range(first + (self._rank - msg.start - first) % self._world, msg.count, self._world)
        chosen = mine[: want if self._limit is None else min(want, self._limit - self._read)]
        end = chosen[-1] + 1 if 0 < len(chosen) < len(mine) else msg.count  # all of mine here: the whole rest
        piece = self.rebatcher.take(end - first)
        if not chosen:
            return piece, slice(0, 0, 1)
        return piece, slice(chosen[0] - piece.offset, chosen[-1] - piece.offset + 1, self._world)

    def _repeat_tail(self, out: tuple, filled: int) -> int:
        """A share the epoch ended short of (its last producer batch read): fill its rest with
        flagged repeats of the rank's last sample, as far as the batch goes. Returns the samples in ``out``."""
        if self._limit is None or filled == len(out[0]) or self._read >= self._limit or not self._read_last_batch():
            return filled
        pads = min(len(out[0]) - filled, self._limit - self._read)
        source = tuple(t[filled - 1] for t in out[:3]) if filled else self._last_sample
        if source is None:
            member = self.options.member
            raise DatasetError(f"job {self.session.job_id}: rank {member.rank} of {member.world} got no sample of "
                               f"epoch {self._epoch} to repeat: the epoch has fewer samples than the group has ranks")
        for buffer, value in zip(out, source):
            buffer[filled : filled + pads] = value
        out[3][filled : filled + pads] = True
        self._read += pads
        return filled + pads

    def _batch(self, images, labels, indices, padded) -> dict:
        batch = {"images": images, "labels": labels_to(labels, self.target), "indices": indices}
        if self.splits:  # a share's repeats, or a sharded producer's, flagged
            batch["padded"] = padded
        return batch

    def _tensors(self, piece: Piece):
        session = self.session
        return piece_tensors(self.slot_tensors[piece.msg.slot], piece, session.sample_shape, session.dtype)

    def _finish(self, piece: Piece) -> None:
        """If ``piece`` ended its producer batch, that batch is given back as soon as no view of it
        is in use (keep.py)."""
        if piece.rest:
            return
        self.session.window.consumed(piece.msg.seq)
        self.session.give_back()

    def _read_last_batch(self) -> bool:
        """Whether the epoch's last producer batch has been read to its end."""
        last = self.rebatcher.last
        return self.rebatcher.current is None and last is not None and last.last

    # -- the stream ----------------------------------------------------------------------------

    def _ensure_producer_batch(self) -> bool:
        """Whether a producer batch of this pass is being read: when the last one is used up, waits
        for and begins the next, giving back unread what a resumed job already had. False once
        the epoch is over, the producer stopped, or it was lost (the session's ``lost`` says so)."""
        rebatcher = self.rebatcher
        while True:
            if rebatcher.epoch_over:
                return False
            if rebatcher.current is None and self._begin_next() is None:
                rebatcher.end_epoch()
                return False
            if self._resume is None or not self._skip_read_before_resume():
                return True

    def _begin_next(self) -> Batch | None:
        """Begin reading the next producer batch of the pass's epoch (waiting for it), or None when
        there is none: the producer stopped, or the next batch is of another epoch."""
        session = self.session
        session.releases.wait_below(2, self.options.batch_timeout)  # at most one given-back slot still read by the GPU
        head = self._peek()  # after taking in a Suspended, which voids queued announcements
        if head is None or head.epoch != self._epoch:
            return None
        msg = session.pending.popleft()
        session.taken = msg.seq
        missed = self.rebatcher.start(msg)
        if missed:
            session.counters.missed += missed
            log.warning("job %d continues at epoch %d sample %d: it missed %d samples while suspended "
                        "(%d in all)", session.job_id, msg.epoch, msg.start, missed, session.counters.missed)
        self.epoch_size, session.counters.excluded = msg.epoch_size, msg.excluded
        if not self.ring.holds(msg.slot, msg.seq):  # voided by a Suspended still on its way
            raise SlotReused(msg.count)
        session.counters.handoff_ns.append(time.monotonic_ns() - msg.sent_ns)
        return msg

    def _skip_read_before_resume(self) -> bool:
        """After load_state_dict: give back, unread, the samples of the producer batch being begun
        that the job had been given before it restarted. True if that was all of it."""
        rebatcher = self.rebatcher
        skip = min(self._resume[1] - rebatcher.current.start - rebatcher.offset, rebatcher.remaining)
        if skip <= 0:
            self._resume = None
            return False
        self._finish(rebatcher.take(skip))
        return rebatcher.current is None

    def _peek(self) -> Batch | None:
        """The next announcement (waiting for it), or None once the producer stopped or was lost.
        Before waiting: give back what we can, fail if we hold the whole ring ourselves, and tell
        the producer we wait (its stall policy: NOTE [ Slot ownership ])."""
        session = self.session
        session.receive_all()
        if not session.pending and not session.ended:
            session.give_back()
            held = session.window.held  # GPU reads in flight end by themselves; views in use do not
            if held >= self.ring.layout.slots:
                raise BatchHeldTooLong(
                    f"job {session.job_id} holds all {held} slots of producer {session.name!r} (views it still "
                    f"uses, keep={session.window.keep}), so no new batch can come: serve with more --slots "
                    f"(keep + 2 at least), hold fewer batches at once, `.clone()` them, or pass copy=True")
            session.heartbeat_now()
        session.wait_for_batch(self.options.batch_timeout, self.options.reconnect)
        return session.pending[0] if session.pending else None
