"""Rates over a sliding window, from running totals sampled now and then (decoded samples, a job's
samples read): what status, metrics and serve's own line show as per-second figures."""

from __future__ import annotations

import time
from collections import deque

from ..intervals import STATUS_RATE_WINDOW_S


class Rate:
    """Per second over the last ``window`` seconds of a total that only grows."""

    def __init__(self, window: float = STATUS_RATE_WINDOW_S):
        self.window = window
        self.total = 0
        self._points: deque[tuple[float, int]] = deque()  # (monotonic s, total), oldest first

    def update(self, total: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.total = max(self.total, total)
        self._points.append((now, self.total))
        while len(self._points) > 2 and self._points[1][0] <= now - self.window:
            self._points.popleft()  # keep one point at or before the window's start

    def per_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if len(self._points) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._points[0], self._points[-1]
        if now - t1 > self.window:  # nothing new for a whole window: idle
            return 0.0
        return (n1 - n0) / max(now - t0, t1 - t0, 1e-9) if n1 > n0 else 0.0
