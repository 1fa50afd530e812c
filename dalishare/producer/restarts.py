"""When to restart a failed stage worker, and when to give up. Plain Python, unit-tested.

A failure that some files explain (the probes blamed them; they are excluded) is the data's fault:
the worker restarts at once and the failure does not count. A failure that nothing explains (the
GPU is gone, the stage itself is broken, memory is short, someone killed the worker) counts: the
restart waits RESTART_BACKOFF_S, doubling with each such failure in a row, and after
MAX_UNEXPLAINED_FAILURES in a row the producer stops with the last reason. A filled batch ends a row.
"""

from __future__ import annotations

from ..intervals import RESTART_BACKOFF_S

MAX_UNEXPLAINED_FAILURES = 4
"""Unexplained stage worker failures in a row (no batch filled between) before the producer gives up."""


class CrashLoop:
    def __init__(self, limit: int = MAX_UNEXPLAINED_FAILURES, backoff: float = RESTART_BACKOFF_S):
        self.limit, self.backoff = limit, backoff
        self.in_a_row = 0  # unexplained failures since the last filled batch

    def failed(self, explained: bool) -> float | None:
        """The pause before the next worker starts, or None: give up."""
        if explained:
            return 0.0
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            return None
        return self.backoff * 2 ** (self.in_a_row - 1)

    def succeeded(self) -> None:
        self.in_a_row = 0


def judge(probed: list[int], failures: dict[int, str], stage_works: bool, unreadable: set[int] = frozenset()
          ) -> dict[int, str]:
    """The culprits of a probe round: the ``probed`` files that failed alone. ``stage_works``: a
    control file decoded in the same round, so the failures are the files' own. Without that proof,
    a round where every file that could be read failed to decode blames the stage, not the files (a
    stage that fails on everything explains nothing about them). A file that cannot be read (gone,
    empty) is always its own fault."""
    culprits = {i: why for i, why in failures.items() if i in probed}
    if stage_works:
        return culprits
    decoded = [i for i in probed if i not in unreadable]
    if len(decoded) > 1 and all(i in failures for i in decoded):
        return {i: why for i, why in culprits.items() if i in unreadable}
    return culprits
