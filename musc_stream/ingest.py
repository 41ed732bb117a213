"""Ingest: paho's network thread decodes and validates frames and hands them to a bounded queue.

Nothing here waits on the GPU: a full queue drops the frame with a counter, a log line and an
error message, and the frame is acknowledged (it was seen and refused, not lost in silence).
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from typing import Any, Callable

import paho.mqtt.client as mqtt

from musc_stream.config import FrameLimits
from musc_stream.frames import FrameError, decode_frame
from musc_stream.mqtt import Topics
from musc_stream.records import Frame, FrameFailure
from musc_stream.sinks.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ack:
    """What acknowledging one MQTT message needs."""

    mid: int
    qos: int


@dataclass
class ResetCommand:
    """Operator's product-changeover command for one line."""

    line: str
    ack: Ack | None = None


WorkItem = Frame | FrameFailure | ResetCommand


class Ingest:
    """paho on_message handler: topic routing, decoding, and the bounded hand-off queue."""

    def __init__(self, topics: Topics, limits: FrameLimits, metrics: Metrics, work: queue.Queue,
                 ack: Callable[[Ack | None], None], on_refused: Callable[[FrameFailure], None]):
        self.topics = topics
        self.limits = limits
        self.metrics = metrics
        self.work = work
        self._ack = ack
        self._on_refused = on_refused  # publishes the error of a frame the queue could not take

    def on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        ack = Ack(message.mid, message.qos) if message.qos > 0 else None
        kind = self.topics.kind(message.topic)
        if kind == "reset":
            line = message.topic.split("/")[-2]
            self._enqueue(ResetCommand(line, ack), line)
            return
        if kind != "frames":
            logger.warning("ignoring message on unexpected topic %s", message.topic)
            self._ack(ack)
            return
        now = time.time()
        props = getattr(message.properties, "UserProperty", None) if message.properties else None
        try:
            frame = decode_frame(message.topic, message.payload, props, self.limits,
                                 self.topics.prefix, now=now)
        except FrameError as exc:
            failure = exc.to_failure(received_at=now, ack=ack)
            self.metrics.observe_received(exc.line)
            logger.warning("frame refused on %s (id %s): %s", message.topic, exc.frame_id, exc)
            self._enqueue(failure, exc.line)
            return
        frame.ack = ack
        self.metrics.observe_received(frame.line)
        self._enqueue(frame, frame.line)

    def _enqueue(self, item: WorkItem, line: str | None) -> None:
        try:
            self.work.put_nowait(item)
        except queue.Full:
            self.metrics.observe_drop(line, "queue_full")
            frame_id = getattr(item, "frame_id", None)
            logger.error("queue full (%d): dropped %s of line %s (id %s)", self.work.maxsize,
                         type(item).__name__, line, frame_id)
            self._on_refused(FrameFailure(reason="queue_full", detail="service busy: ingest queue full",
                                          line=line, frame_id=frame_id, received_at=time.time()))
            self._ack(item.ack)
        self.metrics.set_queue_depth(self.work.qsize())
