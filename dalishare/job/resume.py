"""Where a job is in its epochs, as ``state_dict()`` saves it and ``load_state_dict()`` takes it
back (torchdata's Stateful convention: a plain dict that ``torch.save`` and Lightning checkpoints
carry).

The state follows torchdata's ``StatefulDataLoader``: it is the job's last pass at its position,
whether that pass is still running or was left by ``break``. A job that reads some batches, breaks,
saves its state and dies, and a job that loads it, together read the epoch once (a cache: exactly;
the ring: as said below). Without ``load_state_dict`` a new pass of the same job (``iter()`` again)
starts the next epoch, as it always has, and a pass left by a break still counts as one of the
producer's ``--epochs`` (``EpochDone``) and in the state's ``passes``. Only a pass that read its
epoch to the end moves the state on, to the next epoch's start.

A position is (epoch, samples of that epoch's order behind the job). What it means depends on what
the producer serves:

- a cache: the job's own order (the producer's, its ``seed=``, or its share in a group or shard),
  so a resumed job reads on exactly from the next sample it had not been given;
- the ring: the producer's order of that epoch, which the producer keeps streaming while the job is
  away. A resumed job in the same producer epoch skips what it had been given (none of it twice);
  what was served while it was away is missed for that epoch; a later epoch starts as usual.

A training loop that takes batches ahead of the step it runs (Lightning fetches one ahead when it
cannot tell the loader's length) passes ``taken_ahead``: the state then leaves those batches
unread, so they are read again after a resume instead of lost.
"""

from __future__ import annotations

import logging
from collections import deque

from ..errors import ConfigError

log = logging.getLogger(__name__)

STATE_VERSION = 1
_SAME_DATA = ("dataset", "samples", "stage", "output", "seed", "shards")  # fingerprint keys a position depends on


class Progress:
    """The position after each batch handed out, the last ``taken_ahead + 1`` of them kept."""

    def __init__(self, taken_ahead: int):
        if taken_ahead < 0:
            raise ValueError(f"taken_ahead must be 0 or more, got {taken_ahead}")
        self._points: deque[tuple[int, int]] = deque([(0, 0)], maxlen=taken_ahead + 1)  # oldest first

    def begin(self, epoch: int, position: int) -> None:
        """A pass starts (or resumes) at ``position`` of ``epoch``; nothing of it handed out yet."""
        self._points.clear()
        self._points.append((epoch, position))

    def handed_out(self, epoch: int, position: int) -> None:
        """A batch went to the training loop; the job is now ``position`` samples into ``epoch``."""
        self._points.append((epoch, position))

    def epoch_read(self, epoch: int) -> None:
        """The pass of ``epoch`` read it to the end (the loop learns it like a batch, through its
        fetcher). Not for a pass left by a break: its state stays where the job stopped."""
        self._points.append((epoch + 1, 0))

    def saved(self) -> tuple[int, int]:
        """The position a resumed job starts from: the oldest kept (``taken_ahead`` batches back)."""
        return self._points[0]


def same_data(fingerprint: dict, other: dict) -> bool:
    """Whether two producers' fingerprints give positions the same meaning."""
    return all(fingerprint.get(k) == other.get(k) for k in (*_SAME_DATA, "source"))


def job_order(seed: int | None, world: int, drop_last: bool) -> dict:
    """What of the job itself a position depends on: its order (``seed=``) and its share of it (the
    group's size, ``drop_last``)."""
    return {"seed": seed, "group size": world, "drop_last": drop_last}


def make_state(progress: Progress, source: str, fingerprint: dict, job: dict, passes: int) -> dict:
    """``job``: `job_order` of this job."""
    epoch, position = progress.saved()
    return {"version": STATE_VERSION, "source": source, "epoch": epoch, "position": position, "job": job,
            "passes": passes, "fingerprint": {k: fingerprint.get(k) for k in _SAME_DATA}}


def check_state(state: dict, source: str, fingerprint: dict, job: dict) -> tuple[int, int]:
    """The (epoch, position) to resume from, or `ConfigError` naming why ``state`` cannot apply here.
    Saved from the other source (a cache, now a ring, or back): the position means another order,
    so the job starts the saved epoch afresh (a cache) or follows the producer (the ring)."""
    keys = {"version", "source", "epoch", "position", "job", "passes", "fingerprint"}
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or set(state) != keys \
            or not all(isinstance(state[k], dict) for k in ("job", "fingerprint")) \
            or not all(isinstance(state[k], int) for k in ("epoch", "position", "passes")):
        raise ConfigError(f"load_state_dict: not a dalishare iterator state of version {STATE_VERSION} "
                          f"(got {type(state).__name__} with version {getattr(state, 'get', dict().get)('version')!r}): "
                          f"pass what loader.state_dict() returned")
    saved = state["fingerprint"]
    for key in _SAME_DATA:
        if saved.get(key) != fingerprint.get(key):
            raise ConfigError(f"load_state_dict: the state was saved from a producer with another {key} "
                              f"({saved.get(key)!r}, now {fingerprint.get(key)!r}); a position in its epoch means "
                              f"nothing here: serve the same dataset, stage and --seed, or start without the state")
    for key, value in job.items():
        if state["job"].get(key) != value:
            raise ConfigError(f"load_state_dict: the state was saved by a job with {key} {state['job'].get(key)!r}, "
                              f"this one has {value!r}; its position is in that job's order or share: create the "
                              f"iterator with the same seed=, group size and drop_last=")
    epoch, position = int(state["epoch"]), int(state["position"])
    if state["source"] != source:
        log.warning("the state was saved from the producer's %s, which now serves a %s: epoch %d starts afresh",
                    state["source"], source, epoch)
        position = 0
    return epoch, position
