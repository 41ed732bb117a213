"""Hostile payloads: whatever a frame holds, the worst it gets is an error record.

Each case was found by trying it on main (issue 10, item 6): a 400-digit ts killed paho's network
thread, a lone surrogate frame_id killed the audit writer, ids with control characters and of 100+ KB
reached the log unescaped. Real JPEG/PNG bytes, a real Parquet audit read back, a real Mosquitto.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time

import paho.mqtt.client as mqtt
import pyarrow.dataset as ds
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

from musc_stream.cli import _JsonFormatter, _TextFormatter
from musc_stream.devtools.broker import LocalBroker
from musc_stream.service.config import FrameLimits, MqttSettings
from musc_stream.service.frames import MAX_ID_CHARS, FrameError, decode_frame, escape_text, is_valid_id
from musc_stream.service.mqtt_client import connect_kwargs, create_client
from musc_stream.service.sinks.audit import AuditLog
from musc_stream.stream.records import FrameFailure

LIMITS = FrameLimits()
TOPIC = "line/press-1/frames"
NOW = 1_700_000_000.0
EVENT_TIMEOUT_S = 30.0  # bounds a wait for something that must happen; never a speed claim


def _png(magnetic_tile) -> bytes:
    path = sorted((magnetic_tile / "MT_Free" / "Imgs").glob("*.jpg"))[0]
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").resize((64, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


def _envelope(image: bytes, **fields) -> bytes:
    return json.dumps({"image_b64": base64.b64encode(image).decode(), **fields}).encode()


def _error(payload: bytes, props=None) -> FrameError:
    with pytest.raises(FrameError) as caught:
        decode_frame(TOPIC, payload, props, LIMITS, "line", NOW)
    return caught.value


def _assert_safe(err: FrameError) -> None:
    """An error's text is short, printable, valid UTF-8; its id is valid or absent."""
    assert err.reason == "bad_envelope", err
    assert len(err.detail) < 400 and err.detail.isprintable(), err.detail
    err.detail.encode("utf-8")
    assert err.frame_id is None or is_valid_id(err.frame_id)


# -------------------------------------------------------------------------------- timestamps


ABSURD_TS_JSON = [
    b"1" + b"0" * 399,  # a 400-digit integer: float() raises OverflowError
    b"-" + b"9" * 400,
    b"NaN", b"Infinity", b"-Infinity",  # Python's json reads these
    b"-1", b"1e308", b"1e400",  # negative, huge float, a float literal that overflows to inf
    b'"yesterday"', b'"' + b"9" * 5000 + b'"', b"[1]", b"{}", b"true",
]


@pytest.mark.parametrize("ts", ABSURD_TS_JSON, ids=lambda t: t[:12].decode())
def test_absurd_ts_in_an_envelope_is_an_error_record(magnetic_tile, ts):
    payload = _envelope(_png(magnetic_tile), frame_id="f-1")[:-1] + b', "ts": ' + ts + b"}"
    err = _error(payload)
    _assert_safe(err)
    assert err.frame_id == "f-1" and "ts" in err.detail


@pytest.mark.parametrize("ts", ["1" + "0" * 399, "nan", "inf", "-5", "1e400", "0x10", "9" * 100_000, ""])
def test_absurd_ts_in_a_user_property_is_an_error_record(magnetic_tile, ts):
    _assert_safe(_error(_png(magnetic_tile), props=[("frame_id", "f-2"), ("ts", ts)]))


def test_a_json_number_too_long_for_python_is_bad_json(magnetic_tile):
    payload = _envelope(_png(magnetic_tile))[:-1] + b', "ts": ' + b"7" * 5000 + b"}"
    assert _error(payload).reason == "bad_json"  # Python refuses ints over 4300 digits: still a record


# ----------------------------------------------------------------------------------- frame ids


HOSTILE_IDS = {
    "lone surrogate": "\ud800",
    "surrogate inside": "frame-\udfff-1",
    "line separator": "f-1\u2028INFO fake log line",
    "paragraph separator": "f\u2029",
    "ANSI escape": "\x1b[31mred\x1b[0m",
    "NUL": "f\x00",
    "newline": "f-1\nERROR forged",
    "bidi override": "f-\u202eevil",
    "zero width": "f\u200b1",
    "129 characters": "x" * (MAX_ID_CHARS + 1),
    "100 KB": "y" * 100_000,
}


@pytest.mark.parametrize("name", HOSTILE_IDS)
def test_hostile_frame_ids_are_refused_escaped_and_truncated(magnetic_tile, name):
    hostile = HOSTILE_IDS[name]
    for err in (_error(_envelope(_png(magnetic_tile), frame_id=hostile)),
                _error(_png(magnetic_tile), props={"frame_id": hostile}),
                _error(_envelope(_png(magnetic_tile), frame_id="ok-1", camera=hostile))):
        _assert_safe(err)
        assert hostile not in err.detail or len(hostile) < 10 and hostile.isprintable()


def test_ids_at_the_limit_and_in_any_script_are_accepted(magnetic_tile):
    for frame_id in ("x" * MAX_ID_CHARS, "Prüfteil 7 – Charge ä", "部品-0001", "id with spaces"):
        frame = decode_frame(TOPIC, _envelope(_png(magnetic_tile), frame_id=frame_id), None, LIMITS, "line", NOW)
        assert frame.frame_id == frame_id


def test_escape_text_never_raises_and_bounds_its_output():
    class Broken:
        def __repr__(self):
            raise RuntimeError("no")

    for value in ("\ud800" * 100, "a" * 10**6, 7**9000, b"\xff" * 10**5, Broken(), None, float("nan")):
        text = escape_text(value)  # at most 40 characters shown, in at most 160 once escaped
        assert len(text) < 4 * 40 + 40 and text.isprintable()


# ------------------------------------------------------------------------------------- audit


def test_audit_writer_survives_any_string(tmp_path):
    """A failure row with lone surrogates, NUL, a 100 KB detail and absurd times is stored, readable."""
    with AuditLog(tmp_path / "audit") as audit:
        audit.write_failure(FrameFailure("bad_envelope", "detail \ud800 \x00 " + "z" * 100_000,
                                         line="press-1", frame_id="\ud800", received_at=float("nan")))
        audit.write_failure(FrameFailure("bad_envelope", "ok", line="\udcff/../x", frame_id="id",
                                         received_at=1e300))
        audit.flush()
    rows = ds.dataset(tmp_path / "audit", format="parquet", partitioning="hive").to_table().to_pylist()
    assert len(rows) == 2
    first = next(r for r in rows if r["line"] == "press-1")
    assert first["frame_id"] == "\\ud800" and first["received_at"] is None
    assert len(first["error_detail"]) < 5000
    second = next(r for r in rows if r["frame_id"] == "id")
    assert second["line"] == "\\udcff/../x" and second["received_at"] is None  # 1e300 s: no time a reader holds
    files = sorted((tmp_path / "audit").rglob("*.parquet"))
    assert len(files) == 2 and all(f.parent.parent.parent == tmp_path / "audit" for f in files)
    assert any(f.parent.name == "line_id=%5Cudcff%2F..%2Fx" for f in files)  # percent-encoded: no escape


# --------------------------------------------------------------------------------------- logs


@pytest.mark.parametrize("formatter", [_TextFormatter(), _JsonFormatter()], ids=["text", "json"])
def test_logged_ids_cannot_forge_lines_or_colour_the_terminal(formatter):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    log = logging.getLogger("musc_stream.test_hostile")
    log.addHandler(handler)
    log.propagate = False
    try:
        for hostile in HOSTILE_IDS.values():
            log.warning("frame refused (id %s)", hostile)
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(HOSTILE_IDS)  # one record, one line: no forged log line
    for line in lines:
        assert "\x1b" not in line and "\x00" not in line and "\u2028" not in line and "\u202e" not in line
        assert len(line) < 5000  # the 100 KB id is cut
        line.encode("utf-8")
    if isinstance(formatter, _JsonFormatter):
        assert all(json.loads(line)["level"] == "WARNING" for line in lines)


# ------------------------------------------------------------------ paho's network thread


def test_poison_frames_never_stop_the_network_thread(magnetic_tile, tmp_path):
    """Poison frames through a real Mosquitto to the service's client: each is an error record, a
    callback that raises is logged, and the next good frame still arrives on the same connection."""
    png = _png(magnetic_tile)
    poison = [
        (_envelope(png, frame_id="p-1")[:-1] + b', "ts": 1' + b"0" * 399 + b"}", None),
        (_envelope(png)[:-1] + b', "frame_id": "\\ud800"}', None),  # the JSON text of a lone surrogate
        (_envelope(png, frame_id="f\u2028x"), None),
        (png, [("frame_id", "f\u2029\u202e"), ("ts", "1e400")]),  # C0 controls: mosquitto disconnects the sender
        (b"raise", None),  # the callback below raises on this one
    ]
    outcomes: list[tuple[str, str | None]] = []
    done = threading.Event()
    with LocalBroker(persistence_dir=tmp_path / "broker") as broker:
        settings = MqttSettings(host=broker.host, port=broker.port, instance="hostile")
        client = create_client(settings)
        subscribed = threading.Event()

        def on_message(c, userdata, message):
            if message.payload == b"raise":
                raise RuntimeError("a bug in a handler")
            props = getattr(message.properties, "UserProperty", None)
            try:
                frame = decode_frame(message.topic, message.payload, props, LIMITS, "line")
                outcomes.append(("frame", frame.frame_id))
                done.set()
            except FrameError as err:
                outcomes.append((err.reason, err.frame_id))
            c.ack(message.mid, message.qos)

        client.on_message = on_message
        client.on_connect = lambda c, *a: c.subscribe("line/+/frames", qos=1)
        client.on_subscribe = lambda *a: subscribed.set()
        client.connect(**connect_kwargs(settings))
        client.loop_start()
        camera = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="hostile-cam", protocol=mqtt.MQTTv5)
        camera_up = threading.Event()
        camera.on_connect = lambda *a: camera_up.set()
        camera.connect(broker.host, broker.port)
        camera.loop_start()
        try:
            assert subscribed.wait(EVENT_TIMEOUT_S) and camera_up.wait(EVENT_TIMEOUT_S)
            for payload, user_properties in poison + [(png, [("frame_id", "good-1")])]:
                props = None
                if user_properties:
                    props = Properties(PacketTypes.PUBLISH)
                    props.UserProperty = user_properties
                camera.publish(TOPIC, payload, qos=1, properties=props).wait_for_publish(EVENT_TIMEOUT_S)
            assert done.wait(EVENT_TIMEOUT_S), outcomes
            assert client._thread is not None and client._thread.is_alive() and client.is_connected()
        finally:
            camera.loop_stop()
            camera.disconnect()
            client.loop_stop()
            client.disconnect()
    assert outcomes[-1] == ("frame", "good-1")
    errors = outcomes[:-1]
    assert [reason for reason, _ in errors] == ["bad_envelope"] * 4
    assert all(frame_id is None or is_valid_id(frame_id) for _, frame_id in errors)


def test_an_unexpected_error_inside_decoding_is_still_an_error_record(magnetic_tile, caplog):
    """A shape of input nobody planned for (here user properties that are not pairs) must cost one
    frame: FrameError decode_failed, logged with its traceback, never an exception of another type."""
    with caplog.at_level(logging.ERROR, logger="musc_stream.service.frames"):
        err = _error(_png(magnetic_tile), props=[("frame_id", "a", "surplus")])
    assert err.reason == "decode_failed" and "ValueError" in err.detail
    assert any(r.exc_info for r in caplog.records if r.name == "musc_stream.service.frames")
