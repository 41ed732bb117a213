"""The service: wiring, lifecycle, the engine thread's loop, signals and systemd notify.

Stages (threads): paho's network thread (routing, cheap checks, refusal before decode); two decode
workers (JPEG/PNG decode and validation, enqueued in arrival order); the scoring stage, which
alone owns the engine and the line state (dedupe, backbone, scoring, resets, snapshots); the sink
stage, which owns the audit and the spool (spool → audit → publish → ack), so scoring never waits
on disk or the network; the metrics HTTP thread. Ingest and scoring meet in one bounded queue
(frames, resets) plus a refusal queue (frames ingest refused, audited before their ack); scoring
and sink in a short bounded queue of outcomes, handled strictly in order.

Delivery (README "Guarantees"): a frame is acked only once its decision or failure is in a
closed Parquet file, or, while the engine holds it for warm-up, once it is in the fsynced spool
(spool.py), so held frames never fill the broker's in-flight quota. A (line, frame_id) is decided
at most once: ids held, queued, or decided (rebuilt from the audit on start) are answered as
``duplicate``. Acks of messages from an earlier connection are dropped.
"""

from __future__ import annotations

import logging
import queue
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import torch

from musc_stream.model.backbone import Backbone, BackboneSpec, load_backbone
from musc_stream.service import systemd
from musc_stream.service.budget import ByteBudget
from musc_stream.service.config import Settings
from musc_stream.service.dedupe import RecentIds, decided_in_audit, last_decisions
from musc_stream.service.frames import is_valid_id
from musc_stream.service.heartbeat import Heartbeat
from musc_stream.service.ingest import COMMANDS, Ack, Ingest, LineShares, ResetCommand, WorkItem
from musc_stream.service.mqtt_client import Topics, connect_kwargs, create_client, offline_payload
from musc_stream.service.sinks.audit import AuditLog
from musc_stream.service.sinks.mqtt_publish import MqttPublisher
from musc_stream.service.sinks.prometheus import Metrics, start_http_server
from musc_stream.service.spool import FrameSpool
from musc_stream.service.ui import Board, LinePage, LinePageBindError
from musc_stream.state.writer import SnapshotWriter
from musc_stream.stream.engine import Engine
from musc_stream.stream.feedback import (DEFECT, ERROR, RECORDED, APPLIED, ALREADY_NORMAL, UNKNOWN_FRAME, FeedbackCommand,
                                         FeedbackError, FeedbackResult, feedback_filter, normalise_verdict)
from musc_stream.stream.records import Decision, Frame, FrameFailure

logger = logging.getLogger(__name__)

_RECENT_IDS = 100_000  # decided (line, frame_id) pairs remembered to answer duplicates
_REFUSALS = 10_000  # refused frames waiting for their audit row
_DECODE_WORKERS = 2  # JPEG/PNG decode threads (PIL releases the GIL while decoding)
# CONNACK reasons no retry can cure: client id invalid, bad user/password, not authorized, banned,
# bad auth method (MQTT 5 codes; paho maps MQTT 3.1.1's 2, 4, 5 onto them).
_PERMANENT_REFUSALS = {0x85, 0x86, 0x87, 0x8A, 0x8C}
# Failure reasons that are drops of a valid frame (counted as drops, not as frame errors).
_DROPS = {"queue_full", "stale", "duplicate", "reset_in_warmup"}
_FEEDBACK_WAIT_S = 5.0  # the line page waits this long for the scoring stage to say what a verdict did

Key = tuple[str, str]


class StartupError(RuntimeError):
    """Start-up cannot go on (audit or state folder unusable); the message says what to fix."""


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


@dataclass
class _Held:
    """A frame the engine holds for warm-up: its ack (None once spooled and acked) and spool file.
    The sink reads ``ack`` and ``spool`` when it answers the frame, so a frame spooled by an
    earlier outcome is never acked twice."""

    frame: Frame
    ack: Ack | None
    spool: Path | None = None
    answered: bool = False  # set by the scoring stage once a decision or failure is on its way


@dataclass
class _Outcome:
    """What one pass of the engine thread must make durable, publish and ack, in that order."""

    decisions: list[tuple[Decision, _Held | None]] = field(default_factory=list)
    failures: list[tuple[FrameFailure, _Held | None]] = field(default_factory=list)
    to_spool: list[_Held] = field(default_factory=list)
    acks: list[Ack | None] = field(default_factory=list)  # reset commands
    republish: list[Decision] = field(default_factory=list)  # decided before a restart, redelivered
    pictures: dict[Key, object] = field(default_factory=dict)  # clean frames for the line page (when on)
    feedback: list[tuple[FeedbackCommand, FeedbackResult]] = field(default_factory=list)  # audited, then acked


class _Reply:
    """Where the sink puts a feedback's result for the caller waiting in submit_feedback."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: FeedbackResult | None = None


def _key(item) -> Key:
    return (item.line, item.frame_id)


class Service:
    """One worker: subscribe, score, publish, audit, export metrics. start() → run() → stop()."""

    def __init__(self, settings: Settings, backbone: Backbone | None = None, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.topics = Topics(settings.mqtt)
        self.work: queue.Queue[WorkItem] = queue.Queue(maxsize=settings.engine.queue_size)
        self.refusals: queue.Queue[FrameFailure] = queue.Queue(maxsize=_REFUSALS)
        self.shares = LineShares(settings.engine.queue_size)  # per-line fair share of `work`
        self.budget = ByteBudget(settings.engine.max_queued_bytes)  # bytes of decoded frames waiting
        self._budgeted: dict[int, Frame] = {}  # frames taken off `work` whose bytes are not given back yet
        self._changeovers: dict[str, dict] = {}  # line → last changeover, on the status topic
        self.stop_event = threading.Event()
        self.subscribed = threading.Event()
        self.refused: str | None = None  # the broker's reason, when it refused us for good
        self.fatal: str | None = None  # why the engine thread gave up (a broken model)
        self.connect_error: str | None = None  # the last reason the broker could not be reached
        self._connect_attempts = 0
        self._stopped = False
        self._backbone = backbone
        self._recent = RecentIds(_RECENT_IDS)
        self._replayable: dict[Key, Decision] = {}  # newest decisions of the previous run
        self._held: dict[Key, _Held] = {}
        self._spooled_at_start: list = []
        self._consecutive_failures = 0
        self._connection = 0  # bumped on every connect and disconnect; acks carry it
        self._ack_lock = threading.Lock()
        self._thread: threading.Thread | None = None  # the scoring stage
        self._sink_thread: threading.Thread | None = None
        self._outcomes: queue.Queue[_Outcome | None] = queue.Queue(maxsize=4)
        self._beat_lock = threading.Lock()
        self._metrics_server = None
        self.metrics_port: int | None = None
        self.board: Board | None = None  # the live line page's state (ui.port set)
        self._line_page: LinePage | None = None
        self.ui_port: int | None = None
        self.client: mqtt.Client | None = None
        self.engine: Engine | None = None
        self.audit: AuditLog | None = None
        self.spool: FrameSpool | None = None
        self.publisher: MqttPublisher | None = None
        self.ingest: Ingest | None = None
        self.frames_done = 0
        self._rate_mark = (time.monotonic(), 0)
        self._problem: str | None = None  # shown in systemd STATUS while it lasts
        self._heartbeat = Heartbeat(settings.engine.behind_s, time.monotonic())

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
        self.metrics.watch_frame_bytes(lambda: self.budget.used, s.engine.max_queued_bytes)
        if s.metrics.enabled:
            self._metrics_server, self.metrics_port = start_http_server(self.metrics, s.metrics.host, s.metrics.port)
        if s.ui.port is not None:
            self._start_line_page()
        backbone = self._backbone or backbone_from_settings(s)
        self._warm_up(backbone)
        self.engine = Engine(backbone, s)
        for line in self.engine.load_state(Path(s.state.dir)):
            state = self.engine.lines[line]
            self.metrics.set_memory_patches(line, state.memory_size)
        # Snapshots are written off the scoring stage (state/writer.py); errors count as housekeeping.
        self._snapshot_writer = SnapshotWriter(self.engine.store, guard=lambda fn: self._guard("snapshot", fn),
                                               on_written=lambda job, n: self.metrics.observe_snapshot_bytes(n))
        self.engine.writer = self._snapshot_writer.start()
        self.metrics.set_info(model=f"{backbone.spec.name}@{backbone.image_size}", weights=backbone.weights_label)
        logger.info("model %s at %d px, weights: %s", backbone.spec.name, backbone.image_size, backbone.weights_label)
        self._open_durable_state()
        self._connect()
        self._wait_for_subscription(ready_timeout_s)
        self._sink_thread = threading.Thread(target=self._sink_loop, name="musc-sink", daemon=True)
        self._sink_thread.start()
        self._thread = threading.Thread(target=self._loop, name="musc-engine", daemon=True)
        self._thread.start()
        systemd.ready()
        logger.info("service ready: %s on %s:%d", self.topics.subscribe_frames, s.mqtt.host, s.mqtt.port)

    def _open_durable_state(self) -> None:
        """Audit log, warm-up spool and the decided ids; a folder we cannot write stops start-up
        with one line saying which and why."""
        s = self.settings
        try:
            self.audit = AuditLog(Path(s.audit.dir), rotate_s=s.audit.rotate_s) if s.audit.enabled else None
        except (OSError, RuntimeError) as exc:
            raise StartupError(f"audit folder {s.audit.dir} unusable: {exc}") from None
        try:
            self.spool = FrameSpool(Path(s.state.dir) / "spool")
            self._spooled_at_start = self.spool.load()
        except OSError as exc:
            raise StartupError(f"state folder {s.state.dir} unusable for the warm-up spool: {exc}") from None
        if self.audit is not None:
            self._recent = decided_in_audit(Path(s.audit.dir), _RECENT_IDS)
            self._replayable = last_decisions(Path(s.audit.dir))
        if self._spooled_at_start:
            logger.info("%d frame(s) held in warm-up before the last stop are fed back first",
                        len(self._spooled_at_start))

    def _start_line_page(self) -> None:
        """The live line page (ui.port set): a board fed by the sink stage and its HTTP server."""
        u = self.settings.ui
        self.board = Board(u.history, u.recent, u.picture_side, status=self._page_status,
                           on_error=lambda: self.metrics.observe_housekeeping_error("line_page")).start()
        feedback = self.submit_feedback
        try:
            self._line_page = LinePage(self.board, u.host, u.port, reset=self.request_reset,
                                       feedback=(lambda line, frame_id, verdict: feedback(line, frame_id, verdict,
                                                                                          "line_page"))
                                       if feedback is not None else None)
        except LinePageBindError as exc:
            self.board.stop()
            raise StartupError(str(exc)) from None
        self.ui_port = self._line_page.port

    def request_reset(self, line: str) -> str | None:
        """A product changeover asked for outside MQTT (the line page): the same ResetCommand a
        line/<id>/reset message makes, on the same queue, so it never overtakes frames queued
        before it. None when queued, else a one-line reason."""
        if not re.fullmatch(self.settings.frames.line_id_pattern, line):
            return f"line id {line!r} does not match frames.line_id_pattern"
        try:
            self.work.put_nowait(ResetCommand(line, None, time.time()))
        except queue.Full:
            return f"the service is busy (queue of {self.work.maxsize} full); try again in a moment"
        return None

    def submit_feedback(self, line: str, frame_id: str, verdict: str, source: str = "api",
                        user: str | None = None) -> str | None:
        """An operator's verdict on a decided frame from outside MQTT (the line page): the same
        FeedbackCommand a line/<id>/feedback message makes, applied by the scoring stage in order
        with the frames. Waits (up to a few seconds) until it is applied and audited. None when
        accepted; otherwise one line saying why it did nothing to the model (busy, bad input, or the
        frame is not known any more: that verdict is still audited)."""
        if not isinstance(line, str) or not re.fullmatch(self.settings.frames.line_id_pattern, line):
            return f"line id {line!r} does not match frames.line_id_pattern"
        if not is_valid_id(frame_id):
            return f"frame_id {frame_id!r} must be 1-128 printable characters (the id of a result or alert)"
        try:
            verdict = normalise_verdict(verdict)
        except FeedbackError as exc:
            return str(exc)
        reply = _Reply()
        command = FeedbackCommand(line, frame_id, verdict, str(source)[:64] or "api", user, None, time.time(), reply)
        try:
            self.work.put_nowait(command)
        except queue.Full:
            return f"the service is busy (queue of {self.work.maxsize} full); try again in a moment"
        if threading.current_thread() is self._thread or not reply.done.wait(_FEEDBACK_WAIT_S):
            logger.info("feedback on frame %s of line %s queued; its outcome goes to the audit", ascii(frame_id), line)
            return None  # queued: the scoring stage is busy, the verdict is applied when it gets there
        result = reply.result
        if result is None or result.outcome in (APPLIED, ALREADY_NORMAL, RECORDED) or \
                (result.outcome == UNKNOWN_FRAME and verdict == DEFECT):
            return None  # a defect verdict is for the quality team: recorded whatever the model knows
        return result.detail

    def _page_status(self) -> dict:
        """Service-wide state for the line page (read from its HTTP threads: cheap reads only)."""
        s = self.settings.mqtt
        model = self.engine.backbone if self.engine is not None else None
        return {"instance": s.instance, "broker": f"{s.host}:{s.port}",
                "connected": bool(self.client is not None and self.client.is_connected()),
                "problem": self._problem, "queue": self.work.qsize(), "queue_capacity": self.work.maxsize,
                "held": len(self._held), "scored": self.frames_done,
                "model": f"{model.spec.name}@{model.image_size}" if model else "",
                "weights": model.weights_label if model else ""}

    def _wait_for_subscription(self, timeout_s: float | None) -> None:
        """Block until the frame subscription is live; a refusal that retrying cannot cure (bad
        credentials, banned, bad client id) ends start-up at once with the broker's reason."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        s = self.settings.mqtt
        while not self.subscribed.wait(0.1):
            if self.refused is not None:
                raise ConnectionRefusedError(f"broker {s.host}:{s.port} refused the service: {self.refused}")
            if deadline is not None and time.monotonic() > deadline:
                why = self.connect_error or "connected but the subscription was not confirmed"
                raise TimeoutError(f"no subscription to broker {s.host}:{s.port} within {timeout_s:g} s "
                                   f"({self._connect_attempts} attempt(s)): {why}")

    def run(self) -> int:
        """Block until SIGTERM/SIGINT (or stop_event), then stop cleanly. Returns the exit code:
        non-zero when the engine thread gave up (broken model) or died, so systemd restarts us."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        code = 0
        while not self.stop_event.wait(0.5):
            dead = [t.name for t in (self._thread, self._sink_thread) if t is not None and not t.is_alive()]
            if self.ingest is not None and not self.ingest.alive:
                dead.append("a decode")
            if dead:
                reason = self.fatal or f"{' and '.join(dead)} thread died unexpectedly (see the traceback above)"
                logger.critical("stopping: %s", reason)
                systemd.status(f"stopping: {reason}")
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
        if self._sink_thread is not None:
            self._handoff(None)  # the sink answers what scoring handed it, then ends
            self._sink_thread.join(timeout=60)
        if self.audit is not None:
            self._guard("audit_close", self.audit.close)
        if self.engine is not None and save_state:  # the final snapshot: everything, synchronously
            self._guard("snapshot", lambda: self.metrics.observe_snapshot_bytes(
                self.engine.save_state(Path(self.settings.state.dir))))
        if getattr(self, "_snapshot_writer", None) is not None:
            self._snapshot_writer.stop()
        if self.client is not None:
            # Frames still queued are not acked: the broker redelivers them. Held ones are spooled.
            info = self.client.publish(self.topics.status, offline_payload(self.settings.mqtt.instance),
                                       qos=1, retain=True)
            if self.client.is_connected():
                try:
                    info.wait_for_publish(5)
                except RuntimeError:  # the connection went away meanwhile
                    pass
            self.client.disconnect()
            self.client.loop_stop()
        if self.ingest is not None:
            self.ingest.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self._line_page is not None:
            self._line_page.shutdown()
            self.board.stop()
        logger.info("service stopped after %d frames", self.frames_done)

    def _warm_up(self, backbone: Backbone) -> None:
        """One forward pass before READY so the first real frame does not pay for lazy init."""
        import numpy as np

        backbone.embed([np.zeros((backbone.image_size, backbone.image_size, 3), np.uint8)], batch_size=1)

    # -- MQTT ---------------------------------------------------------------------------------
    def _connect(self) -> None:
        s = self.settings.mqtt
        self.client = create_client(s)
        self.publisher = MqttPublisher(self.client, self.topics, s.instance, s.qos, s.heatmap_mode,
                                       publish_clean_frame=s.publish_clean_frame)
        ingest = Ingest(self.topics, self.settings.frames, self.metrics, self.work, self.refusals,
                        ack=self._ack, connection=lambda: self._connection, shares=self.shares,
                        budget=self.budget)
        self.ingest = ingest
        ingest.start(workers=_DECODE_WORKERS)
        self.client.on_message = ingest.on_message
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self._connect_attempts = 1
        self.client.connect_async(**connect_kwargs(s))
        self.client.loop_start()

    def _on_connect_fail(self, client, userdata) -> None:
        """paho calls this inside its `except OSError`: the error is the reason to tell."""
        s = self.settings.mqtt
        exc = sys.exc_info()[1]
        delay = min(s.reconnect_max_s, max(1.0, s.reconnect_min_s) * 2 ** max(0, self._connect_attempts - 1))
        self.connect_error = f"cannot reach broker {s.host}:{s.port}: {exc or 'connection failed'}"
        logger.error("%s (attempt %d; next try in about %.0f s)", self.connect_error, self._connect_attempts, delay)
        systemd.status(f"waiting for broker: {self.connect_error}")
        self._problem = self.connect_error
        self._connect_attempts += 1

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        s = self.settings.mqtt
        if reason_code.is_failure:
            self.connect_error = f"broker {s.host}:{s.port} refused the connection: {reason_code}"
            logger.error("%s (attempt %d)", self.connect_error, self._connect_attempts)
            systemd.status(f"waiting for broker: {self.connect_error}")
            self._problem = self.connect_error
            self._connect_attempts += 1
            self.metrics.set_mqtt_connected(False)
            if reason_code.value in _PERMANENT_REFUSALS and not self.subscribed.is_set():
                self.refused = str(reason_code)
            return
        with self._ack_lock:
            self._connection += 1
        logger.info("connected to broker %s:%d (session present: %s)", s.host, s.port, flags.session_present)
        self.connect_error = self._problem = None
        self._connect_attempts = 1
        self.metrics.set_mqtt_connected(True)
        qos = s.qos
        client.subscribe([(self.topics.subscribe_frames, qos), (self.topics.reset_filter, qos),
                          (feedback_filter(self.topics.prefix), qos)])
        model = self.engine.backbone if self.engine else None
        self.publisher.publish_status(
            model=f"{model.spec.name}@{model.image_size}" if model else "",
            weights=model.weights_label if model else "",
            extra={"changeovers": dict(self._changeovers)},
        )

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(rc.is_failure for rc in reason_codes):
            self.connect_error = f"subscription refused: {[str(rc) for rc in reason_codes]}"
            logger.error(self.connect_error)
            return
        self.subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._ack_lock:
            self._connection += 1
        self.metrics.set_mqtt_connected(False)
        if not self.stop_event.is_set():
            s = self.settings.mqtt
            self._problem = f"disconnected from broker {s.host}:{s.port} ({reason_code}); reconnecting"
            logger.warning("%s with backoff up to %.0f s", self._problem, s.reconnect_max_s)
            systemd.status(self._problem)

    def _ack(self, ack: Ack | None) -> None:
        """Ack one message, unless it arrived on an earlier connection: its packet id may now name
        another message. The broker redelivers it and the dedupe answers the copy."""
        if ack is None or self.client is None:
            return
        with self._ack_lock:
            if ack.connection != self._connection:
                self.metrics.observe_stale_ack()
                logger.debug("ack of message %d from an earlier connection dropped", ack.mid)
                return
            self.client.ack(ack.mid, ack.qos)

    # -- the engine thread -----------------------------------------------------------------------
    def _next_batch(self) -> list[WorkItem]:
        items: list[WorkItem] = []
        while True:  # refusals first: each holds an unacked message until audited
            try:
                items.append(self.refusals.get_nowait())
            except queue.Empty:
                break
        try:
            items.append(self._take(timeout=0.05 if items else 0.2))
        except queue.Empty:
            return items
        max_age = self.settings.engine.max_age_s
        now = time.time()

        def fresh(item) -> bool:  # stale frames are dropped cheaply: they do not fill the batch
            return isinstance(item, Frame) and not (max_age and now - item.received_at > max_age)

        frames = int(fresh(items[-1]))
        deadline = time.monotonic() + self.settings.engine.max_batch_wait_s
        while frames < self.settings.model.batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._take(timeout=remaining) if remaining > 0 else self._take(timeout=None)
            except queue.Empty:
                break
            items.append(item)
            if isinstance(item, ResetCommand):
                break  # what follows a reset waits for the next batch (keeps arrival order simple)
            frames += fresh(item)
        self.metrics.set_queue_depth(self.work.qsize())
        return items

    def _take(self, timeout: float | None) -> WorkItem:
        """One item off the work queue (``timeout=None``: only if one is there now)."""
        item = self.work.get(timeout=timeout) if timeout is not None else self.work.get_nowait()
        if not isinstance(item, COMMANDS):
            self.shares.removed(item.line)
        return item

    def _loop(self) -> None:
        interval = systemd.watchdog_interval_s()
        last_ping = 0.0
        last_snapshot = last_beat = time.monotonic()
        self._feed_spooled()
        while not self.stop_event.is_set() and self.fatal is None:
            items = self._next_batch()
            if items:
                self._handle(items)
                self._settle_budget(items)
            now = time.monotonic()
            if now - last_snapshot >= self.settings.state.snapshot_interval_s:
                last_snapshot = now
                self._guard("snapshot", self._snapshot_tick)
            if now - last_beat >= self.settings.engine.heartbeat_s:
                last_beat = now
                self._guard("heartbeat", self._log_heartbeat)
            if now - last_ping >= (interval / 2 if interval else 5.0) and self._sink_thread.is_alive():
                last_ping = now
                self._ping()
        if self.fatal is not None:
            logger.critical("engine stopped: %s", self.fatal)
            systemd.status(f"stopping: {self.fatal}")

    def _snapshot_tick(self) -> None:
        """Plan and copy what changed (cheap, here on the scoring stage); the writer thread writes it.
        Then idle lines are evicted (engine.idle_evict_s)."""
        self.engine.save_state(Path(self.settings.state.dir), due_only=True)
        for line in self.engine.evict_idle():
            self.metrics.observe_eviction(line)

    def _ping(self) -> None:
        systemd.watchdog()
        systemd.status(self._problem or self._status_line())
        if torch.cuda.is_available():
            self._guard("gpu_metrics", lambda: self.metrics.set_gpu_memory_bytes(torch.cuda.memory_allocated()))

    def _feed_spooled(self) -> None:
        """Frames held in warm-up before the last stop go to the engine before any new frame;
        those already decided (the crash came between audit and spool delete) are dropped."""
        pending = self._spooled_at_start
        self._spooled_at_start = []
        fresh = []
        for spooled in pending:
            if _key(spooled.frame) in self._recent:
                self.spool.delete(spooled.path)
            else:
                fresh.append(spooled)
        size = self.settings.model.batch_size
        for start in range(0, len(fresh), size):
            chunk = fresh[start:start + size]
            out = _Outcome()
            self._score([s.frame for s in chunk], out, spool_paths={_key(s.frame): s.path for s in chunk})
            self._handoff(out)

    def _handle(self, items: list[WorkItem]) -> None:
        """One pass: dedupe and age-check frames, score them in arrival order (a reset splits the
        pass, so it never overtakes the frames before it), then audit → publish → ack."""
        out = _Outcome()
        segment: list[Frame] = []
        seen: set[Key] = set()
        now = time.time()
        max_age = self.settings.engine.max_age_s
        for item in items:
            if isinstance(item, FrameFailure):
                out.failures.append((item, None))
            elif isinstance(item, ResetCommand):
                self._score(segment, out)
                segment, seen = [], set()
                self._apply_reset(item, out)
            elif isinstance(item, FeedbackCommand):  # after the frames before it (it may name one of them)
                self._score(segment, out)
                segment, seen = [], set()
                self._apply_feedback(item, out)
            elif (why := self._duplicate(item, seen)) is not None:
                out.failures.append((FrameFailure("duplicate", why, item.line, item.frame_id, item.received_at,
                                                  item.ack), None))
                again = self._replayable.pop(_key(item), None) if item.redelivered else None
                if again is not None:
                    out.republish.append(again)
            elif max_age and now - item.received_at > max_age:
                age = now - item.received_at
                out.failures.append((FrameFailure(
                    "stale", f"waited {age:.1f} s in the service, over engine.max_age_s={max_age:g}; not scored "
                    "(the service gets more frames than it can score)", item.line, item.frame_id,
                    item.received_at, item.ack), None))
            else:
                seen.add(_key(item))
                segment.append(item)
        self._score(segment, out)
        self._handoff(out)

    def _settle_budget(self, items: list[WorkItem]) -> None:
        """Give back the byte budget of frames no longer waiting: scored, dropped, or answered after
        the engine held them for warm-up (held frames keep their bytes until then)."""
        for item in items:
            if isinstance(item, Frame) and item.budget is not None:
                self._budgeted[id(item)] = item
        held = {id(h.frame) for h in self._held.values()}
        for key in [k for k in self._budgeted if k not in held]:
            self.budget.release(self._budgeted.pop(key).budget)

    def _duplicate(self, frame: Frame, seen: set[Key]) -> str | None:
        key = _key(frame)
        if key in seen:
            where = "twice in one batch"
        elif key in self._held:
            where = "already received and held for warm-up"
        elif key in self._replayable and frame.redelivered:
            where = "decided before the last restart (a redelivery); its result is published again"
        elif key in self._recent:
            where = "already decided"
        else:
            return None
        logger.warning("duplicate frame id %s on line %s (%s): answered as duplicate", ascii(frame.frame_id),
                       frame.line, where)
        return (f"frame id {where} on this line: not scored again. A redelivery needs nothing; a camera "
                "whose counter restarted must send new frame ids")

    def _score(self, frames: list[Frame], out: _Outcome, spool_paths: dict[Key, Path] | None = None) -> None:
        """Run the engine on ``frames``; sort what comes back into decisions (with the ack of the
        frame, held or new) and frames now held."""
        if not frames:
            return
        spool_paths = spool_paths or {}
        new = {_key(f): f for f in frames}
        self.metrics.observe_batch(len(frames))
        try:
            decisions = self.engine.process(frames)
        except Exception as exc:  # noqa: BLE001 - a batch that cannot be scored must not kill the service
            self._scoring_failed(frames, exc, out, spool_paths)
            return
        self._consecutive_failures = 0
        changed = [d for d in decisions if d.changeover]
        if changed:
            self._guard("status", lambda: self._announce_changeovers(changed))
        for d in decisions:
            key = _key(d)
            if key in new:
                frame = new.pop(key)
                d.ack = frame.ack
                held = _Held(frame, None, spool_paths[key], True) if key in spool_paths else None
            elif key in self._held:
                held = self._held.pop(key)
                frame = held.frame
                held.answered = True
                d.ack = None  # the sink takes the held frame's ack (None once spooled and acked)
            else:  # answered already (a failed batch took it); never decide a frame twice
                logger.warning("engine released frame %s of line %s that was already answered; decision dropped",
                               ascii(d.frame_id), d.line)
                continue
            self._recent.add(key)  # from now on a copy is a duplicate, durable or not yet
            out.decisions.append((d, held))
            if self.board is not None:  # decisions keep the frame only for alerts; the page shows all
                out.pictures[key] = frame.image
        self._guard("metrics", lambda: self._observe_lines({d.line for d in decisions}))
        for key, frame in new.items():  # the engine holds these until the line has references
            held = _Held(frame, frame.ack, spool_paths.get(key))
            self._held[key] = held
            if held.spool is None:
                out.to_spool.append(held)
        self._reconcile({f.line for f in frames}, out, "dropped_by_engine",
                        "the engine dropped this frame while it was held for warm-up")

    def _announce_changeovers(self, decisions: list[Decision]) -> None:
        """A product changeover (reset command or detected drift) goes on the retained status topic,
        so an operator's dashboard sees which line re-learns its product and since when."""
        for d in decisions:
            self._changeovers[d.line] = {"frame_id": d.frame_id, "at": d.decided_at,
                                         "detected": d.drift_suspected}
            logger.warning("line %s: product changeover at frame %s (%s); the line warms up again",
                           d.line, ascii(d.frame_id), "detected" if d.drift_suspected else "reset command")
        model = self.engine.backbone
        self.publisher.publish_status(model=f"{model.spec.name}@{model.image_size}", weights=model.weights_label,
                                      extra={"changeovers": dict(self._changeovers)})

    def _scoring_failed(self, frames: list[Frame], exc: Exception, out: _Outcome,
                        spool_paths: dict[Key, Path]) -> None:
        """Every frame of the batch, and every frame held for its lines (the engine may have just
        released them), gets a failure; after too many failed batches in a row the model is broken."""
        self._consecutive_failures += 1
        logger.error("scoring failed for %d frame(s) (%d in a row): %r", len(frames), self._consecutive_failures,
                     exc, exc_info=exc)
        detail = "internal error while scoring; see service log"
        for f in frames:
            key = _key(f)
            held = _Held(f, None, spool_paths[key], True) if key in spool_paths else None
            out.failures.append((FrameFailure("scoring_failed", detail, f.line, f.frame_id, f.received_at, f.ack),
                                 held))
        self._reconcile({f.line for f in frames}, out, "scoring_failed", detail)
        limit = self.settings.engine.max_scoring_failures
        if self._consecutive_failures >= limit:
            self.fatal = (f"model broken: {limit} batches in a row failed to score, last error: "
                          f"{type(exc).__name__}: {exc}")

    def _reconcile(self, lines: set[str], out: _Outcome, reason: str, detail: str) -> None:
        """Held frames of ``lines`` the engine no longer holds (it released them into a batch that
        failed, or dropped them) get a failure now, so no acked frame goes unanswered. Reads the
        engine's per-line ``pending``; without it, every held frame of those lines is answered."""
        still: set[int] = set()
        known = True
        for line in lines:
            state = self.engine.lines.get(line)
            pending = getattr(state, "pending", None) if state is not None else []
            if pending is None:
                known = False
                continue
            still.update(id(getattr(item, "frame", item)) for item in pending)
        for key in [k for k in self._held if k[0] in lines]:
            held = self._held[key]
            if known and id(held.frame) in still:
                continue
            del self._held[key]
            held.answered = True
            logger.warning("frame %s of line %s was held for warm-up and is answered as %s",
                           ascii(held.frame.frame_id), held.frame.line, reason)
            out.failures.append((FrameFailure(reason, detail, held.frame.line, held.frame.frame_id,
                                              held.frame.received_at), held))
        self.metrics.set_frames_held(len(self._held))

    def _apply_reset(self, command: ResetCommand, out: _Outcome) -> None:
        """Changeover: frames held for the line's warm-up belong to the old product and cannot be
        scored without references; each is answered (``reset_in_warmup``) before the reset."""
        for key in [k for k in self._held if k[0] == command.line]:
            held = self._held.pop(key)
            held.answered = True
            out.failures.append((FrameFailure(
                "reset_in_warmup", "the line was reset before this frame had enough references to be scored",
                held.frame.line, held.frame.frame_id, held.frame.received_at), held))
        self.metrics.set_frames_held(len(self._held))
        try:
            self.engine.reset(command.line)
            self.metrics.set_window_fill(command.line, 0)
        except Exception:  # noqa: BLE001
            logger.exception("reset of line %s failed", command.line)
            self.metrics.observe_housekeeping_error("reset")
        out.acks.append(command.ack)

    def _apply_feedback(self, command: FeedbackCommand, out: _Outcome) -> None:
        """An operator's verdict, applied here because this stage alone owns the line state."""
        try:
            result = self.engine.apply_feedback(command.line, command.frame_id, command.verdict)
        except Exception:  # noqa: BLE001 - a verdict must not stop scoring
            logger.exception("feedback on frame %s of line %s failed", ascii(command.frame_id), command.line)
            result = FeedbackResult(ERROR, "internal error applying the verdict; see service log")
        logger.info("line %s: frame %s marked %s (%s, from %s): %s", command.line, ascii(command.frame_id),
                    command.verdict, result.outcome, command.source, result.detail)
        if result.outcome == APPLIED:
            state = self.engine.lines.get(command.line)
            if state is not None:
                self.metrics.set_memory_patches(command.line, state.memory_size)
        out.feedback.append((command, result))

    # -- the sink stage ------------------------------------------------------------------------
    def _handoff(self, out: _Outcome | None) -> None:
        """Give one outcome to the sink; blocks while the sink is behind (back-pressure), never
        forever when the sink has died."""
        if out is not None and not (out.decisions or out.failures or out.acks or out.to_spool or out.feedback):
            return
        while True:
            try:
                self._outcomes.put(out, timeout=1.0)
                return
            except queue.Full:
                if self._sink_thread is None or not self._sink_thread.is_alive():
                    logger.error("sink stage is gone: %s outcome(s) not answered; the broker redelivers them",
                                 self._outcomes.qsize())
                    return

    def _sink_loop(self) -> None:
        """Answer outcomes in the order scoring made them; rotate the audit; end on None."""
        while True:
            try:
                out = self._outcomes.get(timeout=0.5)
            except queue.Empty:
                out = _Outcome()
            if out is None:
                return
            self._finish(out)
            if self.audit is not None:
                self._guard("audit_rotation", self.audit.maybe_rotate)

    def _finish(self, out: _Outcome) -> None:
        """Spool (then ack) newly held frames; audit, publish, ack the rest; forget spool files."""
        for held in out.to_spool:
            if held.answered:
                continue  # answered already: its decision or failure carries the ack
            try:
                held.spool = self.spool.write(held.frame)
            except Exception as exc:  # noqa: BLE001 - stays unacked instead: no loss, only quota
                logger.error("could not spool held frame %s of line %s (%s); it stays unacked until decided",
                             ascii(held.frame.frame_id), held.frame.line, exc)
                self.metrics.observe_housekeeping_error("spool")
                continue
            self._ack(held.ack)
            held.ack = None
        if not (out.decisions or out.failures or out.acks or out.feedback):
            return
        if not self._make_durable(out):
            return  # stopping with the audit failing: nothing acked, the broker redelivers
        started = time.perf_counter()
        for d, _ in out.decisions:
            self._guard("publish", lambda d=d: self.publisher.publish_decision(d, d.image))
        for f, _ in out.failures:
            self._guard("publish", lambda f=f: self.publisher.publish_failure(f))
        for d in out.republish:  # its first result may have died with the previous process
            self._guard("publish", lambda d=d: self.publisher.publish_decision(d, None))
        publish_s = time.perf_counter() - started
        if self.board is not None:  # only queued: the page's own thread draws the pictures
            for d, _ in out.decisions:
                self._guard("line_page", lambda d=d: self.board.offer(d, out.pictures.get(_key(d))))
        for d, held in out.decisions:
            d.latency_s["publish"] = publish_s / max(1, len(out.decisions))
            d.heatmap = d.image = None  # free the arrays early
            self._answer(d.ack, held)
            self._guard("metrics", lambda d=d: self._observe(d))
        for f, held in out.failures:
            self._answer(f.ack, held)
            if f.reason in _DROPS:
                if f.reason != "queue_full":  # counted by ingest when it refused the frame
                    self.metrics.observe_drop(f.line, f.reason)
                if f.reason in ("queue_full", "stale"):  # the line gets more than it can be given
                    with self._beat_lock:
                        self._heartbeat.dropped(f.line)
            else:
                self.metrics.observe_failure(f)
        for ack in out.acks:
            self._ack(ack)
        for command, result in out.feedback:
            self._guard("metrics", lambda c=command, r=result: self.metrics.observe_feedback(c.line, c.verdict,
                                                                                               r.outcome))
            if result.outcome == UNKNOWN_FRAME:  # the sender's answer on MQTT (the page gets it back too)
                self._guard("publish", lambda c=command, r=result: self.publisher.publish_failure(FrameFailure(
                    "feedback_unknown_frame", r.detail, c.line, c.frame_id, c.received_at)))
            elif self.board is not None and self.board.knows(command.line, command.frame_id):
                self._guard("line_page", lambda c=command: self.board.note_feedback(c.line, c.frame_id, c.verdict))
            self._ack(command.ack)
            if command.reply is not None:
                command.reply.result = result
                command.reply.done.set()
        self.frames_done += len(out.decisions)

    def _answer(self, ack: Ack | None, held: _Held | None) -> None:
        """Ack a durable answer: a held frame's own ack unless it was spooled (and acked) already,
        then forget its spool file."""
        if held is not None:
            ack, held.ack = held.ack, None
        self._ack(ack)
        if held is not None and held.spool is not None:
            self.spool.delete(held.spool)

    def _observe(self, d: Decision) -> None:
        self.metrics.observe_decision(d)
        with self._beat_lock:
            self._heartbeat.decided(d.line, d.end_to_end_s)

    def _observe_lines(self, lines: set[str]) -> None:
        """Per-line engine gauges, read on the scoring stage (the engine's only thread)."""
        for line in lines:
            state = self.engine.lines.get(line)
            if state is not None:
                self.metrics.set_window_fill(line, len(state.window))
                self.metrics.set_memory_patches(line, state.memory_size)
                # The threshold in force, as results say it: none until the line's window is full.
                value = state.threshold.value if state.steady or state.threshold.override is not None else None
                self.metrics.set_threshold(line, float("nan") if value is None else value)

    def _make_durable(self, out: _Outcome) -> bool:
        """Audit rows on disk before any ack; retried (saying why, keeping the watchdog fed) until
        it succeeds. False only when the service stops first: then nothing may be acked."""
        if self.audit is None:
            return True
        started = time.perf_counter()
        for d, _ in out.decisions:
            self._write_row(self.audit.write_decision, d)
        for f, _ in out.failures:
            self._write_row(self.audit.write_failure, f)
        model = self.engine.backbone if self.engine is not None else None
        for command, result in out.feedback:
            self._write_row(lambda c, r=result: self.audit.write_feedback(
                c, r, f"{model.spec.name}@{model.image_size}" if model else "", model.weights_label if model else ""),
                command)
        failing_since = None
        while True:
            try:
                self.audit.flush()
                break
            except Exception as exc:  # noqa: BLE001 - disk full, read-only, I/O error: wait, never lose
                if failing_since is None:
                    failing_since = time.monotonic()
                self.metrics.observe_housekeeping_error("audit_flush")
                self._problem = f"audit write failing ({type(exc).__name__}: {exc}); frames stay unacked"
                logger.error("%s; retrying in 1 s", self._problem)
                systemd.watchdog()  # alive and saying so: a restart would not fix the disk
                systemd.status(self._problem)
                if self.stop_event.wait(1.0):
                    return False
        if failing_since is not None:
            logger.warning("audit writes work again after %.0f s", time.monotonic() - failing_since)
            self._problem = None
        rows = len(out.decisions) + len(out.failures) + len(out.feedback)  # seconds per audit row
        self.metrics.observe_stage("audit", time.perf_counter() - started, frames=rows)
        return True

    def _write_row(self, write, record) -> None:
        """One audit row; a row the schema refuses (e.g. an id that is not valid UTF-8) becomes a
        failure row with the id escaped, so one odd payload cannot stop every later flush."""
        try:
            write(record)
        except (TypeError, ValueError) as exc:
            logger.error("audit refused the row of frame %s (%s); writing it with the id escaped",
                         ascii(record.frame_id), exc)
            safe = FrameFailure("unauditable", f"row refused by the audit schema: {exc}",
                                ascii(record.line) if record.line else None,
                                ascii(record.frame_id) if record.frame_id else None, record.received_at)
            try:
                self.audit.write_failure(safe)
            except (TypeError, ValueError):
                logger.error("audit refused the escaped row too; frame %s has no audit row", ascii(record.frame_id))
                self.metrics.observe_housekeeping_error("audit_row")

    def _guard(self, task: str, fn) -> None:
        """Housekeeping (snapshot, rotation, publish, metrics, close): any error is logged, counted
        in musc_housekeeping_errors_total{task} and survived."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            self.metrics.observe_housekeeping_error(task)
            logger.error("%s failed (%s: %s); carrying on", task, type(exc).__name__, exc,
                         exc_info=logger.isEnabledFor(logging.DEBUG))

    def _log_heartbeat(self) -> None:
        with self._beat_lock:
            info, behind = self._heartbeat.report(time.monotonic(), self.work.qsize(), len(self._held))
        logger.info(info)
        for line in behind:
            logger.warning(line)

    def _status_line(self) -> str:
        now = time.monotonic()
        since, count = self._rate_mark
        rate = (self.frames_done - count) / max(1e-9, now - since)
        self._rate_mark = (now, self.frames_done)
        return (f"{rate:.1f} frames/s, {self.frames_done} scored, queue {self.work.qsize()}, "
                f"held {len(self._held)}, {len(self.engine.lines)} lines")
