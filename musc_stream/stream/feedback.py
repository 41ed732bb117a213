"""Operator feedback on decided frames: the verdicts, the command, its payload, and the per-line
store of recent frames the model did not learn from.

A person at the line says "not a defect" or "defect" about a frame the service decided (from the
line page, or on ``line/<id>/feedback``). "not a defect" teaches the line what the model missed:
the frame's patches go into the memory and its score into the threshold's normal history, if the
frame is still known (see ``RecentFrames``) and the model had not learnt it already. "defect"
changes nothing in the model; like every feedback it is an audit row for the quality team.

What the engine must keep to apply a verdict later is the frame's memory feature sets, which only
frames the model did *not* learn from need (alerts, warm-up outliers, drift suspects): a frame
judged normal is in the memory and the history already. So ``RecentFrames`` keeps the feature
sets of the last ``max_frames`` unlearnt frames (bounded in bytes too, stored as float16: half the
bytes, distances change by about 1e-4), and only the ids of recently learnt ones. An alert stays
known for as long as 64 alerts take to happen, not 64 frames: at 10 frames/s a frame-count ring
would forget an alert before the operator walks to the screen.

This module parses and stores; the engine applies, the service routes and audits.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NOT_DEFECT = "not_defect"
DEFECT = "defect"
VERDICTS = (NOT_DEFECT, DEFECT)  # the line page posts exactly these (ui/board.py VERDICTS)
ALIASES = {"normal": NOT_DEFECT, "not-defect": NOT_DEFECT, "ok": NOT_DEFECT}  # accepted on MQTT, audited as NOT_DEFECT
# What became of a feedback (audit ``feedback_outcome``, metric label ``outcome``):
APPLIED = "applied"  # not_defect: patches into the memory and/or score into the threshold history
ALREADY_NORMAL = "already_normal"  # not_defect on a frame the model learnt as normal (or feedback applied before)
RECORDED = "recorded"  # defect on a known frame: kept for the quality team, model unchanged
UNKNOWN_FRAME = "unknown_frame"  # frame not known any more (too old, line reset, unknown id): audited only
REJECTED = "rejected"  # a payload that could not be read (answered on the error topic)
ERROR = "error"  # the engine failed applying it (logged with its traceback); the model may be unchanged
OUTCOMES = (APPLIED, ALREADY_NORMAL, RECORDED, UNKNOWN_FRAME, REJECTED, ERROR)
MAX_SOURCE_CHARS = 64
MAX_PAYLOAD_BYTES = 4096


class FeedbackError(ValueError):
    """A feedback payload that cannot be used; the message says what is wrong and what to send."""


@dataclass
class FeedbackCommand:
    """One verdict on one frame, on its way to the scoring stage (which owns the line state)."""

    line: str
    frame_id: str
    verdict: str
    source: str  # "mqtt", "line_page", or what the sender called itself
    user: str | None = None
    ack: Any = None  # of the MQTT message, acked once the audit row is durable
    received_at: float = 0.0
    reply: Any = None  # a waiting caller's slot (service.py), set once the row is durable


@dataclass
class FeedbackResult:
    """What the engine did with a verdict."""

    outcome: str
    detail: str  # one line for the audit, the page and the log
    score: float | None = None  # the frame's image score, when known
    patches_added: int = 0
    threshold_history_added: bool = False


def feedback_filter(prefix: str) -> str:
    """Topic filter of feedback commands; never shared: the worker that scored a frame must hear it."""
    return f"{prefix}/+/feedback"


def normalise_verdict(value: Any) -> str:
    """The canonical verdict for ``value``, or FeedbackError naming the accepted ones."""
    if isinstance(value, str):
        verdict = ALIASES.get(value.strip().lower(), value.strip().lower())
        if verdict in VERDICTS:
            return verdict
    raise FeedbackError(f"verdict {_short(value)} is not one of {', '.join(VERDICTS)} "
                        f"(\"normal\" is taken for {NOT_DEFECT})")


def parse_payload(payload: bytes, is_valid_id) -> tuple[str, str, str | None, str | None]:
    """(frame_id, verdict, source, user) from a feedback message's JSON, or FeedbackError."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise FeedbackError(f"feedback payload is {len(payload)} bytes, over {MAX_PAYLOAD_BYTES}; send "
                            '{"frame_id": "...", "verdict": "not_defect"}')
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FeedbackError('feedback payload is not JSON; send {"frame_id": "...", "verdict": "not_defect"} '
                            'or "defect"') from None
    if not isinstance(body, dict):
        raise FeedbackError('feedback payload must be a JSON object like {"frame_id": "...", "verdict": "defect"}')
    frame_id = body.get("frame_id")
    if not is_valid_id(frame_id):
        raise FeedbackError(f"feedback frame_id {_short(frame_id)} is missing or not 1-128 printable characters; "
                            "use the frame_id of the result or alert")
    verdict = normalise_verdict(body.get("verdict"))
    source = _optional_text(body, "source")
    user = _optional_text(body, "user")
    return frame_id, verdict, source, user


def _optional_text(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.isprintable() or not 0 < len(value) <= MAX_SOURCE_CHARS:
        raise FeedbackError(f"feedback {key} {_short(value)} must be 1-{MAX_SOURCE_CHARS} printable characters "
                            "or left out")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Kept:
    """A recent frame the model did not (fully) learn: what "not a defect" would add."""

    score: float
    sets: dict[str, np.ndarray] | None  # memory feature sets (float16), None when the memory has it
    to_threshold: bool  # its score may enter the threshold history (steady regime, judged anomalous)
    nbytes: int = field(default=0)


class RecentFrames:
    """Per line: feature sets of the last ``max_frames`` unlearnt frames (at most ``max_bytes``),
    and the ids of the last ``4 × max_frames`` frames already learnt as normal. Not thread-safe:
    the scoring stage owns it, as it owns the line."""

    def __init__(self, max_frames: int = 64, max_bytes: int = 48 * 2**20):
        if max_frames < 1 or max_bytes < 0:
            raise ValueError(f"max_frames must be >= 1 and max_bytes >= 0, got {max_frames}, {max_bytes}")
        self.max_frames = int(max_frames)
        self.max_bytes = int(max_bytes)
        self._kept: OrderedDict[str, Kept] = OrderedDict()
        self._learnt: OrderedDict[str, None] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    def learnt(self, frame_id: str) -> None:
        """The model learnt this frame as normal (or a verdict was applied): nothing left to add."""
        self._drop(frame_id)
        self._learnt[frame_id] = None
        self._learnt.move_to_end(frame_id)
        while len(self._learnt) > 4 * self.max_frames:
            self._learnt.popitem(last=False)

    def keep(self, frame_id: str, score: float, sets: dict[str, np.ndarray] | None, to_threshold: bool) -> None:
        """Remember what "not a defect" on this frame would add; the oldest go first."""
        self._drop(frame_id)
        self._learnt.pop(frame_id, None)
        if not math.isfinite(score):
            return
        small = {k: np.asarray(v, dtype=np.float16) for k, v in sets.items()} if sets else None
        size = sum(v.nbytes for v in small.values()) if small else 0
        if size > self.max_bytes:
            small, size = None, 0  # one frame over the whole budget: its score is still useful
        self._kept[frame_id] = Kept(float(score), small, bool(to_threshold), size)
        self.nbytes += size
        while len(self._kept) > self.max_frames or self.nbytes > self.max_bytes:
            _, old = self._kept.popitem(last=False)
            self.nbytes -= old.nbytes

    def take(self, frame_id: str) -> Kept | None:
        """The kept frame, forgotten here (a second verdict finds it learnt, never adds twice)."""
        kept = self._kept.get(frame_id)
        if kept is not None:
            self.learnt(frame_id)
        return kept

    def peek(self, frame_id: str) -> Kept | None:
        return self._kept.get(frame_id)

    def is_learnt(self, frame_id: str) -> bool:
        return frame_id in self._learnt

    def clear(self) -> None:
        """A reset line: frames of the old product mean nothing to the new one."""
        self._kept.clear()
        self._learnt.clear()
        self.nbytes = 0

    def _drop(self, frame_id: str) -> None:
        old = self._kept.pop(frame_id, None)
        if old is not None:
            self.nbytes -= old.nbytes
