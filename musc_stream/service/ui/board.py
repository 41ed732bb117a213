"""What the live line page shows, per line: recent scores, frames, alerts and their pictures.

The sink stage hands each published decision to ``Board.offer``, which only queues it (never
blocks: a full inbox skips the page update and counts it). A worker thread of its own encodes the
pictures and updates the state, so a slow encode can never hold up audit, publish or ack. The
HTTP threads read snapshots and pictures under one lock.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from musc_stream.stream.records import Decision

logger = logging.getLogger(__name__)

INBOX = 64  # decisions waiting for their pictures; more means the page is behind: skip, count
RATE_WINDOW_S = 10.0  # frames/s over this many seconds
VERDICTS = ("not_defect", "defect")


@dataclass
class _Seen:
    """The parts of a decision the page needs, taken before the sink frees its arrays."""

    line: str
    frame_id: str
    score: float
    threshold: float | None
    is_anomaly: bool
    warmup: bool
    changeover: bool
    drift_suspected: bool
    window_size: int
    memory_size: int
    regions: list[dict]
    decided_at: float
    camera: str | None
    model: str
    weights: str
    image: np.ndarray | None
    heatmap: np.ndarray | None

    @classmethod
    def of(cls, d: Decision, image: np.ndarray | None) -> _Seen:
        return cls(d.line, d.frame_id, float(d.score), d.threshold, bool(d.is_anomaly), bool(d.warmup),
                   bool(d.changeover), bool(d.drift_suspected), int(d.window_size), int(d.memory_size),
                   [r.as_dict() for r in d.regions], float(d.decided_at or time.time()), d.camera, d.model,
                   d.weights, image if image is not None else d.image, d.heatmap)

    def entry(self) -> dict[str, Any]:
        return {"frame_id": self.frame_id, "score": _num(self.score), "threshold": _num(self.threshold),
                "is_anomaly": self.is_anomaly, "warmup": self.warmup, "changeover": self.changeover,
                "drift_suspected": self.drift_suspected, "regions": self.regions, "decided_at": self.decided_at,
                "camera": self.camera}


@dataclass
class _Line:
    line: str
    points: deque
    recent: deque
    alerts: deque
    frames: int = 0
    alert_count: int = 0
    latest: dict | None = None
    latest_alert: dict | None = None
    window_size: int = 0
    memory_size: int = 0
    threshold: float | None = None
    warmup: bool = True
    model: str = ""
    weights: str = ""
    last_changeover: dict | None = None
    reset_requested_at: float | None = None
    feedback: dict[str, str] = field(default_factory=dict)  # frame_id → verdict accepted by the service
    fading: deque = field(default_factory=deque)  # frame ids no longer shown whose pictures are still kept


def _num(value: float | None) -> float | None:
    return None if value is None or value != value else round(float(value), 6)


def frame_jpeg(image: np.ndarray, side: int) -> bytes:
    """The clean frame as a JPEG whose longest side is at most ``side``."""
    picture = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    picture.thumbnail((side, side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _default_heatmap_picture(heatmap: np.ndarray, image: np.ndarray | None, threshold: float | None,
                             side: int) -> bytes:
    """The alert's heatmap PNG, made by the MQTT sink's own function (same colours as the alert)."""
    from musc_stream.service.sinks.mqtt_publish import heatmap_png

    vmax = max(float(heatmap.max()), threshold or 0.0)
    scale = min(1.0, side / max(heatmap.shape[:2]))
    return heatmap_png(heatmap, image, vmax=vmax, scale=scale)


class Board:
    """Per-line state for the page. ``offer`` from the sink stage; everything else from HTTP threads."""

    def __init__(self, history: int = 300, recent: int = 24, picture_side: int = 480,
                 status: Callable[[], dict] | None = None, on_error: Callable[[], None] | None = None,
                 heatmap_picture: Callable[..., bytes] = _default_heatmap_picture, clock=time.time) -> None:
        self.history = history
        self.recent = recent
        self.picture_side = picture_side
        self._status = status or (lambda: {})
        self._on_error = on_error or (lambda: None)
        self._heatmap_picture = heatmap_picture
        self._clock = clock
        self._lock = threading.Condition()
        self._lines: dict[str, _Line] = {}
        self._pictures: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
        self._decided: deque[float] = deque()  # decided_at of recent frames, for frames/s
        self._inbox: queue.Queue[_Seen | None] = queue.Queue(maxsize=INBOX)
        self.version = 0  # bumped on every change; /events waits on it
        self.skipped = 0  # page updates skipped because the inbox was full
        self.errors = 0  # page updates that failed (counted in the housekeeping metric too)
        self._thread: threading.Thread | None = None
        self._started = clock()

    # -- the sink's side -------------------------------------------------------------------------
    def offer(self, decision: Decision, image: np.ndarray | None = None) -> bool:
        """Queue one published decision (and its clean frame) for the page; never blocks."""
        try:
            self._inbox.put_nowait(_Seen.of(decision, image))
            return True
        except queue.Full:
            with self._lock:
                self.skipped += 1
            return False

    def start(self) -> Board:
        self._thread = threading.Thread(target=self._work, name="musc-line-page", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        try:
            self._inbox.put(None, timeout=2.0)
        except queue.Full:
            pass
        self._thread.join(timeout=5.0)
        self._thread = None

    def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait until every offered decision is on the board (tests, and the page after a stop)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._inbox.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def _work(self) -> None:
        while True:
            seen = self._inbox.get()
            try:
                if seen is None:
                    return
                self._add(seen)
            except Exception as exc:  # noqa: BLE001 - the page must never take the service down
                with self._lock:
                    self.errors += 1
                logger.error("line page update for frame %s of line %s failed (%s: %s); carrying on",
                             ascii(seen.frame_id), seen.line, type(exc).__name__, exc)
                self._on_error()
            finally:
                self._inbox.task_done()

    def _add(self, seen: _Seen) -> None:
        pictures = {}
        if seen.image is not None:
            pictures["frame"] = frame_jpeg(seen.image, self.picture_side)
        if seen.is_anomaly and seen.heatmap is not None:
            pictures["heatmap"] = self._heatmap_picture(seen.heatmap, seen.image, seen.threshold, self.picture_side)
        entry = seen.entry()
        entry["pictures"] = sorted(pictures)
        with self._lock:
            state = self._line(seen.line)
            for kind, data in pictures.items():
                self._pictures[(seen.line, seen.frame_id, kind)] = data
            state.frames += 1
            state.points.append({"frame_id": seen.frame_id, "score": entry["score"], "threshold": entry["threshold"],
                                 "alert": seen.is_anomaly, "t": seen.decided_at})
            self._keep(state, state.recent, entry)
            state.latest = entry
            if seen.is_anomaly:
                state.alert_count += 1
                self._keep(state, state.alerts, entry)
                state.latest_alert = entry
            if seen.changeover:
                state.last_changeover = {"frame_id": seen.frame_id, "at": seen.decided_at,
                                         "detected": seen.drift_suspected}
                state.reset_requested_at = None
            state.window_size, state.memory_size = seen.window_size, seen.memory_size
            state.threshold, state.warmup = seen.threshold, seen.warmup
            state.model, state.weights = seen.model, seen.weights
            self._decided.append(self._clock())
            self._changed()

    def _line(self, line: str) -> _Line:
        state = self._lines.get(line)
        if state is None:
            state = self._lines[line] = _Line(line, deque(maxlen=self.history), deque(), deque())
        return state

    def _keep(self, state: _Line, kept: deque, entry: dict) -> None:
        """Append; what falls off and the other list does not show loses its feedback mark, and its
        pictures after ``recent`` more frames have fallen off: a page one snapshot behind still asks
        for them (a 404 there was a flaky test and a broken image for the operator)."""
        kept.append(entry)
        while len(kept) > self.recent:
            old = kept.popleft()["frame_id"]
            if not self._shown(state, old):
                state.feedback.pop(old, None)
                state.fading.append(old)
        while len(state.fading) > self.recent:
            gone = state.fading.popleft()
            if not self._shown(state, gone):
                for kind in ("frame", "heatmap"):
                    self._pictures.pop((state.line, gone, kind), None)

    @staticmethod
    def _shown(state: _Line, frame_id: str) -> bool:
        return any(e["frame_id"] == frame_id for e in state.recent) or any(e["frame_id"] == frame_id for e in state.alerts)

    def wake(self) -> None:
        """Wake every ``wait`` now (the server is stopping)."""
        with self._lock:
            self._lock.notify_all()

    def _changed(self) -> None:
        self.version += 1
        self._lock.notify_all()

    # -- the page's side --------------------------------------------------------------------------
    def knows(self, line: str, frame_id: str | None = None) -> bool:
        with self._lock:
            state = self._lines.get(line)
            if state is None or frame_id is None:
                return state is not None
            return any(e["frame_id"] == frame_id for e in state.alerts) or \
                any(e["frame_id"] == frame_id for e in state.recent)

    def note_reset(self, line: str) -> None:
        """A reset the page asked for is queued; shown until the line's changeover decision arrives."""
        with self._lock:
            self._line(line).reset_requested_at = self._clock()
            self._changed()

    def note_feedback(self, line: str, frame_id: str, verdict: str) -> None:
        with self._lock:
            self._line(line).feedback[frame_id] = verdict
            self._changed()

    def picture(self, line: str, frame_id: str, kind: str) -> bytes | None:
        with self._lock:
            return self._pictures.get((line, frame_id, kind))

    def wait(self, version: int, timeout_s: float) -> int:
        """Block until the board changes after ``version`` (or the timeout); the current version."""
        with self._lock:
            self._lock.wait_for(lambda: self.version != version, timeout=timeout_s)
            return self.version

    def snapshot(self) -> dict[str, Any]:
        """Everything the page draws, as plain JSON data."""
        now = self._clock()
        try:
            service = dict(self._status())
        except Exception as exc:  # noqa: BLE001 - a status read must not break the page
            service = {"status_error": f"{type(exc).__name__}: {exc}"}
        with self._lock:
            while self._decided and self._decided[0] < now - RATE_WINDOW_S:
                self._decided.popleft()
            span = min(RATE_WINDOW_S, now - self._started)  # a young board has seen less than the window
            service["frames_per_s"] = round(len(self._decided) / max(span, 1.0), 2)
            service["page_updates_skipped"] = self.skipped
            service["page_update_errors"] = self.errors
            lines = {}
            for name, s in sorted(self._lines.items()):
                lines[name] = {
                    "line": name, "frames": s.frames, "alerts_total": s.alert_count,
                    "window_size": s.window_size, "memory_size": s.memory_size,
                    "threshold": _num(s.threshold), "warmup": s.warmup, "model": s.model, "weights": s.weights,
                    "last_changeover": s.last_changeover, "reset_requested_at": s.reset_requested_at,
                    "latest": s.latest, "latest_alert": s.latest_alert,
                    "points": list(s.points),
                    "recent": list(reversed(s.recent)),
                    "alerts": [dict(e, feedback=s.feedback.get(e["frame_id"])) for e in reversed(s.alerts)],
                }
            return {"version": self.version, "now": now, "service": service, "lines": lines}
