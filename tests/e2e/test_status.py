"""What a running producer shows of itself: ``dalishare status`` (table and JSON, over the control
socket), ``--metrics-port`` scraped over HTTP, serve's own status lines (JSON logs, the live line on
a terminal), and a dead producer's leftovers."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import N_SAMPLES as N, RESNET, Job, Server

pytestmark = pytest.mark.e2e


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dalishare", "status", *args], capture_output=True, text=True,
                          timeout=60)


def report_when(predicate, timeout: float = 60) -> dict:
    """The producer's JSON report once ``predicate(report)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        proc = status("t", "--json")
        assert proc.returncode == 0, proc.stderr
        (entry,) = json.loads(proc.stdout)
        if entry["report"] is not None and predicate(entry["report"]):
            return entry["report"]
        assert time.monotonic() < deadline, f"status never showed it; last: {entry}"
        time.sleep(0.3)


@contextlib.contextmanager
def killed_at_exit(*jobs: Job):
    """The jobs run for long; kill them however the test ends."""
    try:
        yield
    finally:
        for job in jobs:
            job.proc.kill()
            job.proc.wait(timeout=10)


@contextlib.contextmanager
def long_job(tmp_path):
    job = Job(tmp_path / "j.json", batch_size=5, passes=1000, sleep=0.005)
    with killed_at_exit(job):
        yield job


def test_status_shows_the_producer_its_jobs_their_rates_and_who_sets_the_pace(dataset, tmp_path):
    with Server(dataset, "--batch-size", "2", "--slots", "4") as server, contextlib.ExitStack() as stack:
        fast = Job(tmp_path / "fast.json", batch_size=3, passes=50, sleep=0.01)
        slow = Job(tmp_path / "slow.json", batch_size=2, passes=50, sleep=0.5)
        stack.enter_context(killed_at_exit(fast, slow))
        report = report_when(lambda r: len(r["jobs"]) == 2 and all(j["images_per_s"] > 0 for j in r["jobs"])
                             and [j["pid"] for j in r["jobs"] if j["paces"]] == [slow.proc.pid])  # the ring waits for it
        assert (report["name"], report["phase"], report["output"], report["samples"]) == ("t", "serving", "ring", N)
        assert report["stage"] == str(RESNET) and report["device"] == "cpu" and report["sample"] == "[224, 224, 3] uint8"
        assert report["slots"] == 4 and 1 <= report["slots_in_use"] <= 4 and report["epoch"] >= 0
        assert report["decoded"] > 0 and report["worker_restarts"] == 0 and report["cached"] == -1
        jobs = {j["pid"]: j for j in report["jobs"]}
        assert {jobs[fast.proc.pid]["batch_size"], jobs[slow.proc.pid]["batch_size"]} == {3, 2}
        table = status().stdout  # every producer, as a table
        assert "t (pid" in table and str(slow.proc.pid) in table and "sets the pace" in table
        assert str(fast.proc.pid) in table and "slots in use" in table
        server.stop()


def test_status_with_a_cache_shows_the_fill_and_each_jobs_own_epoch(dataset, tmp_path):
    with Server(dataset, "--batch-size", "4", "--cache", "memory") as server, contextlib.ExitStack() as stack:
        job = stack.enter_context(long_job(tmp_path))
        report = report_when(lambda r: r["jobs"] and r["jobs"][0]["epoch"] >= 2 and r["jobs"][0]["read"] >= 2 * N)
        assert report["cached"] == N and report["output"] == "cache memory" and report["slots"] == 0
        (row,) = report["jobs"]
        assert row["pid"] == job.proc.pid and row["read"] >= 2 * N and not row["paces"] and row["behind"] == 0
        server.stop()


def test_metrics_are_scraped_over_http_on_localhost_with_the_status_figures(dataset, tmp_path):
    with Server(dataset, "--batch-size", "4", "--cache", "memory", "--metrics-port", "0") as server, \
            contextlib.ExitStack() as stack:
        job = stack.enter_context(long_job(tmp_path))
        report_when(lambda r: len(r["jobs"]) == 1 and r["jobs"][0]["images_per_s"] > 0)
        port = int(re.search(r"Prometheus at http://127\.0\.0\.1:(\d+)/metrics", server.log()).group(1))
        deadline = time.monotonic() + 30
        rate = rf'^dalishare_job_images_per_second\{{.*pid="{job.proc.pid}".*\}} ([0-9.e+]+)$'
        while True:  # the exporter's snapshot is refreshed every second
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            if (found := re.search(rate, text, re.M)) and float(found.group(1)) > 0:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert re.search(r'^dalishare_jobs\{name="t"\} 1\.0$', text, re.M), text
        assert re.search(rf'^dalishare_dataset_samples\{{name="t"\}} {N}\.0$', text, re.M), text
        assert re.search(rf'^dalishare_cache_samples\{{name="t"\}} {N}\.0$', text, re.M)
        assert re.search(r'^dalishare_decoded_samples_total\{name="t"\} [1-9]', text, re.M)
        assert re.search(rf'^dalishare_producer_info\{{.*source="folders {re.escape(str(dataset))}".*\}} 1\.0$', text, re.M), text
        assert f"Prometheus at http://127.0.0.1:{port}/metrics" in server.log()
        listening = {line.split()[1] for line in open("/proc/net/tcp").read().splitlines()[1:]
                     if line.split()[3] == "0A"}  # state LISTEN: local address:port in hex
        assert f"0100007F:{port:04X}" in listening and f"00000000:{port:04X}" not in listening  # 127.0.0.1 only
        server.stop()


def test_json_logs_carry_periodic_status_lines(dataset, tmp_path):
    with Server(dataset, "--batch-size", "4", "--cache", "memory", "--log-format", "json",
                "--status-interval", "0.5") as server, contextlib.ExitStack() as stack:
        stack.enter_context(long_job(tmp_path))
        deadline = time.monotonic() + 60
        while len(re.findall(r'"status": \{.*"jobs": \[\{', server.log())) < 2:  # two lines, a job attached
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        server.stop()
    records = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    lines = [r for r in records if "status" in r]
    assert len(lines) >= 2 and lines[-1]["status"]["name"] == "t" and "decoding" in lines[-1]["message"]
    assert any(r["message"].startswith("stopping 't'") for r in records)


def test_serve_on_a_terminal_keeps_a_live_status_line(dataset, tmp_path):
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dalishare", "serve", str(RESNET), "--data", str(dataset),
                             "--name", "t", "--cache", "memory"], stdin=child, stdout=child, stderr=child)
    os.close(child)
    seen, deadline = b"", time.monotonic() + 60
    try:
        while b"t: cache 0/30 | decoding 0 img/s | 0 jobs" not in seen:  # it waits for a job to fill
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
            if select.select([main], [], [], 0.2)[0]:
                seen += os.read(main, 65536)
    finally:
        proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < end:  # keep draining: a full pty blocks its writer
            if select.select([main], [], [], 0.2)[0]:
                try:
                    seen += os.read(main, 65536)
                except OSError:
                    break
        proc.wait(timeout=10)
        os.close(main)
    assert proc.returncode == 0 and b"stopping" in seen


def test_a_dead_producers_leftovers_show_with_the_cleanup_hint(dataset, tmp_path):
    server = Server(dataset, "--batch-size", "4")
    report_when(lambda r: r["phase"] == "serving")
    server.proc.send_signal(signal.SIGKILL)
    server.wait(10)
    proc = status("--json")
    (entry,) = json.loads(proc.stdout)
    assert entry["state"] == "dead" and entry["leftovers"] and "dalishare cleanup --name t" in entry["problem"]
    assert "dead" in status().stdout and "dalishare cleanup --name t" in status().stdout
    subprocess.run([sys.executable, "-m", "dalishare", "cleanup"], check=True, capture_output=True, timeout=60)
    assert json.loads(status("--json").stdout) == []
    assert "no dalishare producers" in status().stdout
