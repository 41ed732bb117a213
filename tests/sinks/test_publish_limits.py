"""Alerts for big frames against a real Mosquitto whose packet limit is set small (a test about that
limit): every message fits, the heatmap is scaled down, and a publish that fails costs nothing else.

Frames are real magnetic-tile images (../shared/data/magnetic_tile) upscaled to camera size; the
heatmaps are smooth blobs like the engine's. No model is involved: the sink is under test.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from PIL import Image

from musc_stream.devtools.broker import free_port, wait_for_port
from musc_stream.service.config import MqttSettings
from musc_stream.service.mqtt_client import Topics, connect_kwargs, create_client
from musc_stream.service.sinks.mqtt_publish import MqttPublisher
from musc_stream.service.sinks.prometheus import Metrics
from musc_stream.stream.records import Decision

PACKET_LIMIT = 131_072  # the broker's max_packet_size in these tests
EVENT_TIMEOUT_S = 30.0  # bounds a wait for something that must happen; never a speed claim


@pytest.fixture
def small_broker(tmp_path):
    """Mosquitto with max_packet_size PACKET_LIMIT; yields (port, log path)."""
    assert shutil.which("mosquitto"), "mosquitto missing: scripts/setup.sh installs it"
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_packet_size {PACKET_LIMIT}\n"
                    "log_type all\n" + ("user root\n" if __import__("os").geteuid() == 0 else ""))
    log = tmp_path / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        yield port, log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Subscriber:
    """Collects everything under line/# with its payload size."""

    def __init__(self, port: int) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="limits-sub", protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self._keep(m)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("line/#", qos=1)
        self.client.loop_start()
        assert ready.wait(EVENT_TIMEOUT_S)

    def _keep(self, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(message)

    def on(self, topic: str) -> list[mqtt.MQTTMessage]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def wait(self, predicate) -> bool:
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _service(port: int, **mqtt_settings) -> tuple[mqtt.Client, MqttPublisher, Metrics, list]:
    settings = MqttSettings(host="127.0.0.1", port=port, instance="limits", heatmap_mode="both", **mqtt_settings)
    client = create_client(settings)
    connected, disconnects = threading.Event(), []
    client.on_connect = lambda c, u, flags, rc, props: connected.set()
    client.on_disconnect = lambda c, u, flags, rc, props: disconnects.append(str(rc))
    client.connect(**connect_kwargs(settings))
    client.loop_start()
    assert connected.wait(EVENT_TIMEOUT_S)
    metrics = Metrics()
    return client, MqttPublisher(client, Topics(settings), "limits", heatmap_mode="both", metrics=metrics,
                                 publish_clean_frame=True), \
        metrics, disconnects


def _big_frame(magnetic_tile: Path, size=(2400, 1800)) -> tuple[np.ndarray, np.ndarray]:
    """A real tile photo at camera size and a smooth heatmap with one hot spot."""
    path = sorted((magnetic_tile / "MT_Blowhole" / "Imgs").glob("*.jpg"))[0]
    image = np.asarray(Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC))
    yy, xx = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
    heatmap = 0.2 + 0.6 * np.exp(-((xx - size[0] * 0.6) ** 2 + (yy - size[1] * 0.4) ** 2) / (2 * 150.0 ** 2))
    return image, heatmap.astype(np.float32)


def _decision(line: str, frame_id: str, anomaly: bool, image=None, heatmap=None) -> Decision:
    now = time.time()
    return Decision(line=line, frame_id=frame_id, ts=now, score=0.8 if anomaly else 0.2, threshold=0.5,
                    is_anomaly=anomaly, warmup=False, heatmap=heatmap, image=image, received_at=now,
                    decided_at=now)


def _png_size(b64_or_bytes) -> tuple[int, int]:
    data = base64.b64decode(b64_or_bytes) if isinstance(b64_or_bytes, str) else b64_or_bytes
    return Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize("protocol, max_publish_bytes", [("5", None), ("3.1.1", 100_000)])
def test_alert_of_a_big_frame_fits_the_broker_and_costs_no_connection(small_broker, magnetic_tile,
                                                                      protocol, max_publish_bytes):
    """MQTT 5: the broker's CONNACK Maximum Packet Size bounds the alert. MQTT 3.1.1 has no such
    property, so mqtt.max_publish_bytes (set under the broker's limit) does."""
    port, log = small_broker
    extra = {"protocol": protocol}
    if max_publish_bytes:
        extra["max_publish_bytes"] = max_publish_bytes
    client, publisher, metrics, disconnects = _service(port, **extra)
    sub = Subscriber(port)
    try:
        if protocol == "5":
            assert client.broker_max_packet_size == PACKET_LIMIT
        limit = max_publish_bytes or PACKET_LIMIT
        image, heatmap = _big_frame(magnetic_tile)
        publisher.publish_decision(_decision("big", "alert-1", True, image, heatmap), image)
        for i in range(5):  # another line's results, right behind the big alert
            publisher.publish_decision(_decision("other", f"o-{i}", False))
        assert sub.wait(lambda s: len(s.on("line/other/result")) == 5 and s.on("line/big/anomaly")
                        and s.on("line/big/anomaly/heatmap") and s.on("line/big/anomaly/frame")), \
            [m.topic for m in sub.messages]
        alert_message = sub.on("line/big/anomaly")[0]
        alert = json.loads(alert_message.payload)
        assert len(alert_message.payload) <= limit
        width, height = _png_size(alert["heatmap_png_b64"])
        # the frame sits at the top left at heatmap_scale; colour bar to its right, caption below
        assert width > 2400 * alert["heatmap_scale"] and height > 1800 * alert["heatmap_scale"]
        assert 0 < alert["heatmap_scale"] < 1 and alert["frame_id"] == "alert-1"
        heatmap_message = sub.on("line/big/anomaly/heatmap")[0]
        assert len(heatmap_message.payload) <= limit and _png_size(heatmap_message.payload)[0] < 2400
        frame_message = sub.on("line/big/anomaly/frame")[0]  # the clean frame obeys the same limit
        assert len(frame_message.payload) <= limit
        frame_w, frame_h = _png_size(frame_message.payload)
        assert frame_w < 2400 and frame_w / frame_h == pytest.approx(4 / 3, rel=0.02)
        assert disconnects == [] and client.is_connected()
        assert "exceeded" not in log.read_text().lower()  # the broker never saw an oversize packet
        assert publisher.failed == 0
    finally:
        sub.close()
        client.loop_stop()
        client.disconnect()


def test_a_failing_publish_is_counted_and_the_next_ones_go_out(small_broker, magnetic_tile):
    port, _ = small_broker
    client, publisher, metrics, disconnects = _service(port)
    sub = Subscriber(port)
    try:
        # paho raises ValueError for a topic with a wildcard; a line id never has one, but a bug must
        # cost that one message only.
        publisher.publish_decision(_decision("bad+line", "x-1", False))
        # A message that no scaling can bring under the limit is refused here, not sent.
        publisher.max_publish_bytes = 64
        publisher.publish_decision(_decision("big", "x-2", False))
        publisher.max_publish_bytes = None
        for i in range(3):
            publisher.publish_decision(_decision("other", f"after-{i}", False))
        assert sub.wait(lambda s: len(s.on("line/other/result")) == 3)
        assert not sub.on("line/big/result")
        assert publisher.failed == 2
        samples = {(s.labels["kind"], s.labels["reason"]): s.value
                   for family in metrics.registry.collect() if family.name == "musc_publish_failures"
                   for s in family.samples if s.name.endswith("_total")}
        assert samples[("result", "client_error")] == 1 and samples[("result", "too_large")] == 1
        assert disconnects == [] and client.is_connected()
    finally:
        sub.close()
        client.loop_stop()
        client.disconnect()
