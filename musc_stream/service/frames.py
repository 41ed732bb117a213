"""The inbound frame contract: validate a camera payload, cheap checks first, then decode it to a Frame."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from musc_stream.service.config import FrameLimits
from musc_stream.stream.records import Frame, FrameFailure

logger = logging.getLogger(__name__)

REASONS = frozenset({
    "bad_line_id",         # topic is not <prefix>/<id>/frames with an id matching frames.line_id_pattern
    "payload_too_large",   # payload over frames.max_payload_bytes
    "empty_payload",       # no bytes (or an envelope with an empty image)
    "bad_json",            # starts with "{" but is not JSON
    "bad_envelope",        # JSON or user properties with a missing or wrong field
    "unsupported_format",  # neither JPEG nor PNG, or a format not in frames.formats
    "corrupt_image",       # a JPEG/PNG header or body that does not decode
    "too_many_pixels",     # width * height over frames.max_pixels (decompression-bomb guard)
    "image_too_small",     # a side under frames.min_side
    "decode_failed",       # an unexpected error while reading the payload (a bug: logged with its traceback)
})

MAX_ID_CHARS = 128  # frame_id and camera travel into topics' JSON, logs and Parquet; keep them short
MAX_TS = 1e11  # epoch seconds in year 5138: a larger ts is almost surely milliseconds
MAX_TS_TEXT = 64  # characters of a ts given as text; longer is not a timestamp
SHOWN_CHARS = 40  # characters of a refused value quoted (escaped) in an error's detail

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JSON_START = re.compile(rb"\s*\{")
_WHITESPACE = re.compile(r"\s+")


class FrameError(Exception):
    """A payload that cannot become a Frame; `reason` is a code from REASONS, `detail` says what was wrong.

    `line` and `frame_id` are filled when they were known before the check failed, so the error can
    go to `<prefix>/<line>/error` with the frame's id.
    """

    def __init__(self, reason: str, detail: str, line: str | None = None, frame_id: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown frame error reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.line = line
        self.frame_id = frame_id

    def to_failure(self, received_at: float, ack: Any = None) -> FrameFailure:
        """The record the error sinks and the audit take."""
        return FrameFailure(reason=self.reason, detail=self.detail, line=self.line, frame_id=self.frame_id,
                            received_at=received_at, ack=ack)


class Refused(Exception):
    """The ``admit`` hook of decode_frame declined to decode this frame (the service is busy);
    ``detail`` says why. Not a fault of the payload, so not a FrameError."""

    def __init__(self, detail: str, line: str, frame_id: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.line = line
        self.frame_id = frame_id


def decoded_bytes(width: int, height: int) -> int:
    """Bytes of the (H, W, 3) uint8 array a frame decodes to, known from its header alone."""
    return width * height * 3


def escape_text(value: Any, limit: int = SHOWN_CHARS) -> str:
    """A short, printable, valid-UTF-8 rendering of any value for logs and error details.

    repr() escapes control characters, U+2028/U+2029, ANSI escapes, NUL and lone surrogates; at most
    `limit` characters of the value are shown, with how many were left out. Never raises.
    """
    try:
        if isinstance(value, str):
            shown = _cut(repr(value[:limit]), limit)
            if len(value) > limit:
                shown += f"...(+{len(value) - limit} chars)"
            return shown
        if isinstance(value, (bytes, bytearray)):
            shown = _cut(repr(bytes(value[:limit])), limit)
            return shown + (f"...(+{len(value) - limit} bytes)" if len(value) > limit else "")
        if isinstance(value, (bool, float)) or value is None:
            return repr(value)
        if isinstance(value, int):
            digits = value.bit_length() * 0.30103
            return repr(value) if digits < limit else f"<int of about {int(digits) + 1} digits>"
        return f"<{type(value).__name__}>"
    except Exception:  # noqa: BLE001 - a repr that fails must not turn an error into a crash
        return f"<unprintable {type(value).__name__}>"


def _cut(escaped: str, limit: int) -> str:
    """Escapes make a character up to 10 long; keep the rendering itself within 4 * limit."""
    return escaped if len(escaped) <= 4 * limit else escaped[:4 * limit] + "..."


def is_valid_id(value: Any) -> bool:
    """The contract for frame_id and camera: a str of 1-MAX_ID_CHARS printable characters.

    Printable is str.isprintable(): no control characters (NUL, ESC, DEL), no line or paragraph
    separators (U+2028/2029), no format characters (bidi overrides, zero-width), no lone surrogates,
    no whitespace other than the ASCII space. Such a string is valid UTF-8 by construction.
    """
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and value.isprintable()


def parse_line_id(topic: str, prefix: str, pattern: str | re.Pattern[str]) -> str:
    """The line id of a frames topic `<prefix>/<id>/frames`; the id must match `pattern` in full."""
    head, tail = f"{prefix}/", "/frames"
    if not (topic.startswith(head) and topic.endswith(tail)) or len(topic) <= len(head) + len(tail):
        raise FrameError("bad_line_id", f"topic {escape_text(topic, 80)} is not {prefix}/<line>/frames")
    line = topic[len(head):-len(tail)]
    # fullmatch, not match: "$" also matches before a trailing newline.
    if not re.fullmatch(pattern, line):
        raise FrameError("bad_line_id", f"line id {escape_text(line)} does not match "
                         f"{getattr(pattern, 'pattern', pattern)!r}")
    return line


def derive_frame_id(payload: bytes) -> str:
    """Stable id of a frame sent without one: redelivery of the same payload gets the same id."""
    return hashlib.sha256(payload).hexdigest()[:16]


def sniff_format(data: bytes) -> str | None:
    """'JPEG' or 'PNG' from the magic bytes, else None."""
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    return None


def decode_frame(topic: str, payload: bytes,
                 user_properties: Mapping[str, str] | Iterable[tuple[str, str]] | None,
                 limits: FrameLimits, prefix: str, now: float | None = None,
                 admit: Callable[[str, str, int], None] | None = None) -> Frame:
    """Validate and decode one frame payload into a Frame with an (H, W, 3) uint8 RGB image.

    The payload is raw JPEG/PNG bytes with metadata in MQTT 5 user properties (frame_id, ts in epoch
    seconds, camera), or a JSON envelope {"frame_id", "ts", "image_b64", "camera"} for MQTT 3.1.1
    clients (its fields win over user properties; unknown keys are ignored). Without a frame_id the
    id is derive_frame_id(payload); without ts, the receive time. Everything that can be checked
    before pixels are allocated is, in this order: line id, payload size (as received, envelope
    included), empty payload, metadata, magic bytes, width x height from the image header (a bad
    frame_id property is reported before the size, so errors carry a valid id or none). No MQTT
    import here: the ingest passes the topic, the bytes and the user properties.

    user_properties: MQTT 5 user properties as a mapping or as paho's list of (key, value) pairs
    (a repeated key: the last wins). now: receive time, epoch seconds (time.time() when None).
    admit(line, frame_id, decoded_bytes): called once the header passed its checks and before any
    pixel is decoded; it raises Refused to keep the frame out (the service's byte budget).
    Raises FrameError and nothing else (MemoryError and Refused aside): whatever a payload holds, the worst it
    gets is an error record. frame_id and camera follow is_valid_id; a refused value is quoted
    escaped and truncated (escape_text), and an error never carries an invalid id.
    """
    received_at = time.time() if now is None else now
    try:
        return _decode_frame(topic, payload, user_properties, limits, prefix, received_at, admit)
    except (FrameError, MemoryError, Refused):
        raise
    except Exception as exc:  # noqa: BLE001 - a bug here must cost one frame, never the network thread
        logger.error("unexpected error reading a frame on %s: %s", escape_text(topic, 80),
                     escape_text(f"{type(exc).__name__}: {exc}", 200), exc_info=True)
        raise FrameError("decode_failed", f"unexpected {type(exc).__name__} while reading the payload; "
                         "see the service log") from None


def _decode_frame(topic: str, payload: bytes,
                  user_properties: Mapping[str, str] | Iterable[tuple[str, str]] | None,
                  limits: FrameLimits, prefix: str, received_at: float,
                  admit: Callable[[str, str, int], None] | None = None) -> Frame:
    started = time.perf_counter()
    line = parse_line_id(topic, prefix, limits.line_id_pattern)
    props = dict(user_properties or {})
    frame_id = _frame_id(props.get("frame_id"), line, None, "user property frame_id")
    if len(payload) > limits.max_payload_bytes:
        raise FrameError("payload_too_large", f"{len(payload)} bytes > frames.max_payload_bytes "
                         f"{limits.max_payload_bytes}", line, frame_id)
    if not payload:
        raise FrameError("empty_payload", "payload has no bytes", line, frame_id)
    frame_id = frame_id or derive_frame_id(payload)
    ts = _ts(props.get("ts"), line, frame_id, "user property ts") if "ts" in props else None
    camera = _text(props.get("camera"), line, frame_id, "user property camera")

    image_bytes = payload
    if _JSON_START.match(payload):
        envelope = _parse_envelope(payload, line, frame_id)  # a JSON null counts as absent
        if envelope.get("frame_id") is not None:
            frame_id = _frame_id(envelope["frame_id"], line, frame_id, "envelope frame_id") or frame_id
        if envelope.get("ts") is not None:
            ts = _ts(envelope["ts"], line, frame_id, "envelope ts")
        if envelope.get("camera") is not None:
            camera = _text(envelope["camera"], line, frame_id, "envelope camera")
        image_bytes = _image_from_envelope(envelope, line, frame_id)

    image = _decode_image(image_bytes, limits, line, frame_id, admit)
    return Frame(line=line, frame_id=frame_id, ts=received_at if ts is None else ts, image=image,
                 received_at=received_at, camera=camera, payload_bytes=len(payload),
                 decode_s=time.perf_counter() - started)


def encode_envelope(image_bytes: bytes, frame_id: str | None, ts: float | None, camera: str | None = None) -> bytes:
    """The JSON envelope for MQTT 3.1.1 publishers (replay, tests); None fields are left out."""
    envelope: dict[str, Any] = {"image_b64": base64.b64encode(image_bytes).decode("ascii")}
    if frame_id is not None:
        envelope["frame_id"] = frame_id
    if ts is not None:
        envelope["ts"] = float(ts)
    if camera is not None:
        envelope["camera"] = camera
    return json.dumps(envelope).encode("utf-8")


def frame_user_properties(frame_id: str | None, ts: float | None, camera: str | None = None) -> list[tuple[str, str]]:
    """MQTT 5 user properties for a raw-image frame (paho: `props.UserProperty = ...`)."""
    pairs = [("frame_id", frame_id), ("ts", None if ts is None else repr(float(ts))), ("camera", camera)]
    return [(key, value) for key, value in pairs if value is not None]


# ------------------------------------------------------------------------------- metadata


def _parse_envelope(payload: bytes, line: str, frame_id: str) -> dict[str, Any]:
    try:
        envelope = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FrameError("bad_json", f"payload starts with '{{' but is not JSON: {exc}", line, frame_id) from None
    if not isinstance(envelope, dict):
        raise FrameError("bad_envelope", "JSON envelope is not an object", line, frame_id)
    return envelope


def _image_from_envelope(envelope: Mapping[str, Any], line: str, frame_id: str) -> bytes:
    encoded = envelope.get("image_b64")
    if not isinstance(encoded, str):
        raise FrameError("bad_envelope", "JSON envelope needs image_b64, a base64 string", line, frame_id)
    try:
        # Line breaks are allowed (the `base64` tool wraps at 76 columns); any other stray character is not.
        image_bytes = base64.b64decode(_WHITESPACE.sub("", encoded), validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII text
        raise FrameError("bad_envelope", f"image_b64 is not base64: {exc}", line, frame_id) from None
    if not image_bytes:
        raise FrameError("empty_payload", "image_b64 is empty", line, frame_id)
    return image_bytes


def _frame_id(value: Any, line: str, current: str | None, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):  # a JSON frame counter
        value = str(value)
    return _text(value, line, current, what, required=True)


def _text(value: Any, line: str, frame_id: str | None, what: str, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not is_valid_id(value):
        size = f"{len(value)} characters: " if isinstance(value, str) and len(value) > MAX_ID_CHARS else ""
        raise FrameError("bad_envelope", f"{what} must be 1-{MAX_ID_CHARS} printable characters (no control, "
                         f"separator or format characters), got {size}{escape_text(value)}", line, frame_id)
    return value


def _ts(value: Any, line: str, frame_id: str, what: str) -> float:
    """Epoch seconds: a JSON number in the envelope, a decimal string in a user property."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        if isinstance(value, str) and len(value) > MAX_TS_TEXT:
            raise ValueError
        ts = float(value)  # OverflowError for an int beyond float range (a 400-digit JSON number)
    except (TypeError, ValueError, OverflowError):
        raise FrameError("bad_envelope", f"{what} must be a number of epoch seconds, got {escape_text(value)}",
                         line, frame_id) from None
    if not math.isfinite(ts) or ts < 0:
        raise FrameError("bad_envelope", f"{what} must be finite and >= 0, got {ts!r}", line, frame_id)
    if ts >= MAX_TS:
        raise FrameError("bad_envelope", f"{what} {ts!r} looks like milliseconds; send epoch seconds",
                         line, frame_id)
    return ts


# --------------------------------------------------------------------------------- pixels


def _decode_image(data: bytes, limits: FrameLimits, line: str, frame_id: str,
                  admit: Callable[[str, str, int], None] | None = None) -> np.ndarray:
    fmt = sniff_format(data)
    if fmt is None:
        raise FrameError("unsupported_format", f"not JPEG or PNG (first bytes {data[:8].hex()})", line, frame_id)
    if fmt not in limits.formats:
        raise FrameError("unsupported_format", f"{fmt} is not in frames.formats {list(limits.formats)}",
                         line, frame_id)
    _widen_pil_guard(limits.max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:  # lazy: reads the header only
            width, height = img.size
            if width * height > limits.max_pixels:
                raise FrameError("too_many_pixels", f"{width}x{height} = {width * height} pixels > "
                                 f"frames.max_pixels {limits.max_pixels}", line, frame_id)
            if min(width, height) < limits.min_side:
                raise FrameError("image_too_small", f"{width}x{height} has a side under frames.min_side "
                                 f"{limits.min_side}", line, frame_id)
            if admit is not None:
                admit(line, frame_id, decoded_bytes(width, height))
            img.load()
            return _to_rgb(img)
    except (FrameError, Refused):
        raise
    except Image.DecompressionBombError as exc:  # PIL's own guard fired first (header far over its limit)
        raise FrameError("too_many_pixels", str(exc), line, frame_id) from None
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        logger.debug("%s frame %s of line %s failed to decode", fmt, frame_id, line, exc_info=True)
        raise FrameError("corrupt_image", f"{fmt} does not decode: {type(exc).__name__}: {exc}",
                         line, frame_id) from None


def _widen_pil_guard(max_pixels: int) -> None:
    """Keep PIL's decompression-bomb error above our own limit, so ours decides and reports.

    PIL raises above 2 * MAX_IMAGE_PIXELS at open; we check the header size right after open, so PIL's
    guard only has to stay out of the way of sizes we accept. It is never lowered: it is process-wide.
    """
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        logger.info("raising PIL MAX_IMAGE_PIXELS from %d to frames.max_pixels %d",
                    Image.MAX_IMAGE_PIXELS, max_pixels)
        Image.MAX_IMAGE_PIXELS = max_pixels


def _to_rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8, writable. 16-bit grey keeps its top byte: PIL's convert would clip it to white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I"):
        grey = (np.clip(np.asarray(img), 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)  # (H, W)
        return np.repeat(grey[:, :, None], 3, axis=2)  # (H, W, 3)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, LA, P, RGBA (alpha dropped), CMYK, 1
    return np.array(img, dtype=np.uint8)  # copy: np.asarray of a PIL image is read-only
