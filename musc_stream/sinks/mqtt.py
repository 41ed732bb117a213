"""MQTT sink: result, anomaly (with heatmap), error and status payloads, and their publishing."""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from matplotlib import colormaps
from PIL import Image

from musc_stream import __version__
from musc_stream.mqtt import Topics
from musc_stream.records import SCHEMA_VERSION, Decision, FrameFailure

logger = logging.getLogger(__name__)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000.0 * seconds, 3)


def result_record(d: Decision, instance: str) -> dict[str, Any]:
    """The versioned JSON record of one scored frame (line/<id>/result); documented in README."""
    latency = {k: _ms(v) for k, v in d.latency_s.items()}
    latency["end_to_end"] = _ms(d.end_to_end_s)
    return {
        "schema": SCHEMA_VERSION,
        "type": "result",
        "line": d.line,
        "frame_id": d.frame_id,
        "ts": d.ts,
        "camera": d.camera,
        "score": round(d.score, 6),
        "threshold": None if d.threshold is None else round(d.threshold, 6),
        "is_anomaly": d.is_anomaly,
        "warmup": d.warmup,
        "changeover": d.changeover,
        "window_score": None if d.window_score is None else round(d.window_score, 6),
        "memory_score": None if d.memory_score is None else round(d.memory_score, 6),
        "regions": [r.as_dict() for r in d.regions],
        "window_size": d.window_size,
        "memory_size": d.memory_size,
        "latency_ms": latency,
        "model": d.model,
        "weights": d.weights,
        "instance": instance,
        "decided_at": d.decided_at,
    }


def error_record(f: FrameFailure, instance: str) -> dict[str, Any]:
    """The JSON record of a frame that could not be scored (line/<id>/error)."""
    return {"schema": SCHEMA_VERSION, "type": "error", "line": f.line, "frame_id": f.frame_id,
            "reason": f.reason, "detail": f.detail, "received_at": f.received_at, "instance": instance}


def heatmap_png(heatmap: np.ndarray, image: np.ndarray | None = None, vmin: float | None = None,
                vmax: float | None = None) -> bytes:
    """A JET-coloured PNG of the map at frame size, blended over the frame when given.

    Colours span [vmin, vmax]; the publisher uses the map's median (the frame's normal background
    turns blue) up to the larger of the map's max and the threshold (only what exceeds the
    threshold reaches red).
    """
    low = float(np.median(heatmap) if vmin is None else vmin)
    high = float(heatmap.max() if vmax is None else vmax)
    span = high - low if high > low else 1.0
    rgb = colormaps["jet"](np.clip((heatmap - low) / span, 0.0, 1.0))[..., :3]
    if image is not None and image.shape[:2] == heatmap.shape:
        rgb = 0.5 * rgb + 0.5 * (image[..., :3] / 255.0)
    buffer = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class MqttPublisher:
    """Publishes decisions and failures (QoS from settings, never retained) and the status."""

    def __init__(self, client: mqtt.Client, topics: Topics, instance: str, qos: int = 1,
                 heatmap_mode: str = "inline"):
        self.client = client
        self.topics = topics
        self.instance = instance
        self.qos = qos
        self.heatmap_mode = heatmap_mode
        self.failed = 0

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=self.qos, retain=retain)
        # NO_CONN with QoS ≥ 1: paho keeps the message and sends it after reconnecting.
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN) or (
            info.rc == mqtt.MQTT_ERR_NO_CONN and self.qos == 0
        ):
            self.failed += 1
            logger.error("publish to %s failed: %s", topic, mqtt.error_string(info.rc))

    def publish_decision(self, d: Decision, image: np.ndarray | None = None) -> None:
        record = result_record(d, self.instance)
        self._publish(self.topics.result(d.line), json.dumps(record).encode())
        if not d.is_anomaly:
            return
        png = None
        if d.heatmap is not None:
            vmax = max(float(d.heatmap.max()), d.threshold or 0.0)
            png = heatmap_png(d.heatmap, image, vmax=vmax)
        alert = dict(record, type="anomaly")
        if png is not None and self.heatmap_mode in ("inline", "both"):
            alert["heatmap_png_b64"] = base64.b64encode(png).decode("ascii")
        self._publish(self.topics.anomaly(d.line), json.dumps(alert).encode())
        if png is not None and self.heatmap_mode in ("topic", "both"):
            self._publish(self.topics.heatmap(d.line), png)

    def publish_failure(self, f: FrameFailure) -> None:
        self._publish(self.topics.error(f.line), json.dumps(error_record(f, self.instance)).encode())

    def publish_status(self, model: str, weights: str, extra: dict[str, Any] | None = None) -> None:
        status = {"schema": SCHEMA_VERSION, "state": "online", "instance": self.instance,
                  "version": __version__, "model": model, "weights": weights, "since": time.time(),
                  **(extra or {})}
        self._publish(self.topics.status, json.dumps(status).encode(), retain=True)
