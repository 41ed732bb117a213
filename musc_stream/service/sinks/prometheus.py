"""Prometheus metrics: every musc_* metric in one registry, and the /metrics HTTP server.

Labels are only ``line``, ``reason``, ``stage``, ``kind`` (of a message not published), ``task``
(of a housekeeping error) and ``verdict``/``outcome`` (of operator feedback, fixed sets), plus the constant model/weights/version labels of ``musc_info``: each
label value is a time series kept forever, so never a frame id, and ``line`` only after ingest
validated it (``_unknown`` otherwise). Every line's counters (its drops per DROP_REASONS too) start
at 0 the first time the line is seen, so ``rate()`` and ``increase()`` see the first anomaly or
drop, and dashboards read 0 rather than "No data".

Histogram buckets:
- ``musc_image_score``: MuSc scores are Euclidean distances between L2-normalised patch features,
  so they lie in [0, 2]; observed image scores sit in about [0, 1.5]. Steps of 0.05 up to 1.0
  (where thresholds fall), then 1.25, 1.5, 2.0, give ``histogram_quantile`` a 0.05 resolution
  around the threshold.
- ``musc_end_to_end_latency_seconds``: 10 ms (GPU, small batch) to 120 s (CPU box, or a line
  still in warm-up, whose first frames wait for enough references).
- ``musc_stage_latency_seconds``: 0.5 ms (decode of a small JPEG) to 30 s (backbone on a CPU).
  Every stage is seconds per frame, one observation per frame: a stage done for a whole batch
  (backbone, scoring, publish, audit) observes the batch's time divided by its frames.
- ``musc_batch_size``: powers of two up to 128 frames per micro-batch.
"""

from __future__ import annotations

import errno
import logging
import math
import selectors
import socket
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from musc_stream import __version__
from musc_stream.stream.feedback import OUTCOMES as FEEDBACK_OUTCOMES, VERDICTS as FEEDBACK_VERDICTS
from musc_stream.stream.records import Decision, FrameFailure

logger = logging.getLogger(__name__)

UNKNOWN_LINE = "_unknown"  # same value as sinks.audit.UNKNOWN_LINE
STAGES = ("decode", "queue", "backbone", "scoring", "publish", "audit")
DROP_REASONS = ("queue_full", "stale", "duplicate", "reset_in_warmup")  # start at 0 per line; others are accepted
# Tasks of musc_housekeeping_errors_total, all at 0 from the start (a first error is then a visible increase).
HOUSEKEEPING_TASKS = ("snapshot", "audit_flush", "audit_rotation", "audit_close", "audit_row", "publish", "spool",
                      "reset", "heartbeat", "metrics", "gpu_metrics")
# musc_feedback_total{line,verdict,outcome}: the pairs that start at 0 per line (others appear when they happen).
FEEDBACK_SERIES = (("not_defect", "applied"), ("not_defect", "already_normal"), ("not_defect", "unknown_frame"),
                   ("defect", "recorded"), ("defect", "unknown_frame"))
PUBLISH_KINDS = ("result", "anomaly", "heatmap", "error", "status")
PUBLISH_FAILURE_REASONS = ("too_large", "client_error")

SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21)) + (1.25, 1.5, 2.0)
END_TO_END_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _OptionalGauge(Collector):
    """A gauge that exports no sample until first set (GPU memory on a box without a GPU)."""

    def __init__(self, name: str, documentation: str) -> None:
        self._name = name
        self._documentation = documentation
        self._value: float | None = None
        self._lock = threading.Lock()

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self._name, self._documentation)
        with self._lock:
            if self._value is not None:
                family.add_metric([], self._value)
        return [family]


class Metrics:
    """Every metric of the service, registered in one registry (never the global default).

    The engine and sinks call the ``observe_*`` / ``set_*`` methods; all are thread-safe.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, version: str = __version__
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.frames_received = Counter(
            "musc_frames_received",
            "Frames that arrived on a line's frames topic, before validation.",
            ["line"], registry=r)
        self.frames_scored = Counter(
            "musc_frames_scored", "Frames scored (warm-up frames included).", ["line"], registry=r)
        self.frames_dropped = Counter(
            "musc_frames_dropped",
            "Valid frames dropped without a score (queue_full, shutdown, ...).",
            ["line", "reason"], registry=r)
        self.frame_errors = Counter(
            "musc_frame_errors",
            "Frames that could not be scored, by reason code (as on line/<id>/error).",
            ["line", "reason"], registry=r)
        self.anomalies = Counter(
            "musc_anomalies", "Frames judged anomalous.", ["line"], registry=r)
        self.changeovers = Counter(
            "musc_changeovers", "Line resets (product changeover by command or detected drift).",
            ["line"], registry=r)
        self.end_to_end_latency = Histogram(
            "musc_end_to_end_latency_seconds", "Seconds from frame receipt to its decision.",
            ["line"], buckets=END_TO_END_BUCKETS, registry=r)
        self.stage_latency = Histogram(
            "musc_stage_latency_seconds", "Seconds per frame in each pipeline stage.",
            ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.image_score = Histogram(
            "musc_image_score", "Image anomaly scores (MuSc distance units, about 0 to 1.5).",
            ["line"], buckets=SCORE_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "musc_batch_size", "Frames per micro-batch through the backbone.",
            buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "musc_queue_depth", "Frames waiting between ingest and the engine.", registry=r)
        self.queue_capacity = Gauge(
            "musc_queue_capacity", "Size of the bounded ingest queue (frames).", registry=r)
        self.frame_bytes_waiting = Gauge(
            "musc_frame_bytes_waiting", "Bytes of decoded frames waiting (decoding, queued, held for warm-up).",
            registry=r)
        self.frame_bytes_budget = Gauge(
            "musc_frame_bytes_budget", "Byte budget of decoded frames waiting (engine.max_queued_bytes).",
            registry=r)
        self.window_fill = Gauge(
            "musc_window_fill", "Frames in the line's rolling window.", ["line"], registry=r)
        self.memory_patches = Gauge(
            "musc_memory_patches", "Patches in the line's normal-patch memory.", ["line"],
            registry=r)
        self.threshold = Gauge(
            "musc_threshold", "The line's decision threshold in force (score units); NaN while it has none (warm-up, after a reset).", ["line"],
            registry=r)
        self.publish_failures = Counter(
            "musc_publish_failures",
            "Messages the service did not publish: too_large (over the publish limit even after scaling "
            "the picture) or client_error (paho refused or raised), by kind of message.",
            ["kind", "reason"], registry=r)
        for kind in PUBLISH_KINDS:
            for reason in PUBLISH_FAILURE_REASONS:
                self.publish_failures.labels(kind, reason)
        self.feedback = Counter(
            "musc_feedback",
            "Operator verdicts on decided frames (line page or line/<id>/feedback), by verdict (not_defect, "
            "defect, invalid) and outcome (applied, already_normal, recorded, unknown_frame, rejected, error).",
            ["line", "verdict", "outcome"], registry=r)
        self.mqtt_connected = Gauge(
            "musc_mqtt_connected", "1 while connected to the MQTT broker, else 0.", registry=r)
        self.housekeeping_errors = Counter(
            "musc_housekeeping_errors",
            "Errors caught and survived outside scoring (snapshot, audit flush/rotation, publish, spool).",
            ["task"], registry=r)
        for task in HOUSEKEEPING_TASKS:
            self.housekeeping_errors.labels(task)
        self.stale_acks = Counter(
            "musc_stale_acks_dropped",
            "Acks not sent because their message came on an earlier connection (it is redelivered).",
            registry=r)
        self.snapshot_bytes = Counter(
            "musc_snapshot_bytes_written",
            "Bytes written by state snapshots (memory segments, manifests, thresholds), all lines.",
            registry=r)
        self.lines_evicted = Counter(
            "musc_lines_evicted",
            "Idle lines snapshotted and dropped from RAM (engine.idle_evict_s); their next frame loads them back.",
            registry=r)
        self.frames_held = Gauge(
            "musc_frames_held", "Frames the engine holds for warm-up (spooled and acked).", registry=r)
        self.gpu_memory = _OptionalGauge(
            "musc_gpu_memory_bytes", "GPU memory held by the service; absent without a GPU.")
        r.register(self.gpu_memory)
        self.info = Info("musc", "Model, weights and service version.", registry=r)
        self._version = version
        self.info.info({"model": "", "weights": "", "version": version})
        self._lines: set[str] = set()
        self._lines_lock = threading.Lock()

    # -- counters -------------------------------------------------------------------------------

    def observe_received(self, line: str | None) -> None:
        """Count one arriving frame; ``line`` must be a validated id (None → ``_unknown``)."""
        line = self._line(line)
        self.frames_received.labels(line).inc()

    def observe_decision(self, d: Decision) -> None:
        """Count a scored frame and record its score, latencies, threshold and window/memory size.

        Counts a changeover when ``d.changeover`` is set (the engine flags the first decision after
        a reset, by command or drift): callers must not count it again. Stage latencies come from
        ``d.latency_s`` for the stages in STAGES; a stage must reach the histogram either there or
        through ``observe_stage``, never both.
        """
        line = self._line(d.line)
        self.frames_scored.labels(line).inc()
        if d.is_anomaly:
            self.anomalies.labels(line).inc()
        if d.changeover:
            self.changeovers.labels(line).inc()
        if math.isfinite(d.score):
            self.image_score.labels(line).observe(d.score)
        end_to_end = d.latency_s.get("end_to_end")
        if end_to_end is None and d.received_at > 0 and d.decided_at > 0:
            end_to_end = d.end_to_end_s
        if end_to_end is not None:
            self.end_to_end_latency.labels(line).observe(end_to_end)
        for stage in STAGES:
            seconds = d.latency_s.get(stage)
            if seconds is not None:
                self.stage_latency.labels(stage).observe(seconds)
        # NaN while the line has no threshold (warm-up, after a reset), never the old product's value.
        self.threshold.labels(line).set(d.threshold if d.threshold is not None and math.isfinite(d.threshold)
                                        else float("nan"))
        self.window_fill.labels(line).set(d.window_size)
        self.memory_patches.labels(line).set(d.memory_size)

    def observe_failure(self, f: FrameFailure) -> None:
        """Count a frame that could not be scored under its reason code."""
        self.frame_errors.labels(self._line(f.line), f.reason).inc()

    def observe_publish_failure(self, kind: str, reason: str) -> None:
        """Count a message not published (kind and reason from the fixed sets above)."""
        kind = kind if kind in PUBLISH_KINDS else "result"
        reason = reason if reason in PUBLISH_FAILURE_REASONS else "client_error"
        self.publish_failures.labels(kind, reason).inc()

    def observe_feedback(self, line: str | None, verdict: str | None, outcome: str) -> None:
        """Count one feedback; a verdict or outcome outside the fixed sets is counted as invalid / rejected."""
        verdict = verdict if verdict in FEEDBACK_VERDICTS else "invalid"
        outcome = outcome if outcome in FEEDBACK_OUTCOMES else "rejected"
        self.feedback.labels(self._line(line), verdict, outcome).inc()

    def observe_drop(self, line: str | None, reason: str) -> None:
        """Count a valid frame dropped without a score (the caller logs it)."""
        self.frames_dropped.labels(self._line(line), reason).inc()

    # -- histograms and gauges ------------------------------------------------------------------

    def observe_stage(self, stage: str, seconds: float, frames: int = 1) -> None:
        """Record a stage's time; only the stages in STAGES (fixed label values). ``seconds`` spent
        on ``frames`` frames together (a batch) count as ``frames`` observations of seconds/frames,
        so every stage's histogram is seconds per frame, counted per frame."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        if frames < 1:
            return
        for _ in range(frames):
            self.stage_latency.labels(stage).observe(seconds / frames)

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def set_queue_capacity(self, n: int) -> None:
        self.queue_capacity.set(n)

    def watch_frame_bytes(self, waiting, budget: int) -> None:
        """Export the decoded-frame byte budget; ``waiting()`` is read at every scrape."""
        self.frame_bytes_waiting.set_function(waiting)
        self.frame_bytes_budget.set(budget)

    def set_window_fill(self, line: str, n: int) -> None:
        """Set a line's window fill directly (after a reset, before its next decision)."""
        self.window_fill.labels(self._line(line)).set(n)

    def set_memory_patches(self, line: str, n: int) -> None:
        self.memory_patches.labels(self._line(line)).set(n)

    def set_threshold(self, line: str, value: float) -> None:
        self.threshold.labels(self._line(line)).set(value)

    def observe_housekeeping_error(self, task: str) -> None:
        self.housekeeping_errors.labels(task).inc()

    def observe_snapshot_bytes(self, n: int) -> None:
        self.snapshot_bytes.inc(n)

    def observe_eviction(self, line: str) -> None:
        """Count an evicted line; its gauges read empty until it comes back."""
        line = self._line(line)
        self.lines_evicted.inc()
        self.window_fill.labels(line).set(0)
        self.memory_patches.labels(line).set(0)
        self.threshold.labels(line).set(float("nan"))

    def observe_stale_ack(self) -> None:
        self.stale_acks.inc()

    def set_frames_held(self, n: int) -> None:
        self.frames_held.set(n)

    def set_mqtt_connected(self, connected: bool) -> None:
        self.mqtt_connected.set(1 if connected else 0)

    def set_gpu_memory_bytes(self, n: int) -> None:
        """Call only when a GPU is present; until then the metric has no sample."""
        self.gpu_memory.set(n)

    def set_info(self, model: str, weights: str, version: str | None = None) -> None:
        """Publish the model name and weights source (once the backbone is loaded)."""
        self._version = version or self._version
        self.info.info({"model": model, "weights": weights, "version": self._version})

    def _line(self, line: str | None) -> str:
        """The label value for ``line``; a line's per-line counters start at 0 on first sight."""
        line = line or UNKNOWN_LINE
        if line not in self._lines:
            with self._lines_lock:
                if line not in self._lines:
                    for counter in (self.frames_received, self.frames_scored, self.anomalies,
                                    self.changeovers):
                        counter.labels(line)
                    for reason in DROP_REASONS:
                        self.frames_dropped.labels(line, reason)
                    for verdict, outcome in FEEDBACK_SERIES:
                        self.feedback.labels(line, verdict, outcome)
                    self._lines.add(line)
        return line


# Bounds of the /metrics endpoint: a scrape is one short request, so a few workers serve every
# Prometheus there is, and no number of idle or slow clients can hold more than these.
HTTP_WORKERS = 4  # threads that answer requests
MAX_CONNECTIONS = 64  # open connections at most; the oldest idle one is closed to admit a new one
IDLE_TIMEOUT_S = 10.0  # a connection that sends nothing for this long is closed
REQUEST_TIMEOUT_S = 5.0  # a request that takes longer to arrive (or to be read) is abandoned


class MetricsBindError(OSError):
    """/metrics could not listen on metrics.host:metrics.port; the message says what to change."""


class _QuietHandler(WSGIRequestHandler):
    """Scrape requests go to our logger at DEBUG instead of stderr; a slow client times out."""

    timeout = None  # MetricsServer sets the socket's timeout (request_timeout_s) before the handler runs

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        logger.debug("metrics %s " + format, self.address_string(), *args)


class MetricsServer:
    """The running /metrics endpoint; ``shutdown()`` stops it and frees the port.

    One selector thread accepts connections and waits until a connection has bytes to read; only
    then does one of HTTP_WORKERS threads answer it. So 400 idle connections cost 400 sockets
    at most MAX_CONNECTIONS of them (older idle ones are closed) and no thread each; a client that
    sends part of a request holds a worker for at most REQUEST_TIMEOUT_S.
    """

    def __init__(self, httpd: WSGIServer, workers: int = HTTP_WORKERS, max_connections: int = MAX_CONNECTIONS,
                 idle_timeout_s: float = IDLE_TIMEOUT_S, request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self._httpd = httpd
        self.request_timeout_s = request_timeout_s
        self.host, self.port = httpd.server_address[:2]
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="metrics-worker")
        self._selector = selectors.DefaultSelector()
        self._idle: dict[socket.socket, float] = {}  # waiting for a request, oldest first
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._idle) + self._in_flight

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._httpd.server_close()
        logger.info("metrics server on port %d stopped", self.port)

    def _serve(self) -> None:
        listener = self._httpd.socket
        listener.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ, None)
        try:
            while not self._stop.is_set():
                for key, _ in self._selector.select(timeout=0.1):
                    if key.data is None:
                        self._accept(listener)
                    else:
                        self._dispatch(key.fileobj, key.data)  # type: ignore[arg-type]
                self._expire(time.monotonic() - self.idle_timeout_s)
        except Exception:  # noqa: BLE001 - /metrics going away must not go unnoticed
            logger.exception("metrics server stopped by an error")
        finally:
            for conn in list(self._idle):
                self._close_idle(conn)
            self._selector.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again on the next select
                logger.warning("metrics server cannot accept: %s", exc)
                return
            with self._lock:
                full = len(self._idle) + self._in_flight >= self.max_connections
                oldest = next(iter(self._idle), None) if full else None
            if full and oldest is None:  # every slot is answering a request: refuse this one
                conn.close()
                continue
            if oldest is not None:
                self._close_idle(oldest)
            conn.setblocking(True)
            with self._lock:
                self._idle[conn] = time.monotonic()
            self._selector.register(conn, selectors.EVENT_READ, address)

    def _dispatch(self, conn: socket.socket, address: Any) -> None:
        self._selector.unregister(conn)
        with self._lock:
            self._idle.pop(conn, None)
            self._in_flight += 1
        self._pool.submit(self._answer, conn, address)

    def _answer(self, conn: socket.socket, address: Any) -> None:
        try:
            conn.settimeout(self.request_timeout_s)
            self._httpd.finish_request(conn, address)
        except Exception as exc:  # noqa: BLE001 - a broken client costs its own request only
            logger.debug("metrics request from %s failed: %s", address, exc)
        finally:
            self._httpd.shutdown_request(conn)
            with self._lock:
                self._in_flight -= 1

    def _expire(self, before: float) -> None:
        with self._lock:
            stale = [conn for conn, since in self._idle.items() if since < before]
        for conn in stale:
            self._close_idle(conn)

    def _close_idle(self, conn: socket.socket) -> None:
        with self._lock:
            self._idle.pop(conn, None)
        try:
            self._selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()


def start_http_server(metrics: Metrics, host: str, port: int, *, workers: int = HTTP_WORKERS,
                      max_connections: int = MAX_CONNECTIONS, idle_timeout_s: float = IDLE_TIMEOUT_S,
                      request_timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[MetricsServer, int]:
    """Serve ``metrics.registry`` at http://host:port/metrics on a thread "metrics-http".

    ``port=0`` binds a free port; the returned port is the real one. Built from
    ``make_wsgi_app`` rather than ``prometheus_client.start_http_server`` (one thread per
    connection, unbounded) so connections and threads stay bounded (see MetricsServer).
    Raises MetricsBindError, a one-line reason naming the setting to change, when it cannot listen.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # A deep listen backlog: connections wait there for the selector thread instead of being refused.
    server_class = type("_MetricsHTTPServer", (WSGIServer,), {"address_family": family, "request_queue_size": 256})
    app = prometheus_client.make_wsgi_app(metrics.registry)
    try:
        httpd = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
    except OSError as exc:
        error = MetricsBindError(bind_advice("metrics", host, port, exc, " (another musc-stream?); set MUSC_METRICS__PORT to a "
                                                     "free port, or MUSC_METRICS__ENABLED=false"))
        error.errno = exc.errno
        raise error from None
    server = MetricsServer(httpd, workers=workers, max_connections=max_connections, idle_timeout_s=idle_timeout_s,
                           request_timeout_s=request_timeout_s)
    logger.info("metrics on http://%s:%d/metrics", host, server.port)
    return server, server.port


def bind_advice(section: str, host: str, port: int, exc: OSError, in_use: str) -> str:
    """One line for a listener that cannot bind: the settings, the cause and what to do.
    ``in_use`` is the section's own advice for a port already taken."""
    env = f"MUSC_{section.upper()}__"
    where = f"{section}.host {host!r}, {section}.port {port}"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: the port is already in use{in_use}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: not an address of this machine; set {env}HOST to 127.0.0.1 or one of its addresses"
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports under 1024 need privileges); set {env}PORT above 1023"
    if isinstance(exc, socket.gaierror):
        return f"{where}: unknown host name; set {env}HOST to an address such as 127.0.0.1"
    return f"{where}: cannot listen: {exc.strerror or exc}"


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def exported_metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry can export (what PromQL can select), observed or not.

    Labelled metrics have no samples until a label value is used, so names are derived from each
    family's type: counter ``x`` → ``x_total`` and ``x_created``, histogram ``x`` → ``x_bucket``,
    ``x_count``, ``x_sum``, ``x_created``, info ``x`` → ``x_info``, gauge ``x`` → ``x``.
    """
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names

