"""How a job cuts the producer's batches into batches of its own size. Plain Python: no tensors.

Producer batches arrive in order. A job batch takes ``batch_size`` samples from them: it is a
*view* when it lies inside the producer batch being read (or is the rest of the epoch's last one),
otherwise a *copy* assembled from pieces of consecutive producer batches, cut short where the
epoch ends. After a suspension the next producer batch may not follow the last one: the samples in
between are counted as missed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..wire.messages import Batch


@dataclass(frozen=True)
class Piece:
    """Samples ``offset .. offset+count-1`` of producer batch ``msg``."""

    msg: Batch
    offset: int
    count: int

    @property
    def rest(self) -> int:
        """Samples of ``msg`` after this piece."""
        return self.msg.count - self.offset - self.count


class Rebatcher:
    """Where the job is in the producer's stream: the producer batch being read and how far."""

    def __init__(self, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.batch_size = batch_size
        self.current: Batch | None = None  # the producer batch being read; None between batches
        self.offset = 0                    # samples of ``current`` already taken
        self.epoch_over = True             # no more samples in this pass; cleared by begin_epoch()
        self.last: Batch | None = None     # the last producer batch begun, to count what was skipped

    @property
    def remaining(self) -> int:
        return self.current.count - self.offset if self.current is not None else 0

    def begin_epoch(self) -> None:
        self.epoch_over = False

    def end_epoch(self) -> None:
        """The pass ends early: the producer stopped, or the next batch is of another epoch (the
        epoch's last samples could not be decoded, so no batch was marked last)."""
        self.epoch_over = True

    def start(self, msg: Batch) -> int:
        """Begin reading ``msg``; returns how many samples were skipped since the last batch begun
        (after a suspension: samples of this and of whole epochs in between)."""
        last, self.last = self.last, msg
        self.current, self.offset = msg, 0
        if last is None:
            return 0
        if msg.epoch == last.epoch:
            missed = msg.start - (last.start + last.count)
        else:
            missed = (last.epoch_size - (last.start + last.count) + msg.start
                      + (msg.epoch - last.epoch - 1) * msg.epoch_size)
        return max(missed, 0)

    def next_is_view(self) -> bool:
        """Whether the next job batch lies inside the producer batch being read."""
        return self.remaining >= self.batch_size or self.current.last

    def take(self, n: int) -> Piece:
        """The next ``n`` samples (at most what remains of the current producer batch). Taking its
        last sample ends the batch, and the epoch if it was the epoch's last."""
        piece = Piece(self.current, self.offset, min(n, self.remaining))
        self.offset += piece.count
        if not self.remaining:
            self.epoch_over = self.epoch_over or self.current.last
            self.current = None
        return piece

    def lose_current(self) -> None:
        """The batch being read was taken away (a suspension): go on after it."""
        self.current = None
