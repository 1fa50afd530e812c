"""``dalishare serve --metrics-port P``: the producer's status figures for Prometheus
(prometheus-client), bound to localhost unless ``--metrics-host`` says otherwise.

The HTTP server runs in prometheus-client's own thread; it reads only the latest report, which the
serve loop hands over every STATUS_LIVE_REFRESH_S (`MetricsExporter.update`, one reference swap),
so a scrape never touches the loop's state."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from ..errors import ConfigError
from ..intervals import METRICS_STOP_S
from ..wire.messages import StatusReport

log = logging.getLogger(__name__)

_PRODUCER_GAUGES = {  # report field -> (metric, help)
    "samples": ("dalishare_dataset_samples", "files in the dataset"),
    "epoch": ("dalishare_epoch", "the epoch being fed (ring); -1 with a cache, where each job reads its own"),
    "epoch_position": ("dalishare_epoch_position_samples", "samples of the current epoch fed (ring)"),
    "epoch_size": ("dalishare_epoch_size_samples", "samples per epoch"),
    "cached": ("dalishare_cache_samples", "samples in the cache (-1: no cache)"),
    "excluded": ("dalishare_excluded_samples", "files excluded because they cannot be decoded"),
    "slots": ("dalishare_ring_slots", "ring slots (0: no ring)"),
    "slots_in_use": ("dalishare_ring_slots_in_use", "ring slots held by a job or being filled"),
    "decode_per_s": ("dalishare_decode_images_per_second", "samples decoded per second, recent"),
    "uptime_s": ("dalishare_uptime_seconds", "seconds since the producer started"),
}
_PRODUCER_COUNTERS = {
    "decoded": ("dalishare_decoded_samples", "samples decoded by the stage"),
    "worker_restarts": ("dalishare_stage_worker_restarts", "stage worker restarts"),
    "dropped_messages": ("dalishare_dropped_messages", "control messages dropped"),
}
_JOB_LABELS = ["name", "job", "pid", "group", "rank"]
_JOB_GAUGES = {
    "images_per_s": ("dalishare_job_images_per_second", "samples the job read per second, recent"),
    "behind": ("dalishare_job_behind_batches", "ring batches announced to the job and not begun"),
    "holds": ("dalishare_job_held_slots", "ring slots the job holds"),
    "paces": ("dalishare_job_sets_pace", "1 if the full ring waits for this job's releases"),
    "epoch": ("dalishare_job_epoch", "the epoch the job reads"),
}


class _ReportCollector:
    def __init__(self):
        self.report: StatusReport | None = None

    def collect(self):
        report = self.report
        if report is None:
            return
        name = report.name
        info = InfoMetricFamily("dalishare_producer", "what the producer serves", labels=["name"])
        info.add_metric([name], {"stage": report.stage, "device": report.device, "output": report.output, "source": report.data,
                                 "phase": report.phase, "sample": report.sample, "pid": str(report.pid)})
        yield info
        for field, (metric, text) in _PRODUCER_GAUGES.items():
            gauge = GaugeMetricFamily(metric, text, labels=["name"])
            gauge.add_metric([name], float(getattr(report, field)))
            yield gauge
        for field, (metric, text) in _PRODUCER_COUNTERS.items():
            counter = CounterMetricFamily(metric, text, labels=["name"])
            counter.add_metric([name], float(getattr(report, field)))
            yield counter
        jobs = GaugeMetricFamily("dalishare_jobs", "attached jobs", labels=["name"])
        jobs.add_metric([name], float(len(report.jobs)))
        yield jobs
        read = CounterMetricFamily("dalishare_job_read_samples", "samples the job read since it attached",
                                   labels=_JOB_LABELS)
        gauges = {field: GaugeMetricFamily(metric, text, labels=_JOB_LABELS)
                  for field, (metric, text) in _JOB_GAUGES.items()}
        for job in report.jobs:
            labels = [name, str(job["id"]), str(job["pid"]), job["group"], str(job["rank"])]
            read.add_metric(labels, float(job["read"]))
            for field, gauge in gauges.items():
                gauge.add_metric(labels, float(job[field]))
        yield read
        yield from gauges.values()


class MetricsExporter:
    """The HTTP endpoint at ``host:port``/metrics; `update` hands it the latest report."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self._collector = _ReportCollector()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self._collector)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {port}: cannot listen on {host}:{port} ({exc}); pick a free port") from None
        self.port = self._server.server_port
        log.info("metrics for Prometheus at http://%s:%d/metrics", host, self.port)

    def update(self, report: StatusReport) -> None:
        self._collector.report = report

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=METRICS_STOP_S)
