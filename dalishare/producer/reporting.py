"""What ``dalishare serve`` prints about itself: on a terminal, a live line under the log (rate,
epoch progress, jobs); otherwise a status log line every STATUS_LOG_INTERVAL_S. ``--log-format
json`` writes every log record as one JSON object per line, status lines with their figures."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

from rich.text import Text

from ..intervals import STATUS_LOG_INTERVAL_S
from ..wire.messages import StatusReport

log = logging.getLogger("dalishare.status")


def summary(report: StatusReport) -> str:
    """One line: where the producer is, how fast it decodes, and how fast each job reads."""
    if report.phase != "serving":
        return f"{report.name}: {report.phase}"
    if report.epoch >= 0:
        where = f"epoch {report.epoch} {100 * report.epoch_position / max(report.epoch_size, 1):.0f}%"
    else:
        where = f"cache {report.cached}/{report.samples}"
    slots = f" | slots {report.slots_in_use}/{report.slots}" if report.slots else ""
    rates = ", ".join(f"{job['images_per_s']:.0f}" + ("*" if job["paces"] else "") for job in report.jobs)
    jobs = f"{len(report.jobs)} jobs" + (f" at {rates} img/s" if report.jobs else "")
    pace = " (* sets the pace)" if any(job["paces"] for job in report.jobs) else ""
    return f"{report.name}: {where} | decoding {report.decode_per_s:.0f} img/s{slots} | {jobs}{pace}"


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: time, level, logger, message, and a status line's figures."""

    def format(self, record: logging.LogRecord) -> str:
        body = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if getattr(record, "status", None) is not None:
            body["status"] = record.status
        if record.exc_info:
            body["error"] = self.formatException(record.exc_info)
        return json.dumps(body)


class StatusOutput:
    """Takes each fresh report from the serve loop (``Producer.on_status``)."""

    def __init__(self, console=None, interval: float = STATUS_LOG_INTERVAL_S):
        """``console``: a rich Console on a terminal (the log goes through it too) for the live line;
        None: status log lines every ``interval`` seconds."""
        self._live = None
        self._interval, self._next_log = interval, time.monotonic() + interval
        if console is not None:
            from rich.live import Live

            self._live = Live("", console=console, auto_refresh=False, transient=True)
            self._live.start()

    def __call__(self, report: StatusReport) -> None:
        if self._live is not None:
            self._live.update(Text(summary(report)), refresh=True)  # plain: no markup, no highlighting
            return
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + self._interval
            log.info("%s", summary(report), extra={"status": dataclasses.asdict(report)})

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
