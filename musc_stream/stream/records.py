"""The records that travel between ingest, engine and sinks: a decoded frame and its decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1  # of every JSON payload we publish; bump on an incompatible change


@dataclass
class Frame:
    """One decoded, validated camera frame waiting to be scored."""

    line: str
    frame_id: str
    ts: float  # camera timestamp, epoch seconds (receive time when the camera sent none)
    image: np.ndarray  # (H, W, 3) uint8 RGB, the frame's own size
    received_at: float  # epoch seconds when the payload arrived
    camera: str | None = None
    payload_bytes: int = 0
    decode_s: float = 0.0
    ack: Any = None  # opaque token the ingest uses to acknowledge the MQTT message once durable
    redelivered: bool = False  # MQTT DUP flag: the broker sent this message before (crash, reconnect)
    budget: Any = None  # byte-budget Ticket of the decoded image (budget.py): ingest takes it, scoring gives it back


@dataclass(frozen=True)
class Region:
    """An anomalous connected region, in the frame's own pixel coordinates (x1/y1 exclusive)."""

    x0: int
    y0: int
    x1: int
    y1: int
    score: float  # max anomaly score inside the region
    area_px: int

    def as_dict(self) -> dict[str, float | int]:
        return {"x0": self.x0, "y0": self.y0, "x1": self.x1, "y1": self.y1,
                "score": round(float(self.score), 6), "area_px": self.area_px}


@dataclass
class Decision:
    """The engine's verdict on one frame; every sink writes some view of it."""

    line: str
    frame_id: str
    ts: float
    score: float
    threshold: float | None
    is_anomaly: bool
    warmup: bool
    window_score: float | None = None
    memory_score: float | None = None
    regions: list[Region] = field(default_factory=list)
    heatmap: np.ndarray | None = None  # (H, W) float32 anomaly map at the frame's size
    image: np.ndarray | None = None  # the frame, kept only for alerts (heatmap overlay)
    window_size: int = 0  # reference frames the score used
    memory_size: int = 0  # patches in the line's memory when scored
    changeover: bool = False  # the line was reset (command or drift) just before this frame
    drift_suspected: bool = False  # unlike the line's window: part of a possible product change
    target_false_alarms_per_1000: float | None = None  # the operating point the threshold aims at
    patch_map: np.ndarray | None = None  # (h, w) patch scores, only when the engine keeps maps
    camera: str | None = None
    received_at: float = 0.0
    decided_at: float = 0.0
    latency_s: dict[str, float] = field(default_factory=dict)  # stage → seconds
    model: str = ""
    weights: str = ""
    ack: Any = None

    @property
    def end_to_end_s(self) -> float:
        return max(0.0, self.decided_at - self.received_at)


@dataclass
class FrameFailure:
    """A frame that could not be scored; published on line/<id>/error and audited."""

    reason: str  # machine-readable code, e.g. "corrupt_image", "payload_too_large"
    detail: str
    line: str | None = None
    frame_id: str | None = None
    received_at: float = 0.0
    ack: Any = None
