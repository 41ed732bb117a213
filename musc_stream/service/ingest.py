"""Ingest: paho's network thread decodes and validates frames and hands them to a bounded queue.

Nothing here waits on the GPU: a full queue refuses the frame with a counter and a log line, and
hands the refusal to the sink (``refusals``), which audits it, answers it on the error topic and
only then acks it, so a refusal is as durable as a decision. A frame is refused *before* it is
decoded when the queue is full or its line already holds its fair share of the queue (half the
queue is free for anyone; beyond that a line may hold capacity / (lines waiting + 1), keeping room
for a line that has nothing waiting), so one flooding camera cannot crowd out the others nor make
the service decode what it will drop. Frames are bounded in bytes too (budget.py): a decode worker
reads the header and decodes the pixels only if the line's fair share of
``engine.max_queued_bytes`` has room for them; a refused frame is a ``queue_full`` drop like the
others (counted, audited by the sink, then acked). Reset commands are validated like
frame topics; retained ones are ignored (a retained reset would wipe the line at every
reconnect). Feedback commands (``line/<id>/feedback``, feedback.py) are checked the
same way; a payload that cannot be used is answered on the error topic. Every ack token carries the connection it came from: an ack for a message of an
earlier connection is dropped (the broker redelivers the message, and the dedupe answers it).
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from typing import Any, Callable

import paho.mqtt.client as mqtt

import re
import threading

from musc_stream.service.budget import ByteBudget, Ticket
from musc_stream.service.config import FrameLimits
from musc_stream.service.frames import FrameError, Refused, decode_frame, derive_frame_id, is_valid_id, parse_line_id
from musc_stream.service.mqtt_client import Topics
from musc_stream.service.sinks.prometheus import Metrics
from musc_stream.stream.feedback import REJECTED, FeedbackCommand, FeedbackError, parse_payload
from musc_stream.stream.records import Frame, FrameFailure

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ack:
    """What acknowledging one MQTT message needs, and the connection it arrived on."""

    mid: int
    qos: int
    connection: int = 0


@dataclass
class ResetCommand:
    """Operator's product-changeover command for one line."""

    line: str
    ack: Ack | None = None
    received_at: float = 0.0


WorkItem = Frame | FrameFailure | ResetCommand | FeedbackCommand
COMMANDS = (ResetCommand, FeedbackCommand)  # queued in order with frames, outside any line's fair share

_JSON_START = re.compile(rb"\s*\{")


class LineShares:
    """Frames (and frame errors) of each line waiting in the work queue; the network thread adds,
    the scoring stage removes."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._counts: dict[str | None, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    def admits(self, line: str | None) -> bool:
        with self._lock:
            if self._total < self.capacity // 2:
                return True
            # +1: room is always kept for a line that has nothing waiting yet
            waiting = sum(1 for c in self._counts.values() if c > 0)
            return self._counts.get(line, 0) < max(1, self.capacity // (waiting + 1))

    def added(self, line: str | None) -> None:
        with self._lock:
            self._counts[line] = self._counts.get(line, 0) + 1
            self._total += 1

    def removed(self, line: str | None) -> None:
        with self._lock:
            left = self._counts.get(line, 0) - 1
            if left > 0:
                self._counts[line] = left
            else:
                self._counts.pop(line, None)
            self._total = max(0, self._total - 1)


class Ingest:
    """paho on_message handler: topic routing, decoding, and the bounded hand-off queue."""

    def __init__(self, topics: Topics, limits: FrameLimits, metrics: Metrics, work: queue.Queue,
                 refusals: queue.Queue, ack: Callable[[Ack | None], None],
                 connection: Callable[[], int] = lambda: 0, shares: LineShares | None = None,
                 budget: ByteBudget | None = None):
        self.topics = topics
        self.limits = limits
        self.metrics = metrics
        self.work = work
        self.refusals = refusals  # FrameFailures the sink must audit before they are acked
        self._ack = ack
        self._connection = connection
        self.shares = shares or LineShares(work.maxsize or 1)
        self.budget = budget  # bytes of decoded frames waiting (None: only the frame count bounds them)
        # Decode stage: jobs numbered on the network thread, decoded by workers, enqueued strictly
        # in arrival order (a reset never overtakes a frame that came before it).
        self._jobs: queue.Queue = queue.Queue(maxsize=4)
        self._next_job = 0
        self._turn = 0
        self._order = threading.Condition()
        self._workers: list[threading.Thread] = []

    def start(self, workers: int = 2) -> None:
        """Decode on ``workers`` threads instead of paho's network thread (0: decode inline)."""
        for i in range(workers):
            thread = threading.Thread(target=self._decode_loop, name=f"musc-decode-{i}", daemon=True)
            thread.start()
            self._workers.append(thread)

    def stop(self) -> None:
        """End the decode workers once the jobs already taken are enqueued (call after paho stopped)."""
        for _ in self._workers:
            self._jobs.put(None)
        for thread in self._workers:
            thread.join(timeout=10)
        self._workers = []

    @property
    def alive(self) -> bool:
        return all(t.is_alive() for t in self._workers)

    def on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # Whatever a payload holds, the worst it may get is an error record: never let an
        # exception reach paho's network thread.
        ack = Ack(message.mid, message.qos, self._connection()) if message.qos > 0 else None
        try:
            self._route(message, ack)
        except Exception:  # noqa: BLE001 - last line of defence of the network thread
            logger.exception("internal error handling a message on %s; answered as an error", ascii(message.topic))
            self._refuse(FrameFailure("internal_error", "internal error reading this message; see service log",
                                      None, None, time.time(), ack))

    def _route(self, message: mqtt.MQTTMessage, ack: Ack | None) -> None:
        kind = self.topics.kind(message.topic)
        if kind == "reset":
            self._reset(message, ack)
            return
        if kind == "other" and message.topic.endswith("/feedback"):
            self._feedback(message, ack)
            return
        if kind != "frames":
            logger.warning("ignoring message on unexpected topic %s", ascii(message.topic))
            self._ack(ack)
            return
        now = time.time()
        props = getattr(message.properties, "UserProperty", None) if message.properties else None
        if self._refused_before_decode(message, props, ack):
            return
        self._submit(lambda: self._decode(message, props, ack, now))

    def _decode(self, message: mqtt.MQTTMessage, props, ack: Ack | None,
                now: float) -> tuple[WorkItem | None, str | None]:
        granted: list[Ticket] = []

        def admit(line: str, frame_id: str, nbytes: int) -> None:
            """Header read, pixels not yet: decode only if the byte budget has room for them."""
            if self.budget is not None:
                ticket = self.budget.reserve(line, nbytes)
                if isinstance(ticket, str):
                    raise Refused(ticket, line, frame_id)
                granted.append(ticket)

        try:
            frame = decode_frame(message.topic, message.payload, props, self.limits,
                                 self.topics.prefix, now=now, admit=admit)
        except Refused as exc:  # a drop like a full queue: counted here, audited by the sink, then acked
            self.metrics.observe_received(exc.line)
            self.metrics.observe_drop(exc.line, "queue_full")
            logger.error("%s: refused frame %s of line %s before decoding its pixels", exc.detail,
                         ascii(exc.frame_id), exc.line)
            self._refuse(FrameFailure(reason="queue_full", detail=f"service busy: {exc.detail}", line=exc.line,
                                      frame_id=exc.frame_id, received_at=now, ack=ack))
            return None, exc.line
        except FrameError as exc:
            self._give_back(granted)
            self.metrics.observe_received(exc.line)
            logger.warning("frame refused on %s (id %s): %s", ascii(message.topic), ascii(exc.frame_id), exc)
            return exc.to_failure(received_at=now, ack=ack), exc.line
        except Exception:  # noqa: BLE001 - whatever a payload holds, the worst it gets is an error
            self._give_back(granted)
            logger.exception("internal error decoding a message on %s; answered as an error", ascii(message.topic))
            return FrameFailure("internal_error", "internal error decoding this message; see service log",
                                None, None, now, ack), None
        except BaseException:
            self._give_back(granted)
            raise
        frame.budget = granted[0] if granted else None
        frame.ack = ack
        frame.redelivered = bool(getattr(message, "dup", False))
        self.metrics.observe_received(frame.line)
        return frame, frame.line

    def _give_back(self, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            self.budget.release(ticket)

    def _submit(self, job: Callable[[], tuple[WorkItem, str | None]]) -> None:
        """Number a job and hand it to the decode workers (waits while all are busy: back-pressure
        to the broker), or run it here when there are none."""
        if not self._workers:
            self._enqueue(*job())
            return
        self._jobs.put((self._next_job, job))
        self._next_job += 1

    def _decode_loop(self) -> None:
        while True:
            entry = self._jobs.get()
            if entry is None:
                return
            seq, job = entry
            try:
                result = job()
            except Exception:  # noqa: BLE001 - a payload must never end a decode worker
                logger.exception("internal error decoding a frame; answered as an error")
                result = None
                self._refuse(FrameFailure("internal_error", "internal error decoding this message; see service log",
                                          None, None, time.time(), None))
            with self._order:
                while self._turn != seq:
                    self._order.wait()
                try:
                    if result is not None:
                        self._enqueue(*result)
                finally:
                    self._turn += 1
                    self._order.notify_all()

    def _refused_before_decode(self, message: mqtt.MQTTMessage, props, ack: Ack | None) -> bool:
        """Refuse without decoding when the queue (or the line's share of it) is full and the
        frame's id is known without decoding (MQTT 5 user property, or a raw image's own hash);
        a JSON envelope must be parsed for its id, so it takes the ordinary path."""
        try:
            line = parse_line_id(message.topic, self.topics.prefix, self.limits.line_id_pattern)
        except FrameError:
            return False  # the decode path answers it as bad_line_id
        full = self.work.full()
        if not full and self.shares.admits(line):
            return False
        frame_id = dict(props or {}).get("frame_id")
        if not is_valid_id(frame_id):
            if _JSON_START.match(message.payload[:64]):
                return False
            frame_id = derive_frame_id(message.payload)
        reason = "queue full" if full else "line over its fair share of the queue"
        self.metrics.observe_received(line)
        self.metrics.observe_drop(line, "queue_full")
        logger.error("%s (%d waiting): refused frame %s of line %s before decoding", reason, self.work.qsize(),
                     ascii(frame_id), line)
        self._refuse(FrameFailure(reason="queue_full", detail=f"service busy: {reason}", line=line,
                                  frame_id=frame_id, received_at=time.time(), ack=ack))
        return True

    def _reset(self, message: mqtt.MQTTMessage, ack: Ack | None) -> None:
        topic = message.topic
        if message.retain:
            logger.warning("ignoring retained reset command on %s: a reset must be sent live, not retained "
                           "(clear it with an empty retained message)", ascii(topic))
            self._ack(ack)
            return
        try:
            line = parse_line_id(topic[: -len("/reset")] + "/frames", self.topics.prefix,
                                 self.limits.line_id_pattern)
        except FrameError as exc:
            logger.warning("ignoring reset command on %s: %s", ascii(topic), exc.detail)
            self._ack(ack)
            return
        command = ResetCommand(line, ack, time.time())
        self._submit(lambda: (command, line))

    def _feedback(self, message: mqtt.MQTTMessage, ack: Ack | None) -> None:
        """An operator's verdict on line/<id>/feedback: checked here, applied by the scoring stage
        (which owns the line state), in arrival order with the frames. A payload that cannot be
        used is answered on the line's error topic (audited, counted), never ignored in silence."""
        topic, now = message.topic, time.time()
        if message.retain:
            logger.warning("ignoring retained feedback on %s: a verdict must be sent live, not retained "
                           "(clear it with an empty retained message)", ascii(topic))
            self._ack(ack)
            return
        try:
            line = parse_line_id(topic[: -len("/feedback")] + "/frames", self.topics.prefix,
                                 self.limits.line_id_pattern)
        except FrameError as exc:
            self._bad_feedback(None, None, f"feedback topic {ascii(topic)}: {exc.detail}", ack, now)
            return
        try:
            frame_id, verdict, source, user = parse_payload(message.payload, is_valid_id)
        except FeedbackError as exc:
            self._bad_feedback(line, None, str(exc), ack, now)
            return
        command = FeedbackCommand(line, frame_id, verdict, source or "mqtt", user, ack, now)
        self._submit(lambda: (command, line))

    def _bad_feedback(self, line: str | None, frame_id: str | None, detail: str, ack: Ack | None,
                      now: float) -> None:
        logger.warning("feedback refused (line %s): %s", line, detail)
        self.metrics.observe_feedback(line, None, REJECTED)
        self._refuse(FrameFailure("bad_feedback", detail, line, frame_id, now, ack))

    def _enqueue(self, item: WorkItem | None, line: str | None) -> None:
        if item is None:  # refused by the byte budget: already on its way to the audit
            return
        counted = not isinstance(item, COMMANDS)
        if counted:
            self.shares.added(line)
        try:
            self.work.put_nowait(item)
        except queue.Full:
            if counted:
                self.shares.removed(line)
            if isinstance(item, ResetCommand):  # unacked: the broker redelivers it
                logger.error("queue full (%d): reset of line %s not taken; it stays unacked and the broker "
                             "redelivers it after the next reconnect", self.work.maxsize, line)
                return
            if isinstance(item, FeedbackCommand):  # answered: the sender may send it again
                self.metrics.observe_feedback(line, item.verdict, REJECTED)
                self._refuse(FrameFailure("bad_feedback", f"service busy (queue of {self.work.maxsize} full): "
                                          "feedback not taken; send it again in a moment", line, item.frame_id,
                                          time.time(), item.ack))
                return
            frame_id = getattr(item, "frame_id", None)
            if self.budget is not None:
                self.budget.release(getattr(item, "budget", None))
            self.metrics.observe_drop(line, "queue_full")
            logger.error("queue full (%d): refused %s of line %s (id %s)", self.work.maxsize,
                         type(item).__name__, line, ascii(frame_id))
            self._refuse(FrameFailure(reason="queue_full", detail="service busy: ingest queue full",
                                      line=line, frame_id=frame_id, received_at=time.time(), ack=item.ack))
        self.metrics.set_queue_depth(self.work.qsize())

    def _refuse(self, failure: FrameFailure) -> None:
        try:
            self.refusals.put_nowait(failure)
        except queue.Full:  # only QoS 0 floods get here: QoS 1 refusals wait unacked, few at a time
            logger.error("refusal queue full: refusal of %s (line %s) not audited", ascii(failure.frame_id),
                         failure.line)
            self._ack(failure.ack)
