"""The service: wiring, lifecycle, the GPU thread's loop, signals and systemd notify.

Threads: paho's network thread (decode, validate, enqueue), one engine thread (backbone, scoring,
audit, publish, ack), the metrics HTTP thread. They meet in one bounded queue. A frame is acked
only after its decision (or error) is in a closed Parquet file, so a crash redelivers it.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import OrderedDict
from pathlib import Path

import paho.mqtt.client as mqtt
import torch

from musc_stream import __version__, systemd
from musc_stream.config import Settings
from musc_stream.engine import Engine, EngineConfig
from musc_stream.ingest import Ack, Ingest, ResetCommand, WorkItem
from musc_stream.model.backbone import Backbone, BackboneSpec, load_backbone
from musc_stream.mqtt import Topics, connect_kwargs, create_client, offline_payload
from musc_stream.records import Decision, Frame, FrameFailure
from musc_stream.sinks.audit import AuditLog
from musc_stream.sinks.metrics import Metrics, start_http_server
from musc_stream.sinks.mqtt import MqttPublisher

logger = logging.getLogger(__name__)

_RECENT_IDS = 20_000
# CONNACK reasons no retry can cure: client id invalid, bad user/password, not authorized, banned,
# bad auth method (MQTT 5 codes; paho maps MQTT 3.1.1's 2, 4, 5 onto them).
_PERMANENT_REFUSALS = {0x85, 0x86, 0x87, 0x8A, 0x8C}  # decided (line, frame_id) pairs remembered to drop redelivered duplicates


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def backbone_from_settings(settings: Settings) -> Backbone:
    m = settings.model
    device = resolve_device(m.device)
    spec = BackboneSpec(name=m.name, pretrained=m.pretrained, image_size=m.image_size,
                        device=device, half=m.half and device.startswith("cuda"))
    return load_backbone(spec)


class Service:
    """One worker: subscribe, score, publish, audit, export metrics. start() → run() → stop()."""

    def __init__(self, settings: Settings, backbone: Backbone | None = None, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.topics = Topics(settings.mqtt)
        self.work: queue.Queue[WorkItem] = queue.Queue(maxsize=settings.engine.queue_size)
        self.stop_event = threading.Event()
        self.subscribed = threading.Event()
        self.refused: str | None = None  # the broker's reason, when it refused us for good
        self._stopped = False
        self._backbone = backbone
        self._recent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._metrics_server = None
        self.metrics_port: int | None = None
        self.client: mqtt.Client | None = None
        self.engine: Engine | None = None
        self.audit: AuditLog | None = None
        self.publisher: MqttPublisher | None = None
        self.frames_done = 0
        self._rate_mark = (time.monotonic(), 0)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, ready_timeout_s: float | None = None) -> None:
        """Load the model, open sinks, connect and subscribe; READY to systemd once live. On any
        failure everything already started is stopped again before the error propagates."""
        try:
            self._start(ready_timeout_s)
        except BaseException:
            self.stop(save_state=False)
            raise

    def _start(self, ready_timeout_s: float | None) -> None:
        s = self.settings
        self.metrics.set_queue_capacity(s.engine.queue_size)
        if s.metrics.enabled:
            self._metrics_server, self.metrics_port = start_http_server(self.metrics, s.metrics.host, s.metrics.port)
        backbone = self._backbone or backbone_from_settings(s)
        self._warm_up(backbone)
        self.engine = Engine(backbone, EngineConfig.from_settings(s))
        for line in self.engine.load_state(Path(s.state.dir)):
            state = self.engine.lines[line]
            self.metrics.set_memory_patches(line, state.memory_size)
        self.metrics.set_info(model=f"{backbone.spec.name}@{backbone.image_size}", weights=backbone.weights_label)
        logger.info("model %s at %d px, weights: %s", backbone.spec.name, backbone.image_size, backbone.weights_label)
        self.audit = AuditLog(Path(s.audit.dir), rotate_s=s.audit.rotate_s) if s.audit.enabled else None
        self._connect()
        self._wait_for_subscription(ready_timeout_s)
        self._thread = threading.Thread(target=self._loop, name="musc-engine", daemon=True)
        self._thread.start()
        systemd.ready()
        logger.info("service ready: %s on %s:%d", self.topics.subscribe_frames, s.mqtt.host, s.mqtt.port)

    def _wait_for_subscription(self, timeout_s: float | None) -> None:
        """Block until the frame subscription is live; a refusal that retrying cannot cure (bad
        credentials, banned, bad client id) ends start-up at once with the broker's reason."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        s = self.settings.mqtt
        while not self.subscribed.wait(0.1):
            if self.refused is not None:
                raise ConnectionRefusedError(f"broker {s.host}:{s.port} refused the service: {self.refused}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no subscription to {s.host}:{s.port} within {timeout_s} s")

    def run(self) -> int:
        """Block until SIGTERM/SIGINT (or stop_event), then stop cleanly. Returns the exit code:
        non-zero when the engine thread died, so systemd's Restart=on-failure restarts us."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        code = 0
        while not self.stop_event.wait(0.5):
            if self._thread is not None and not self._thread.is_alive():
                logger.error("engine thread died; stopping so systemd restarts the service")
                code = 1
                break
        self.stop()
        return code

    def stop(self, save_state: bool = True) -> None:
        """Undo start in reverse: finish the batch in hand, flush audit, save state, say offline.
        Safe to call twice and after a failed start."""
        if self._stopped:
            return
        self._stopped = True
        systemd.stopping()
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self.audit is not None:
            self.audit.close()
        if self.engine is not None and save_state:
            self.engine.save_state(Path(self.settings.state.dir))
        if self.client is not None:
            # Frames still queued or held for warm-up are not acked: the broker redelivers them.
            info = self.client.publish(self.topics.status, offline_payload(self.settings.mqtt.instance),
                                       qos=1, retain=True)
            if self.client.is_connected():
                info.wait_for_publish(5)
            self.client.disconnect()
            self.client.loop_stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        logger.info("service stopped after %d frames", self.frames_done)

    def _warm_up(self, backbone: Backbone) -> None:
        """One forward pass before READY so the first real frame does not pay for lazy init."""
        import numpy as np

        backbone.embed([np.zeros((backbone.image_size, backbone.image_size, 3), np.uint8)], batch_size=1)

    # -- MQTT ---------------------------------------------------------------------------------
    def _connect(self) -> None:
        s = self.settings.mqtt
        self.client = create_client(s)
        self.publisher = MqttPublisher(self.client, self.topics, s.instance, s.qos, s.heatmap_mode)
        ingest = Ingest(self.topics, self.settings.frames, self.metrics, self.work,
                        ack=self._ack, on_refused=self.publisher.publish_failure)
        self.client.on_message = ingest.on_message
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.connect_async(**connect_kwargs(s))
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            logger.error("broker refused connection: %s", reason_code)
            self.metrics.set_mqtt_connected(False)
            if reason_code.value in _PERMANENT_REFUSALS and not self.subscribed.is_set():
                self.refused = str(reason_code)
            return
        logger.info("connected to broker (session present: %s)", flags.session_present)
        self.metrics.set_mqtt_connected(True)
        qos = self.settings.mqtt.qos
        client.subscribe([(self.topics.subscribe_frames, qos), (self.topics.reset_filter, qos)])
        model = self.engine.backbone if self.engine else None
        self.publisher.publish_status(
            model=f"{model.spec.name}@{model.image_size}" if model else "",
            weights=model.weights_label if model else "",
        )

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(rc.is_failure for rc in reason_codes):
            logger.error("subscription refused: %s", [str(rc) for rc in reason_codes])
            return
        self.subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.metrics.set_mqtt_connected(False)
        if not self.stop_event.is_set():
            logger.warning("disconnected from broker (%s); paho reconnects with backoff", reason_code)

    def _ack(self, ack: Ack | None) -> None:
        if ack is not None and self.client is not None:
            self.client.ack(ack.mid, ack.qos)

    # -- the engine thread -----------------------------------------------------------------------
    def _next_batch(self) -> list[WorkItem]:
        try:
            first = self.work.get(timeout=0.2)
        except queue.Empty:
            return []
        items = [first]
        deadline = time.monotonic() + self.settings.engine.max_batch_wait_s
        while len(items) < self.settings.model.batch_size:
            remaining = deadline - time.monotonic()
            try:
                items.append(self.work.get(timeout=max(0.0, remaining)) if remaining > 0 else self.work.get_nowait())
            except queue.Empty:
                break
        self.metrics.set_queue_depth(self.work.qsize())
        return items

    def _loop(self) -> None:
        interval = systemd.watchdog_interval_s()
        last_ping = 0.0
        last_snapshot = time.monotonic()
        while not self.stop_event.is_set():
            items = self._next_batch()
            if items:
                self._handle(items)
            if self.audit is not None:
                self.audit.maybe_rotate()
            now = time.monotonic()
            if now - last_snapshot >= self.settings.state.snapshot_interval_s:
                last_snapshot = now
                self._snapshot()
            if now - last_ping >= (interval / 2 if interval else 5.0):
                last_ping = now
                systemd.watchdog()
                systemd.status(self._status_line())
                if torch.cuda.is_available():
                    self.metrics.set_gpu_memory_bytes(torch.cuda.memory_allocated())

    def _handle(self, items: list[WorkItem]) -> None:
        frames: list[Frame] = []
        failures: list[FrameFailure] = []
        resets: list[ResetCommand] = []
        for item in items:
            if isinstance(item, Frame):
                if (item.line, item.frame_id) in self._recent:
                    self.metrics.observe_drop(item.line, "duplicate")
                    logger.info("frame %s of line %s already decided; acked again", item.frame_id, item.line)
                    self._ack(item.ack)
                else:
                    frames.append(item)
            elif isinstance(item, FrameFailure):
                failures.append(item)
            else:
                resets.append(item)
        for command in resets:  # counted as a changeover on the line's next decision
            self.engine.reset(command.line)
        decisions: list[Decision] = []
        if frames:
            self.metrics.observe_batch(len(frames))
            try:
                decisions = self.engine.process(frames)
            except Exception:  # a batch that cannot be scored must not kill the service
                logger.exception("scoring failed for %d frame(s)", len(frames))
                failures += [FrameFailure("scoring_failed", "internal error while scoring; see service log",
                                          f.line, f.frame_id, f.received_at, f.ack) for f in frames]
        self._make_durable(decisions, failures)
        started = time.perf_counter()
        for d in decisions:
            self.publisher.publish_decision(d, d.image)
        for f in failures:
            self.publisher.publish_failure(f)
        publish_s = time.perf_counter() - started
        for d in decisions:
            d.latency_s["publish"] = publish_s / max(1, len(decisions))
            d.heatmap = d.image = None  # free the arrays early
            self._ack(d.ack)
            self._remember(d.line, d.frame_id)
            self.metrics.observe_decision(d)
            state = self.engine.lines[d.line]
            self.metrics.set_window_fill(d.line, len(state.window))
            self.metrics.set_memory_patches(d.line, state.memory_size)
            if state.threshold.value is not None:
                self.metrics.set_threshold(d.line, state.threshold.value)
        for f in failures:
            self._ack(f.ack)
            self.metrics.observe_failure(f)
        for command in resets:
            self._ack(command.ack)
        self.frames_done += len(decisions)

    def _snapshot(self) -> None:
        """Periodic state save from the engine thread (the only thread touching the engine)."""
        try:
            self.engine.save_state(Path(self.settings.state.dir))
        except OSError:
            logger.exception("state snapshot failed; will retry")

    def _make_durable(self, decisions: list[Decision], failures: list[FrameFailure]) -> None:
        """Audit rows on disk before any ack; retried until it succeeds or the service stops."""
        if self.audit is None or not (decisions or failures):
            return
        started = time.perf_counter()
        for d in decisions:
            self.audit.write_decision(d)
        for f in failures:
            self.audit.write_failure(f)
        while True:
            try:
                self.audit.flush()
                break
            except OSError:
                logger.exception("audit flush failed; retrying in 1 s (frames stay unacked)")
                if self.stop_event.wait(1.0):
                    raise
        self.metrics.observe_stage("audit", time.perf_counter() - started)

    def _remember(self, line: str, frame_id: str) -> None:
        self._recent[(line, frame_id)] = None
        if len(self._recent) > _RECENT_IDS:
            self._recent.popitem(last=False)

    def _status_line(self) -> str:
        now = time.monotonic()
        since, count = self._rate_mark
        rate = (self.frames_done - count) / max(1e-9, now - since)
        self._rate_mark = (now, self.frames_done)
        return f"{rate:.1f} frames/s, {self.frames_done} scored, queue {self.work.qsize()}, {len(self.engine.lines)} lines"
