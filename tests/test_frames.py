"""Tests of musc_stream.service.frames: real JPEG/PNG payloads in, Frames or FrameErrors with the right reason out."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from musc_stream.service.config import FrameLimits
from musc_stream.service.frames import (
    REASONS,
    FrameError,
    decode_frame,
    encode_envelope,
    frame_user_properties,
    parse_line_id,
)

LIMITS = FrameLimits()
TOPIC = "line/press-1/frames"
NOW = 1_700_000_000.0


def _rgb(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)  # uint16 (H, W) becomes a 16-bit grey PNG
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and a valid IHDR claiming width x height, then IEND: no pixel data at all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _reason(payload: bytes, topic: str = TOPIC, props=None, limits: FrameLimits = LIMITS) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode_frame(topic, payload, props, limits, "line", NOW)
    assert info.value.reason in REASONS
    return info.value


# ------------------------------------------------------------------------------- good frames


def test_png_decodes_exactly():
    image = _rgb()
    frame = decode_frame(TOPIC, _encode(image, "PNG"), None, LIMITS, "line", NOW)
    assert frame.image.shape == (48, 64, 3) and frame.image.dtype == np.uint8
    np.testing.assert_array_equal(frame.image, image)
    assert frame.image.flags.writeable and frame.image.flags.c_contiguous
    assert frame.line == "press-1"


def test_jpeg_decodes_to_its_own_size():
    image = np.full((40, 72, 3), (200, 30, 90), dtype=np.uint8)  # flat colour: JPEG keeps it within a few levels
    frame = decode_frame(TOPIC, _encode(image, "JPEG"), None, LIMITS, "line", NOW)
    assert frame.image.shape == (40, 72, 3)
    assert np.abs(frame.image.astype(int) - image).max() <= 4


def test_grey_and_rgba_become_rgb():
    grey = _rgb()[:, :, 0]
    frame = decode_frame(TOPIC, _encode(grey, "PNG"), None, LIMITS, "line", NOW)
    assert frame.image.shape == (48, 64, 3)
    for c in range(3):
        np.testing.assert_array_equal(frame.image[:, :, c], grey)
    rgba = np.concatenate([_rgb(), np.zeros((48, 64, 1), np.uint8)], axis=2)
    frame = decode_frame(TOPIC, _encode(rgba, "PNG"), None, LIMITS, "line", NOW)
    np.testing.assert_array_equal(frame.image, rgba[:, :, :3])


def test_sixteen_bit_grey_keeps_its_top_byte():
    grey16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)
    frame = decode_frame(TOPIC, _encode(grey16, "PNG"), None, LIMITS, "line", NOW)
    np.testing.assert_array_equal(frame.image[:, :, 1], (grey16 >> 8).astype(np.uint8))


def test_metadata_from_user_properties():
    payload = _encode(_rgb(), "PNG")
    for props in ({"frame_id": "f-17", "ts": "1699999999.25", "camera": "cam-a"},
                  [("frame_id", "f-17"), ("ts", "1699999999.25"), ("camera", "cam-a")]):  # paho's shape
        frame = decode_frame(TOPIC, payload, props, LIMITS, "line", NOW)
        assert (frame.frame_id, frame.ts, frame.camera) == ("f-17", 1699999999.25, "cam-a")
        assert frame.received_at == NOW
        assert frame.payload_bytes == len(payload)
        assert frame.decode_s > 0


def test_missing_ts_is_receive_time_and_missing_id_is_stable_hash():
    payload = _encode(_rgb(), "PNG")
    first = decode_frame(TOPIC, payload, None, LIMITS, "line", NOW)
    again = decode_frame(TOPIC, payload, {}, LIMITS, "line", NOW + 5)
    other = decode_frame(TOPIC, _encode(_rgb(seed=1), "PNG"), None, LIMITS, "line", NOW)
    assert first.ts == NOW and first.camera is None
    assert first.frame_id == again.frame_id == hashlib.sha256(payload).hexdigest()[:16]
    assert other.frame_id != first.frame_id


def test_json_envelope():
    image = _rgb()
    png = _encode(image, "PNG")
    frame = decode_frame(TOPIC, encode_envelope(png, "env-1", 1699999000.5, "cam-b"), None, LIMITS, "line", NOW)
    np.testing.assert_array_equal(frame.image, image)
    assert (frame.frame_id, frame.ts, frame.camera) == ("env-1", 1699999000.5, "cam-b")


def test_envelope_fields_win_over_properties_and_integer_ids_and_wrapped_base64_work():
    png = _encode(_rgb(), "PNG")
    wrapped = "\n".join(base64.b64encode(png).decode()[i:i + 76] for i in range(0, 4 * len(png) // 3 + 4, 76))
    payload = json.dumps({"frame_id": 42, "image_b64": wrapped, "exposure_us": 900}).encode()
    frame = decode_frame(TOPIC, payload, {"frame_id": "prop-id", "ts": "12.5"}, LIMITS, "line", NOW)
    assert frame.frame_id == "42"
    assert frame.ts == 12.5  # the envelope had none, the property is kept


def test_envelope_without_id_derives_it_from_the_whole_payload():
    payload = encode_envelope(_encode(_rgb(), "PNG"), None, None)
    assert b"frame_id" not in payload and b'"ts"' not in payload
    frame = decode_frame(TOPIC, payload, None, LIMITS, "line", NOW)
    assert frame.frame_id == hashlib.sha256(payload).hexdigest()[:16]
    assert frame.ts == NOW


def test_user_properties_helper_round_trips():
    props = frame_user_properties("f-9", 1699999999.125, None)
    assert props == [("frame_id", "f-9"), ("ts", "1699999999.125")]
    frame = decode_frame(TOPIC, _encode(_rgb(), "PNG"), props, LIMITS, "line", NOW)
    assert (frame.frame_id, frame.ts) == ("f-9", 1699999999.125)


def test_payload_at_exactly_the_limit_is_accepted():
    payload = _encode(_rgb(), "PNG")
    frame = decode_frame(TOPIC, payload, None, FrameLimits(max_payload_bytes=len(payload)), "line", NOW)
    assert frame.payload_bytes == len(payload)


def test_pil_guard_below_our_limit_is_raised(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL would call a 48x64 frame a bomb
    frame = decode_frame(TOPIC, _encode(_rgb(), "PNG"), None, LIMITS, "line", NOW)
    assert frame.image.shape == (48, 64, 3)
    assert Image.MAX_IMAGE_PIXELS == LIMITS.max_pixels


# -------------------------------------------------------------------------------- line ids


@pytest.mark.parametrize("topic", [
    "line/../frames", "line/a b/frames", "line/a/b/frames", "line//frames", "other/l1/frames",
    "line/l1/frames/x", "line/l1/result", "line/l1\n/frames", "line/" + "x" * 65 + "/frames", "line/frames",
])
def test_bad_line_ids(topic):
    err = _reason(_encode(_rgb(), "PNG"), topic=topic)
    assert err.reason == "bad_line_id" and err.line is None


def test_parse_line_id_with_multi_level_prefix():
    assert parse_line_id("plant1/line/l-7/frames", "plant1/line", LIMITS.line_id_pattern) == "l-7"


# ------------------------------------------------------------------------------ bad payloads


def test_oversize_payload_rejected_before_anything_else():
    limits = FrameLimits(max_payload_bytes=1000)
    err = _reason(b"\x00" * 1001, props={"frame_id": "big-1"}, limits=limits)  # garbage: size is checked first
    assert err.reason == "payload_too_large"
    assert (err.line, err.frame_id) == ("press-1", "big-1")


def test_empty_payloads():
    assert _reason(b"").reason == "empty_payload"
    assert _reason(json.dumps({"frame_id": "e", "image_b64": ""}).encode()).reason == "empty_payload"


@pytest.mark.parametrize("payload", [b'{"frame_id": "x", "image_b64": ', b"{\xff\xfe}", b"  {not json}"])
def test_bad_json(payload):
    err = _reason(payload)
    assert err.reason == "bad_json"
    assert err.frame_id == hashlib.sha256(payload).hexdigest()[:16]  # errors still carry the frame's id


@pytest.mark.parametrize("envelope", [
    {"frame_id": "x"},                                            # no image
    {"frame_id": "x", "image_b64": 17},
    {"frame_id": "x", "image_b64": "@@not base64@@"},
    {"frame_id": "x", "image_b64": "QUJD", "ts": "yesterday"},
    {"frame_id": "x", "image_b64": "QUJD", "ts": True},
    {"frame_id": "x", "image_b64": "QUJD", "ts": 1.7e12},          # milliseconds
    {"frame_id": "x", "image_b64": "QUJD", "ts": -1},
    {"frame_id": "x" * 200, "image_b64": "QUJD"},
    {"frame_id": "a\nb", "image_b64": "QUJD"},
    {"frame_id": ["x"], "image_b64": "QUJD"},
    {"frame_id": "x", "image_b64": "QUJD", "camera": 5},
])
def test_bad_envelopes(envelope):
    assert _reason(json.dumps(envelope).encode()).reason == "bad_envelope"


def test_nan_ts_in_envelope_and_bad_ts_property():
    png = _encode(_rgb(), "PNG")
    nan_payload = b'{"image_b64": "' + base64.b64encode(png) + b'", "ts": NaN}'  # Python's json reads NaN
    assert _reason(nan_payload).reason == "bad_envelope"
    for ts in ("inf", "nan", "", "12:30"):
        assert _reason(png, props={"ts": ts}).reason == "bad_envelope"


def test_unsupported_formats():
    random_bytes = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert random_bytes[:3] != b"\xff\xd8\xff"
    assert _reason(random_bytes).reason == "unsupported_format"
    assert _reason(_encode(_rgb(), "GIF")).reason == "unsupported_format"
    jpeg_only = FrameLimits(formats=("JPEG",))
    err = _reason(_encode(_rgb(), "PNG"), limits=jpeg_only)
    assert err.reason == "unsupported_format" and "frames.formats" in err.detail


def test_truncated_images_are_corrupt():
    jpeg = _encode(_rgb(), "JPEG")
    err = _reason(jpeg[: len(jpeg) // 2], props={"frame_id": "t-1"})
    assert err.reason == "corrupt_image" and (err.line, err.frame_id) == ("press-1", "t-1")
    png = _encode(_rgb(), "PNG")
    assert _reason(png[: len(png) // 2]).reason == "corrupt_image"
    assert _reason(png[:20]).reason == "corrupt_image"  # cut inside the IHDR chunk


def test_corrupt_image_inside_envelope():
    jpeg = _encode(_rgb(), "JPEG")
    assert _reason(encode_envelope(jpeg[:300], "c", None)).reason == "corrupt_image"


def test_decompression_bomb_header_is_refused_without_decoding():
    # 100000 x 100000 x 3 bytes would be 30 GB: refused from the header alone (PIL's guard or ours).
    err = _reason(_png_header_only(100_000, 100_000))
    assert err.reason == "too_many_pixels"


def test_header_over_our_limit_but_under_pils_is_refused_by_our_check():
    # 6000 x 5000 = 30 M pixels: above frames.max_pixels (25 M), below PIL's own warning limit. The file
    # has no pixel data, so decoding it would give corrupt_image: too_many_pixels shows the check came first.
    err = _reason(_png_header_only(6000, 5000))
    assert err.reason == "too_many_pixels" and "30000000" in err.detail


def test_real_image_over_a_lowered_pixel_limit():
    assert _reason(_encode(_rgb(), "PNG"), limits=FrameLimits(max_pixels=48 * 64 - 1)).reason == "too_many_pixels"
    frame = decode_frame(TOPIC, _encode(_rgb(), "PNG"), None, FrameLimits(max_pixels=48 * 64), "line", NOW)
    assert frame.image.shape == (48, 64, 3)


def test_image_too_small():
    err = _reason(_encode(_rgb(8, 200), "PNG"))
    assert err.reason == "image_too_small" and "8" in err.detail


# -------------------------------------------------------------------------------- FrameError


def test_frame_error_rejects_unknown_reason_and_converts_to_failure():
    with pytest.raises(ValueError, match="unknown frame error reason"):
        FrameError("bad_vibes", "x")
    failure = FrameError("corrupt_image", "cut short", line="l1", frame_id="f1").to_failure(NOW, ack="token")
    assert (failure.reason, failure.detail, failure.line, failure.frame_id, failure.received_at, failure.ack) == (
        "corrupt_image", "cut short", "l1", "f1", NOW, "token")


def test_bomb_header_refused_by_our_check_when_pils_guard_is_off(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    err = _reason(_png_header_only(100_000, 100_000))
    assert err.reason == "too_many_pixels" and "frames.max_pixels" in err.detail
