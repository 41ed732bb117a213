"""Parquet audit log: one row per frame decision or failure, on disk before the frame is acked.

Layout (Hive partitions, readable by pyarrow.dataset and DuckDB while the service runs)::

    <directory>/date=YYYY-MM-DD/line_id=<line>/part-<YYYYmmddTHHMMSSZ>-<seq>-<uuid8>.parquet

``date`` is the UTC date of the service's clock when the frame was decided (received, for failures),
not the camera's clock, so a camera with a wrong clock cannot scatter rows over odd partitions.

Why ``line_id=`` and not ``line=``: the exact line id is the ``line`` column inside every file.
Readers infer partition value types and let the path win over the file: a directory ``line=007``
makes pyarrow fail to merge the schemas (string in the file, int32 from the path), and ``line=7``
makes DuckDB return ``line`` as BIGINT, so the column's type would depend on which lines a query
reads; tests/sinks/test_audit.py shows both. A partition key with another name never collides:
query ``line`` for the id, filter on ``line_id`` when you want the reader to skip directories.
The directory value is the id percent-encoded (identical for ids made of letters, digits and
``_ . - ~``); failures without a usable line go to ``line_id=_unknown`` (``line`` null or raw).

Durability and file size. Parquet is only readable once its footer is written, so a row can only
be durable inside a closed file. Writing a new small file on every ``flush()`` (the service flushes
once per micro-batch, 1–20 times a second) would leave tens of thousands of files per line per
day. Instead each partition has one open *segment* held in memory, and ``flush()`` rewrites that
segment's whole file: all its rows go to ``<name>.parquet.tmp`` in the same directory, which is
fsynced, ``os.replace``d over ``<name>.parquet`` and the directory fsynced. Every flushed row is
therefore in a complete, renamed file; readers globbing ``*.parquet`` see the previous or the new
version, never a partial one and never a duplicate row. A segment is sealed (and the next rows start
a new file) after ``rotate_s`` seconds (``maybe_rotate``) or ``max_rows`` rows, so a line writes one
file per minute by default. The cost is rewriting the segment on each flush (quadratic within a
segment), bounded by ``max_rows``. Measured on the idle 2-core development box (zstd, one region
on every tenth row): rewriting a segment of 1k rows takes 2.6 ms (29 kB file), 5k rows 3.8 ms
(104 kB), 20k rows 9.8 ms (395 kB), before the fsync. A line at 10 fps fills 600 rows a minute (about 2.5 ms
per flush); the default cap of 10k rows keeps a flush near 5 ms even at 150 fps on one line.

A crash loses only rows that were not flushed, and those frames were not acked, so the broker
redelivers them. Leftover ``*.parquet.tmp`` files from a crash mid-write are removed (WARNING) when
the next AuditLog opens the directory. One AuditLog owns a directory at a time (an exclusive
``flock`` on ``.audit.lock``): give each worker its own directory, e.g. ``audit/instance=w1``.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from musc_stream import __version__
from musc_stream.durable import fsync_path
from musc_stream.stream.records import Decision, FrameFailure, Region

logger = logging.getLogger(__name__)

AUDIT_SCHEMA_VERSION = 1  # of the Parquet columns below; bump on an incompatible change
UNKNOWN_LINE = "_unknown"  # partition (and metric label) of failures whose line is not known
PARTITION_KEYS = ("date", "line_id")
LATENCY_STAGES = ("decode", "queue", "backbone", "scoring", "publish", "end_to_end")
LOCK_NAME = ".audit.lock"
_MAX_LINE_DIR = 200  # characters of the encoded line id in a directory name (NAME_MAX is 255)
# Longest text kept per string column (ids are capped at 128 by the frame contract; this is a backstop).
MAX_ID_TEXT = 1024
MAX_DETAIL_TEXT = 4096
_MAX_EPOCH_S = 253_402_300_800.0  # 10000-01-01: later times do not fit timestamp("ms") readers

_TS = pa.timestamp("ms", tz="UTC")
REGION_TYPE = pa.struct([
    ("x0", pa.int32()), ("y0", pa.int32()), ("x1", pa.int32()), ("y1", pa.int32()),
    ("score", pa.float32()), ("area_px", pa.int32()),
])
# A fixed struct rather than a map: `latency_s.backbone` is plain SQL in DuckDB, and a missing
# stage is a null rather than a missing key.
LATENCY_TYPE = pa.struct([(stage, pa.float64()) for stage in LATENCY_STAGES])
AUDIT_SCHEMA = pa.schema([
    ("schema_version", pa.int16()),
    ("frame_id", pa.string()),
    ("line", pa.string()),
    ("camera", pa.string()),
    ("ts", _TS),  # camera time
    ("received_at", _TS),
    ("decided_at", _TS),  # failures: when the failure was audited
    ("score", pa.float64()),
    ("window_score", pa.float64()),
    ("memory_score", pa.float64()),
    ("threshold", pa.float64()),
    ("is_anomaly", pa.bool_()),
    ("warmup", pa.bool_()),
    ("changeover", pa.bool_()),
    ("drift_suspected", pa.bool_()),  # unlike the window: part of a possible product change
    ("target_false_alarms_per_1000", pa.float64()),  # the threshold's operating point
    ("regions", pa.list_(REGION_TYPE)),
    ("latency_s", LATENCY_TYPE),
    ("window_size", pa.int32()),
    ("memory_size", pa.int64()),
    ("model", pa.string()),
    ("weights", pa.string()),
    ("service_version", pa.string()),
    ("error_reason", pa.string()),  # null for decisions
    ("error_detail", pa.string()),
    # Operator feedback rows (README "Feedback"): null on decisions and failures. Added after the
    # first release as nullable columns: files written before them still read (DuckDB
    # union_by_name=true, or pyarrow.dataset with schema=AUDIT_SCHEMA), their feedback columns null.
    ("feedback_verdict", pa.string()),  # not_defect | defect
    ("feedback_outcome", pa.string()),  # applied | already_normal | recorded | unknown_frame | error
    ("feedback_source", pa.string()),  # line_page | mqtt | what the sender called itself
    ("feedback_user", pa.string()),
    ("feedback_detail", pa.string()),
])


@dataclass
class _Segment:
    """The open file of one partition: every row it holds, and how many of them are on disk."""

    path: Path
    opened_at: float
    batches: list[pa.RecordBatch] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    durable_rows: int = 0

    @property
    def dirty(self) -> bool:
        return self.rows > self.durable_rows


class AuditLog:
    """Parquet audit log; see the module docstring for layout and the durability contract.

    Contract the service relies on: once ``write_decision(d)`` (or ``write_failure``) and then
    ``flush()`` have returned, the row is in a closed, renamed, fsynced ``*.parquet`` file, so the
    frame may be acked. If ``flush()`` raises, nothing written since the last successful flush may
    be acked; the rows stay buffered and the next ``flush()`` retries them. Thread-safe, but the
    file I/O happens under the lock: call it from one owner thread.
    """

    def __init__(
        self,
        directory: Path,
        rotate_s: float = 60.0,
        service_version: str = __version__,
        clock: Callable[[], float] = time.time,
        max_rows: int = 10_000,
    ) -> None:
        if rotate_s <= 0:
            raise ValueError(f"rotate_s must be positive, got {rotate_s}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.directory = Path(directory)
        self.rotate_s = float(rotate_s)
        self.max_rows = int(max_rows)
        self.service_version = service_version
        self._clock = clock
        self._lock = threading.Lock()
        self._segments: dict[tuple[str, str], _Segment] = {}
        self._seq = 0
        self._closed = False
        self._ensure_dir(self.directory)
        self._lock_fd = self._acquire_directory_lock()
        self._remove_leftovers()

    # -- public API -----------------------------------------------------------------------------

    def write_decision(self, d: Decision) -> None:
        """Buffer one decision row; durable only after the next ``flush()``.

        Raises TypeError or ValueError (pyarrow's ArrowTypeError/ArrowInvalid) for a row the
        schema cannot hold, here rather than in ``flush()``, where one bad row would make every
        later flush fail and stop all acks.
        """
        latency = {stage: _seconds(d.latency_s.get(stage)) for stage in LATENCY_STAGES}
        if latency["end_to_end"] is None and d.received_at > 0 and d.decided_at > 0:
            latency["end_to_end"] = d.end_to_end_s
        row = {
            "schema_version": AUDIT_SCHEMA_VERSION,
            "frame_id": _text(d.frame_id),
            "line": _text(d.line),
            "camera": _text(d.camera),
            "ts": _ms(d.ts),
            "received_at": _ms(d.received_at),
            "decided_at": _ms(d.decided_at),
            "score": d.score,
            "window_score": d.window_score,
            "memory_score": d.memory_score,
            "threshold": d.threshold,
            "is_anomaly": d.is_anomaly,
            "warmup": d.warmup,
            "changeover": d.changeover,
            "drift_suspected": d.drift_suspected,
            "target_false_alarms_per_1000": d.target_false_alarms_per_1000,
            "regions": [_region_row(r) for r in d.regions],
            "latency_s": latency,
            "window_size": d.window_size,
            "memory_size": d.memory_size,
            "model": _text(d.model or None),
            "weights": _text(d.weights or None),
            "service_version": self.service_version,
            "error_reason": None,
            "error_detail": None,
        }
        self._append(d.line, self._partition_time(d.decided_at, d.received_at), row)

    def write_failure(self, f: FrameFailure) -> None:
        """Buffer one failure row (error_reason set, scores null); durable after ``flush()``.

        Never raises for what the failure holds: every string is stored as valid UTF-8 (lone
        surrogates and undecodable characters backslash-escaped) and capped in length, times out of
        range become null, and a row the schema still refuses is stored with its text escaped.
        """
        now = self._clock()
        row: dict[str, Any] = {
            "schema_version": AUDIT_SCHEMA_VERSION,
            "frame_id": _text(f.frame_id),
            "line": _text(f.line or None),
            "received_at": _ms(f.received_at),
            "decided_at": _ms(now),
            "service_version": self.service_version,
            "error_reason": _text(f.reason),
            "error_detail": _text(f.detail, MAX_DETAIL_TEXT),
        }
        try:
            pa.RecordBatch.from_pylist([row], schema=AUDIT_SCHEMA)
        except (TypeError, ValueError, pa.ArrowException) as exc:  # a bug upstream: keep the row, escaped
            logger.error("audit row of a failure did not fit the schema (%s); stored escaped", exc)
            row = {"schema_version": AUDIT_SCHEMA_VERSION, "frame_id": _text(ascii(f.frame_id)),
                   "line": _text(ascii(f.line)), "decided_at": _ms(now), "service_version": self.service_version,
                   "error_reason": _text(ascii(f.reason)), "error_detail": _text(ascii(f.detail), MAX_DETAIL_TEXT)}
        self._append(_text(f.line or None), self._partition_time(f.received_at, now), row)

    def write_feedback(self, command: Any, result: Any, model: str = "", weights: str = "") -> None:
        """Buffer one operator-feedback row (feedback.py: a FeedbackCommand and the engine's
        FeedbackResult); durable after ``flush()``. ``decided_at`` is when the verdict was applied,
        ``score`` the frame's image score when the engine still knew it."""
        now = self._clock()
        row: dict[str, Any] = {
            "schema_version": AUDIT_SCHEMA_VERSION,
            "frame_id": _text(command.frame_id),
            "line": _text(command.line),
            "received_at": _ms(command.received_at),
            "decided_at": _ms(now),
            "score": result.score,
            "model": _text(model or None),
            "weights": _text(weights or None),
            "service_version": self.service_version,
            "feedback_verdict": _text(command.verdict),
            "feedback_outcome": _text(result.outcome),
            "feedback_source": _text(command.source),
            "feedback_user": _text(command.user),
            "feedback_detail": _text(result.detail, MAX_DETAIL_TEXT),
        }
        self._append(_text(command.line), self._partition_time(now), row)

    def flush(self) -> list[Path]:
        """Make every buffered row durable; return the files (re)written, sealing full ones."""
        with self._lock:
            self._check_open()
            written = []
            for key, seg in list(self._segments.items()):
                if seg.dirty:
                    self._write_segment(seg)
                    written.append(seg.path)
                if seg.rows >= self.max_rows:
                    del self._segments[key]
            return written

    def maybe_rotate(self) -> list[Path]:
        """Seal segments opened at least ``rotate_s`` ago (writing unflushed rows); return them.

        Call it from the owner's loop, e.g. every second; it does no I/O when nothing is due.
        """
        with self._lock:
            self._check_open()
            now = self._clock()
            sealed = []
            for key, seg in list(self._segments.items()):
                # abs(): a clock stepped back (NTP) must not keep a segment open for hours
                if abs(now - seg.opened_at) >= self.rotate_s:
                    if seg.dirty:
                        self._write_segment(seg)
                    del self._segments[key]
                    sealed.append(seg.path)
            return sealed

    def close(self) -> list[Path]:
        """Flush and seal everything, release the directory; the log accepts no rows after."""
        with self._lock:
            if self._closed:
                return []
            try:
                sealed = []
                for seg in self._segments.values():
                    if seg.dirty:
                        self._write_segment(seg)
                    sealed.append(seg.path)
                self._segments.clear()
            finally:
                self._closed = True
                os.close(self._lock_fd)
            logger.info("audit log %s closed (%d files sealed)", self.directory, len(sealed))
            return sealed

    @property
    def pending_rows(self) -> int:
        """Rows written but not yet durable (not yet safe to ack)."""
        with self._lock:
            return sum(seg.rows - seg.durable_rows for seg in self._segments.values())

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _partition_time(self, *candidates: float) -> float:
        """The first known service-side time (epoch s) of the row, else now."""
        for t in candidates:
            if _ms(t) is not None:
                return t
        return self._clock()

    def _append(self, line: str | None, at: float, row: dict[str, Any]) -> None:
        # Converting the row alone costs about 0.1 ms; it proves the batch built in flush() from
        # the same dicts cannot fail.
        pa.RecordBatch.from_pylist([row], schema=AUDIT_SCHEMA)
        date = time.strftime("%Y-%m-%d", time.gmtime(at))
        line_dir = _line_dir(line)
        with self._lock:
            self._check_open()
            seg = self._segments.get((date, line_dir))
            if seg is None:
                seg = self._open_segment(date, line_dir)
                self._segments[(date, line_dir)] = seg
            seg.pending.append(row)
            seg.rows += 1

    def _open_segment(self, date: str, line_dir: str) -> _Segment:
        opened_at = self._clock()
        self._seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(opened_at))
        name = f"part-{stamp}-{self._seq:06d}-{uuid.uuid4().hex[:8]}.parquet"
        path = self.directory / f"date={date}" / f"line_id={line_dir}" / name
        return _Segment(path=path, opened_at=opened_at)

    def _write_segment(self, seg: _Segment) -> None:
        """Rewrite the segment's file with all its rows: tmp, fsync, replace, fsync directory."""
        if seg.pending:
            seg.batches.append(pa.RecordBatch.from_pylist(seg.pending, schema=AUDIT_SCHEMA))
            seg.pending = []
        self._ensure_dir(seg.path.parent)
        tmp = seg.path.with_name(seg.path.name + ".tmp")
        table = pa.Table.from_batches(seg.batches, schema=AUDIT_SCHEMA)
        try:
            with open(tmp, "wb") as fh:
                pq.write_table(table, fh, compression="zstd")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, seg.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(seg.path.parent)
        seg.durable_rows = seg.rows

    def _ensure_dir(self, path: Path) -> None:
        """Create ``path`` and fsync the parent of every directory created, so the entry is durable.

        Checked on every write (one stat) rather than cached: a retention job may delete old
        partitions, and a cached directory that vanished would fail every flush after it.
        """
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            fsync_path(d.parent)

    def _acquire_directory_lock(self) -> int:
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"another AuditLog holds {self.directory}; give each worker its own audit directory"
            ) from None
        return fd

    def _remove_leftovers(self) -> None:
        for tmp in sorted(self.directory.rglob("*.parquet.tmp")):
            logger.warning("removing leftover audit file %s (a previous run died mid-write)", tmp)
            tmp.unlink()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"audit log {self.directory} is closed")


def _line_dir(line: str | None) -> str:
    """Directory value for a line: percent-encoded id, or ``_unknown`` when absent or too long.

    A failure may carry the raw, invalid line id from a topic; an over-long directory name would
    fail every flush (ENAMETOOLONG) and stop all acks, so such rows go to ``_unknown`` (the
    ``line`` column keeps the raw id).
    """
    if not line:
        return UNKNOWN_LINE
    encoded = quote(_text(line), safe="")
    return encoded if len(encoded) <= _MAX_LINE_DIR else UNKNOWN_LINE


def _ms(t: float | None) -> int | None:
    """Epoch seconds → epoch milliseconds; 0, NaN, None (unknown) and times past year 9999 → null."""
    try:
        if t is None or not math.isfinite(t) or t <= 0 or t >= _MAX_EPOCH_S:
            return None
        return round(t * 1000)
    except (TypeError, ValueError, OverflowError):  # not a number at all
        return None


def _text(value: Any, limit: int = MAX_ID_TEXT) -> str | None:
    """Any value as text Parquet can hold: valid UTF-8, at most ``limit`` characters (+ a marker)."""
    if value is None:
        return None
    if not isinstance(value, str):
        try:
            value = str(value)
        except Exception:  # noqa: BLE001 - a __str__ that fails must not fail the audit
            value = f"<{type(value).__name__}>"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates ("\ud800" from JSON): keep them visible, escaped
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(value) > limit:
        value = f"{value[:limit]}...(+{len(value) - limit} chars)"
    return value


def _seconds(s: float | None) -> float | None:
    return None if s is None else float(s)


def _region_row(r: Region) -> dict[str, Any]:
    return {"x0": r.x0, "y0": r.y0, "x1": r.x1, "y1": r.y1, "score": float(r.score),
            "area_px": r.area_px}

