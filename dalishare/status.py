"""``dalishare status``: every producer of this user on the machine, asked over its control socket
(``StatusQuery`` -> ``StatusReport``: NOTE [ Control protocol ], Status, in wire/messages.py), shown
as tables (rich) or as JSON for scripts. A name whose lock nobody holds is a dead producer's
leftovers, shown with the ``dalishare cleanup`` hint."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from .intervals import STATUS_TIMEOUT_S
from .shm import names
from .wire.channel import JobChannel
from .wire.messages import Reject, StatusQuery, StatusReport


def query(name: str, timeout: float = STATUS_TIMEOUT_S) -> StatusReport | str:
    """The producer's report, or why there is none (a sentence)."""
    channel = JobChannel(names.endpoint(name))
    try:
        if not channel.send(StatusQuery(os.getpid())):
            return "its control socket takes no message (see its log)"
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if channel.wait(left * 1000):
                for msg in channel.receive():
                    if isinstance(msg, StatusReport):
                        return msg
                    if isinstance(msg, Reject):
                        return f"refused: {msg.reason}"
        if channel.dropped:
            return (f"it answered, but not in this dalishare's protocol ({channel.last_drop}): run the "
                    f"producer's dalishare version")
        return f"no answer within {timeout:g} s (busy or hung: see its log)"
    finally:
        channel.close(linger_ms=0)


def gather(name: str | None = None) -> list[dict]:
    """One entry per producer name: {"name", "state": serving | unresponsive | dead (it left files) |
    absent (asked by name, nothing there), "report" (a dict or None), "problem", "leftovers"}."""
    entries = []
    for each in [names.check_name(name)] if name else names.producer_names():
        if not names.is_served(each):
            left = names.leftovers(each)
            entries.append({"name": each, "state": "dead" if left else "absent", "report": None, "leftovers": left,
                            "problem": "no producer runs under this name" + (
                                f"; it left {len(left)} files: run `dalishare cleanup --name {each}`" if left else "")})
            continue
        answer = query(each)
        if isinstance(answer, StatusReport):
            entries.append({"name": each, "state": "serving", "report": dataclasses.asdict(answer), "problem": "",
                            "leftovers": []})
        else:
            entries.append({"name": each, "state": "unresponsive", "report": None, "problem": answer,
                            "leftovers": []})
    return entries


def _progress(report: dict) -> str:
    if report["phase"] != "serving":
        return report["phase"]
    if report["epoch"] >= 0:
        size = max(report["epoch_size"], 1)
        return f"epoch {report['epoch']}: {100 * report['epoch_position'] / size:.0f}% fed"
    return "each job at its own pace"


def render(entries: list[dict]) -> Group:
    """One table per producer: its figures, then a row per job."""
    if not entries:
        return Group(f"no dalishare producers of this user (runtime dir {names.runtime_dir()})")
    parts = []
    for entry in entries:
        report = entry["report"]
        if report is None:
            parts.append(f"[bold]{entry['name']}[/bold]: {entry['state']}: {escape(entry['problem'])}")
            continue
        cache = f"{report['cached']}/{report['samples']} cached" if report["cached"] >= 0 else "no cache"
        ring = f"{report['slots_in_use']}/{report['slots']} slots in use" if report["slots"] else ""
        head = (f"[bold]{report['name']}[/bold] (pid {report['pid']}, up {report['uptime_s']:.0f} s): "
                f"{escape(report['stage'])} on {report['device']}, {escape(report['data'])} ({report['samples']} samples, "
                f"{report['classes']} classes), {report['output'] or 'starting'} {report['sample']}\n"
                f"  {_progress(report)}; {cache}; {ring + '; ' if ring else ''}decoding "
                f"{report['decode_per_s']:.0f} img/s ({report['decoded']} so far); {report['excluded']} excluded; "
                f"{report['worker_restarts']} worker restarts; {report['dropped_messages']} messages dropped")
        table = Table(show_edge=False, pad_edge=False)
        for column in ("job", "pid", "group", "state", "batch", "epoch", "img/s", "read", "behind", "holds", "pace"):
            table.add_column(column, justify="right" if column not in ("group", "state", "pace") else "left")
        for job in sorted(report["jobs"], key=lambda j: (j["group"], j["rank"], j["id"])):
            group = f"{job['group']} {job['rank']}/{job['world']}" if job["group"] else ""
            table.add_row(str(job["id"]), str(job["pid"]), group, job["state"], str(job["batch_size"]),
                          str(job["epoch"]), f"{job['images_per_s']:.0f}", str(job["read"]), str(job["behind"]),
                          str(job["holds"]), "sets the pace" if job["paces"] else "")
        parts += [head, table if report["jobs"] else "  no jobs attached"]
    return Group(*parts)


def run(name: str | None, as_json: bool, watch: float | None) -> None:
    """Print once, or with ``watch`` refresh every that many seconds until interrupted."""
    if as_json:
        try:
            while True:
                print(json.dumps(gather(name)), flush=True)  # one JSON document per line with --watch
                if watch is None:
                    return
                time.sleep(watch)
        except KeyboardInterrupt:
            return
    console = Console() if sys.stdout.isatty() else Console(width=160)  # a pipe or file: don't cut columns
    if watch is None:
        console.print(render(gather(name)))
        return
    try:
        with Live(render(gather(name)), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(watch)
                live.update(render(gather(name)), refresh=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how --watch ends
