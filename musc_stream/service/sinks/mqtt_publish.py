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
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

from musc_stream import __version__
from musc_stream.service.config import DEFAULT_MAX_PUBLISH_BYTES
from musc_stream.service.frames import escape_text
from musc_stream.service.mqtt_client import Topics
from musc_stream.service.sinks.alert_picture import ColourScale, alert_png, fit_png, frame_png, natural_scale
from musc_stream.stream.records import SCHEMA_VERSION, Decision, FrameFailure

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
        "drift_suspected": d.drift_suspected,
        "target_false_alarms_per_1000": d.target_false_alarms_per_1000,
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
                vmax: float | None = None, scale: float = 1.0) -> bytes:
    """A JET-coloured PNG of the map at frame size (times ``scale``), blended over the frame when given.

    Colours span [vmin, vmax]; the publisher uses the map's median (the frame's normal background
    turns blue) up to the larger of the map's max and the threshold (only what exceeds the
    threshold reaches red). The range comes from the full-size map; a scaled picture is resized
    before colouring, so a 12 MP frame never costs a 12 MP colour image.
    """
    low = float(np.median(heatmap) if vmin is None else vmin)
    high = float(heatmap.max() if vmax is None else vmax)
    span = high - low if high > low else 1.0
    blend = image is not None and image.shape[:2] == heatmap.shape
    if scale < 1.0:
        height, width = heatmap.shape[:2]
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        heatmap = np.asarray(Image.fromarray(heatmap.astype(np.float32), mode="F")
                             .resize(size, Image.Resampling.BILINEAR))
        if blend:
            image = np.asarray(Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
                               .resize(size, Image.Resampling.BILINEAR))
    rgb = colormaps["jet"](np.clip((heatmap - low) / span, 0.0, 1.0))[..., :3]
    if blend:
        rgb = 0.5 * rgb + 0.5 * (image[..., :3] / 255.0)
    buffer = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class MqttPublisher:
    """Publishes decisions and failures (QoS from settings, never retained) and the status.

    An alert carries its picture (sinks/alert_picture.py), inline and/or on the heatmap topic, and
    optionally the clean frame on <prefix>/<line>/anomaly/frame; binary pictures carry the alert's
    frame_id and line as MQTT 5 user properties. Every payload is checked against the connection's
    limit first (``max_publish_bytes``, or the client's ``payload_limit(topic)``, which also honours
    the broker's MQTT 5 Maximum Packet Size): a picture is scaled down to fit, and a message that still does not fit is logged and
    counted, never sent, since a broker disconnects a client that sends an oversize packet. A
    publish that raises is logged and counted too: one message never costs the connection or the
    other lines' results.
    """

    def __init__(self, client: mqtt.Client, topics: Topics, instance: str, qos: int = 1,
                 heatmap_mode: str = "inline", max_publish_bytes: int | None = None, metrics: Any = None,
                 publish_clean_frame: bool = False):
        self.client = client
        self.topics = topics
        self.instance = instance
        self.qos = qos
        self.heatmap_mode = heatmap_mode
        self.publish_clean_frame = publish_clean_frame  # the frame itself on <prefix>/<line>/anomaly/frame
        self.max_publish_bytes = max_publish_bytes
        self.metrics = metrics  # sinks.metrics.Metrics, for musc_publish_failures_total
        self.failed = 0

    def payload_limit(self, topic: str) -> int:
        """Largest payload for ``topic`` on this connection now."""
        limits = [self.max_publish_bytes or getattr(self.client, "max_publish_bytes", None)
                  or DEFAULT_MAX_PUBLISH_BYTES]
        client_limit = getattr(self.client, "payload_limit", None)
        if callable(client_limit):
            limit = client_limit(topic)
            if limit is not None:
                limits.append(limit)
        return min(limits)

    def _fail(self, kind: str, reason: str, message: str, *args: Any) -> bool:
        self.failed += 1
        if self.metrics is not None:
            self.metrics.observe_publish_failure(kind, reason)
        logger.error(message, *args)
        return False

    def _publish(self, topic: str, payload: bytes, retain: bool = False, kind: str = "result",
                 properties: Properties | None = None) -> bool:
        limit = self.payload_limit(topic)
        if len(payload) > limit:
            return self._fail(kind, "too_large", "not publishing %d bytes to %s: over the %d-byte limit "
                              "(mqtt.max_publish_bytes, or the broker's maximum packet size)",
                              len(payload), escape_text(topic, 80), limit)
        try:
            extra = {} if properties is None else {"properties": properties}
            info = self.client.publish(topic, payload, qos=self.qos, retain=retain, **extra)
        except Exception as exc:  # noqa: BLE001 - paho raises ValueError for bad topics or sizes
            return self._fail(kind, "client_error", "publish to %s failed: %s: %s", escape_text(topic, 80),
                              type(exc).__name__, escape_text(str(exc), 200))
        # NO_CONN with QoS ≥ 1: paho keeps the message and sends it after reconnecting.
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN) or (
            info.rc == mqtt.MQTT_ERR_NO_CONN and self.qos == 0
        ):
            return self._fail(kind, "client_error", "publish to %s failed: %s", escape_text(topic, 80),
                              mqtt.error_string(info.rc))
        return True

    def _properties(self, d: Decision, **extra: str) -> Properties | None:
        """MQTT 5 user properties frame_id and line (and ``extra``) that pair a binary picture with
        its alert; None on MQTT 3.1.1, which has no properties (the picture goes out without them)."""
        if getattr(self.client, "_protocol", None) != mqtt.MQTTv5:
            return None
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("frame_id", d.frame_id), ("line", d.line), *extra.items()]
        props.ContentType = "image/png"
        return props

    def publish_decision(self, d: Decision, image: np.ndarray | None = None) -> None:
        record = result_record(d, self.instance)
        self._publish(self.topics.result(d.line), json.dumps(record).encode(), kind="result")
        if not d.is_anomaly:
            return
        alert = dict(record, type="anomaly")
        shape = None if d.heatmap is None else (image if image is not None else d.heatmap).shape[:2]
        start = None if shape is None else natural_scale(*shape)
        make = lambda scale: alert_png(d, image, scale)  # noqa: E731
        if shape is not None and self.heatmap_mode in ("inline", "both"):
            topic = self.topics.anomaly(d.line)
            scale_fields = dict(heatmap_png_b64="", heatmap_scale=1.0, heatmap_omitted="too_large",
                                heatmap_colour_scale={"low": 0.0, "high": 0.0})
            # base64 takes 4 bytes per 3; the rest of the alert and the key need their own room.
            room = self.payload_limit(topic) - len(json.dumps(dict(alert, **scale_fields)).encode()) - 64
            png, scale = fit_png(make, shape, start, max(0, room) * 3 // 4)
            if png is None:
                alert["heatmap_omitted"] = "too_large"
                logger.warning("alert %s of line %s goes out without its picture: no picture fits in %d bytes",
                               d.frame_id, d.line, room)
            else:
                colours = ColourScale.for_threshold(d.threshold, d.heatmap)
                alert["heatmap_png_b64"] = base64.b64encode(png).decode("ascii")
                alert["heatmap_scale"] = round(scale, 4)
                alert["heatmap_colour_scale"] = {"low": round(colours.low, 6), "high": round(colours.high, 6)}
                if scale < start:
                    logger.info("alert %s of line %s: picture scaled to %.3g to fit the publish limit",
                                d.frame_id, d.line, scale)
        self._publish(self.topics.anomaly(d.line), json.dumps(alert).encode(), kind="anomaly")
        if shape is not None and self.heatmap_mode in ("topic", "both"):
            topic = self.topics.heatmap(d.line)
            png, scale = fit_png(make, shape, start, self.payload_limit(topic))
            if png is None:
                self._fail("heatmap", "too_large", "heatmap of %s on line %s not published: no picture fits",
                           d.frame_id, d.line)
            else:
                self._publish(topic, png, kind="heatmap", properties=self._properties(d, scale=f"{scale:.4f}"))
        if image is not None and self.publish_clean_frame:
            topic = self.topics.frame(d.line)
            png, scale = fit_png(lambda s: frame_png(image, s), image.shape[:2], 1.0, self.payload_limit(topic))
            if png is None:
                self._fail("frame", "too_large", "clean frame of %s on line %s not published: no picture fits",
                           d.frame_id, d.line)
            else:
                self._publish(topic, png, kind="frame", properties=self._properties(d, scale=f"{scale:.4f}"))

    def publish_failure(self, f: FrameFailure) -> None:
        self._publish(self.topics.error(f.line), json.dumps(error_record(f, self.instance)).encode(), kind="error")

    def publish_status(self, model: str, weights: str, extra: dict[str, Any] | None = None) -> None:
        status = {"schema": SCHEMA_VERSION, "state": "online", "instance": self.instance,
                  "version": __version__, "model": model, "weights": weights, "since": time.time(),
                  **(extra or {})}
        self._publish(self.topics.status, json.dumps(status).encode(), retain=True, kind="status")
