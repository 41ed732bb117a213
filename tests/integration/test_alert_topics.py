"""Alert pictures on a real Mosquitto with its default limits: the binary heatmap topic and the clean
frame topic (mqtt.publish_clean_frame) carry frame_id and line as MQTT 5 user properties, read back
by a subscriber; on MQTT 3.1.1 the same pictures arrive without properties and nothing breaks.
Frames are real magnetic-tile photos (../shared/data/magnetic_tile); no model: the sink is under test."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from PIL import Image

from musc_stream.service.config import MqttSettings
from musc_stream.service.mqtt_client import Topics, connect_kwargs, create_client
from musc_stream.service.sinks.alert_picture import natural_scale
from musc_stream.service.sinks.mqtt_publish import MqttPublisher
from musc_stream.stream.records import Decision
from musc_stream.stream.regions import find_regions

pytestmark = pytest.mark.integration
EVENT_TIMEOUT_S = 30.0  # bounds a wait for something that must happen; never a speed claim


def _tile_alert(magnetic_tile, frame_id: str) -> tuple[Decision, np.ndarray]:
    path = sorted((magnetic_tile / "MT_Crack" / "Imgs").glob("*.jpg"))[0]
    image = np.asarray(Image.open(path).convert("RGB"))
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    heat = (0.2 + 0.6 * np.exp(-((xx - w / 2) ** 2 + (yy - h / 3) ** 2) / (2 * (w / 8) ** 2))).astype(np.float32)
    now = time.time()
    d = Decision(line="tile-b", frame_id=frame_id, ts=now, score=float(heat.max()), threshold=0.5, is_anomaly=True,
                 warmup=False, regions=find_regions(heat, 0.5), heatmap=heat, image=image, received_at=now,
                 decided_at=now)
    return d, image


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_binary_pictures_carry_frame_id_and_line(stock_broker, magnetic_tile, protocol):
    settings = MqttSettings(host="127.0.0.1", port=stock_broker.port, instance="pictures", protocol=protocol,
                            heatmap_mode="both", publish_clean_frame=True)
    client = create_client(settings)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect(**connect_kwargs(settings))
    client.loop_start()
    got: list[mqtt.MQTTMessage] = []
    subscribed = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pictures-sub", protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: got.append(m)
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", stock_broker.port)
    sub.subscribe("line/#", qos=1)
    sub.loop_start()
    try:
        assert connected.wait(EVENT_TIMEOUT_S) and subscribed.wait(EVENT_TIMEOUT_S)
        publisher = MqttPublisher(client, Topics(settings), "pictures", heatmap_mode="both", publish_clean_frame=True)
        d, image = _tile_alert(magnetic_tile, f"crack-{protocol}")
        publisher.publish_decision(d, image)
        topics = {"line/tile-b/result", "line/tile-b/anomaly", "line/tile-b/anomaly/heatmap", "line/tile-b/anomaly/frame"}
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        while {m.topic for m in got} < topics and time.monotonic() < deadline:
            time.sleep(0.05)
        by_topic = {m.topic: m for m in got}
        assert set(by_topic) == topics, sorted(by_topic)

        alert = json.loads(by_topic["line/tile-b/anomaly"].payload)
        inline = Image.open(io.BytesIO(base64.b64decode(alert["heatmap_png_b64"])))
        s = natural_scale(*image.shape[:2])
        assert alert["heatmap_scale"] == pytest.approx(s, rel=1e-3) and s > 1  # a small tile is upscaled
        assert inline.width > image.shape[1] * s and inline.height > image.shape[0] * s  # bar and caption
        assert alert["heatmap_colour_scale"] == {"low": 0.25, "high": 0.75}

        heatmap = by_topic["line/tile-b/anomaly/heatmap"]
        frame = by_topic["line/tile-b/anomaly/frame"]
        assert Image.open(io.BytesIO(heatmap.payload)).size == inline.size
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(frame.payload)).convert("RGB")), image)  # lossless
        for message in (heatmap, frame):
            props = dict(getattr(message.properties, "UserProperty", []) or [])
            if protocol == "5":
                assert props["frame_id"] == d.frame_id and props["line"] == "tile-b"
                assert float(props["scale"]) > 0 and message.properties.ContentType == "image/png"
            else:
                assert props == {}
        assert publisher.failed == 0 and client.is_connected()
    finally:
        sub.loop_stop()
        sub.disconnect()
        client.loop_stop()
        client.disconnect()
