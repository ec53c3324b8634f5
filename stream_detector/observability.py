"""Prometheus metrics and the liveness / readiness / metrics HTTP endpoints.

``/healthz`` (liveness): 200 while the main loop has turned within ``stall_s`` seconds.
``/readyz`` (readiness): 200 from the consumer group's first assignment on (the model is loaded
before the consumer starts), even an assignment of no partitions, and still 200 after partitions
are revoked or lost: a member beyond the partition count idles ready, so it does not block a
rollout. It does not mean that this replica holds partitions (``sd_assigned_partitions`` does).
``/metrics``: Prometheus text format. Each :class:`Metrics` has its own registry, so several
services (tests, benchmarks) can live in one process.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from stream_detector.errors import ConfigError
from stream_detector.records import REASONS
from stream_detector.scoring import EventKind, Level

_LAT = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
#: Finer around the tens of milliseconds that a latency objective is set in.
_PROC = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
         0.3, 0.5, 1, 2, 5, 10, 30)

#: (event, level) of every alert event the detector can publish (scoring.EpisodeTracker):
#: open and update at warning or critical, resolve always at normal.
ALERT_LABELS: tuple[tuple[str, str], ...] = (
    *((EventKind.OPEN.value, lv.label) for lv in (Level.WARNING, Level.CRITICAL)),
    *((EventKind.UPDATE.value, lv.label) for lv in (Level.WARNING, Level.CRITICAL)),
    (EventKind.RESOLVE.value, Level.NORMAL.label),
)
#: Generations of Python's cycle collector (gc.callbacks reports 0, 1 or 2).
GC_GENERATIONS: tuple[str, ...] = ("0", "1", "2")


class Metrics:
    """The service's series. Every labelled series with a known, finite label set (alerts,
    dead-letter reasons, collector generations) is created at 0 here, so that it is exposed from
    the first scrape on: Prometheus' rate() / increase() need a sample before the first increment,
    or they miss the first event of each label set in each pod. ``sd_consumer_lag`` is labelled
    by whatever partitions a replica owns and appears with them."""

    def __init__(self) -> None:
        # no `<name>_created` gauge (a start timestamp) beside every counter and histogram:
        # Prometheus does not need them, and they doubled the series a scrape lists
        disable_created_metrics()
        r = self.registry = CollectorRegistry()
        self.readings = Counter("sd_readings_total", "Readings consumed", registry=r)
        self.warming = Counter(
            "sd_readings_warming_total", "Readings absorbed before a full window", registry=r
        )
        self.windows = Counter("sd_windows_scored_total", "Windows scored", registry=r)
        self.batch_size = Histogram(
            "sd_batch_size", "Windows per model call", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
        )
        self.inference = Histogram(
            "sd_inference_seconds", "Model call latency per batch", registry=r, buckets=_LAT
        )
        self.processing = Histogram(
            "sd_processing_seconds",
            "consume() to every reading of the batch scored and the records it caused "
            "acknowledged, per partition and consume() batch: the service's share of the latency",
            registry=r, buckets=_PROC,
        )
        self.reading_to_alert = Histogram(
            "sd_reading_to_alert_seconds",
            "Kafka timestamp of a reading to broker ack of the alert it caused",
            registry=r, buckets=_LAT,
        )
        self.alerts = Counter(
            "sd_alerts_total", "Alert events published", ["event", "level"], registry=r
        )
        self.dead_letters = Counter(
            "sd_dead_letters_total", "Records sent to the dead-letter topic", ["reason"],
            registry=r,
        )
        self.dropped = Counter(
            "sd_readings_dropped_total", "Readings skipped without a dead letter "
            "(late_or_duplicate with SD_DETECTOR__LATE_POLICY=drop)", ["reason"], registry=r,
        )
        self.rebuilt = Counter(
            "sd_readings_rebuilt_total", "Readings re-read to rebuild windows", registry=r
        )
        self.rebuild_deepened = Counter(
            "sd_rebuild_deepened_total",
            "Rebuilds started again with a longer look-back (a sensor's state was inexact, "
            "or it had no full window yet)",
            registry=r,
        )
        self.rebuild_inexact = Counter(
            "sd_rebuild_inexact_sensors_total",
            "Sensors whose rebuilt alert state may be inexact: the maximum look-back or the "
            "log's start was reached first",
            registry=r,
        )
        self.lag = Gauge(
            "sd_consumer_lag", "Consumer lag in messages", ["topic", "partition"], registry=r
        )
        self.sensors = Gauge("sd_sensors", "Sensors with state in this process", registry=r)
        self.sensors_untrained = Gauge(
            "sd_sensors_untrained",
            "Sensors with state in this process that the artifact has no input scaler of their "
            "own for (not in its training data, or with too few rows there; scaled by the "
            "global one): retrain to include them",
            registry=r,
        )
        self.assigned = Gauge("sd_assigned_partitions", "Partitions assigned", registry=r)
        self.gc_pause = Histogram(
            "sd_gc_pause_seconds",
            "Pauses of Python's cycle collector while the consumer loop runs, per generation",
            ["generation"], registry=r, buckets=_LAT,
        )
        for event, level in ALERT_LABELS:
            self.alerts.labels(event, level)
        for reason in REASONS:
            self.dead_letters.labels(reason)
        self.dropped.labels("late_or_duplicate")  # present at 0, like every dead-letter reason
        for generation in GC_GENERATIONS:
            self.gc_pause.labels(generation)
        # the standard process_*, python_gc_* and python_info series, as in the default registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def gc_callback(self) -> Callable[[str, dict[str, Any]], None]:
        """A ``gc.callbacks`` entry that times each collection into :attr:`gc_pause`."""
        started = [0.0]
        by_gen = [self.gc_pause.labels(g) for g in GC_GENERATIONS]

        def callback(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            elif started[0]:
                by_gen[min(int(info.get("generation", 2)), 2)].observe(
                    time.perf_counter() - started[0])
                started[0] = 0.0

        return callback


#: Seconds an HTTP connection may stay silent before the server closes it.
HTTP_IDLE_TIMEOUT_S = 5.0


class HealthState:
    def __init__(self, stall_s: float = 30.0) -> None:
        self.stall_s = stall_s
        self.ready = False
        self._beat = time.monotonic()

    def beat(self) -> None:
        self._beat = time.monotonic()

    @property
    def alive(self) -> bool:
        return time.monotonic() - self._beat < self.stall_s


class HealthServer:
    """A small threaded HTTP server for the probes and Prometheus (port 0 = pick a free one)."""

    def __init__(self, host: str, port: int, metrics: Metrics, health: HealthState) -> None:
        self._addr = (host, port)
        self.metrics = metrics
        self.health = health
        self._server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._addr[1]

    def start(self) -> None:
        metrics, health = self.metrics, self.health

        class Handler(BaseHTTPRequestHandler):
            # a connection that sends nothing is closed after this many seconds: each held a
            # thread for as long as its client kept it open (300 idle connections, 300 threads;
            # review)
            timeout = HTTP_IDLE_TIMEOUT_S

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                self._answer(body=True)

            def do_HEAD(self) -> None:  # noqa: N802 - some HTTP checkers probe with HEAD
                self._answer(body=False)

            def _answer(self, body: bool) -> None:
                path = urlsplit(self.path).path  # "/healthz?probe=1" is /healthz
                if path == "/healthz":
                    self._send(200 if health.alive else 503, b"ok" if health.alive else b"stalled",
                               body=body)
                elif path == "/readyz":
                    self._send(200 if health.ready else 503, b"ready" if health.ready else b"no",
                               body=body)
                elif path == "/metrics":
                    self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST,
                               body=body)
                else:
                    self._send(404, b"not found", body=body)

            def _send(self, code: int, data: bytes, ctype: str = "text/plain",
                      body: bool = True) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                return

        self._server = _bind(self._addr, Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True, name="health").start()

    @property
    def address(self) -> str:
        """``host:port`` it serves on (``[host]:port`` for IPv6)."""
        host = str(self._server.server_address[0]) if self._server else self._addr[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _bind(addr: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """The server on ``addr``, in the address family of its host: IPv4 (``0.0.0.0``, the
    default), IPv6 (``::`` also takes IPv4 where the system allows dual-stack sockets, for
    IPv6-only and dual-stack clusters) or a name. A host that does not resolve or an address
    in use is a ConfigError naming the settings (exit code 2), not a traceback."""
    host, port = addr
    where = (f"cannot serve /healthz, /readyz and /metrics on {host!r} port {port} "
             "(SD_SERVICE__HTTP_HOST / SD_SERVICE__HTTP_PORT)")
    try:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
    except OSError as exc:
        raise ConfigError(f"{where}: {exc}") from None

    class Server(ThreadingHTTPServer):
        address_family = family

        def server_bind(self) -> None:
            if family == socket.AF_INET6:  # "::" takes IPv4 too, where the system allows it
                with contextlib.suppress(OSError):
                    self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    try:
        return Server(addr, handler)
    except OSError as exc:
        raise ConfigError(f"{where}: {exc}") from None
