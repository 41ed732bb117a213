"""Which (line, frame_id) pairs were already answered, so a frame is decided at most once.

The broker redelivers every frame not acked before a crash or a reconnect, and a camera whose
counter restarts reuses ids. Both must not get a second decision. The service remembers the
pairs it decided in a bounded, insertion-ordered set, rebuilt on start
from the newest rows of the audit log (the durable record of what was answered).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

from musc_stream.stream.records import Decision, Region

logger = logging.getLogger(__name__)

Key = tuple[str, str]


class RecentIds:
    """A bounded set of (line, frame_id) keys; the oldest are forgotten first."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._keys: OrderedDict[Key, None] = OrderedDict()

    def add(self, key: Key) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)


def decided_in_audit(directory: Path, capacity: int, dates: int = 2) -> RecentIds:
    """The newest ``capacity`` decided keys in the audit under ``directory`` (last ``dates`` date
    partitions; older ones are not read, so start-up stays fast on a long-running box).

    Only decisions count (``error_reason`` and ``feedback_verdict`` null): a frame refused as
    ``queue_full`` or ``stale`` may be sent again by its camera and then deserves a decision, and a
    feedback row (even on an id never decided) decides nothing. Unreadable files are skipped with a
    warning.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    recent = RecentIds(capacity)
    if not Path(directory).is_dir():
        return recent
    date_dirs = sorted(p for p in Path(directory).iterdir() if p.is_dir() and p.name.startswith("date="))[-dates:]
    tables = []
    for path in sorted(f for d in date_dirs for f in d.rglob("*.parquet")):
        try:
            table = pq.read_table(path, columns=["line", "frame_id", "decided_at", "error_reason"])
            if "feedback_verdict" in pq.read_schema(path).names:  # files before feedback have no such column
                verdicts = pq.read_table(path, columns=["feedback_verdict"])["feedback_verdict"]
                table = table.filter(pc.is_null(verdicts))
            tables.append(table)
        except (OSError, pa.ArrowException) as exc:
            logger.warning("audit file %s not read for dedupe: %s", path, exc)
    if not tables:
        return recent
    table = pa.concat_tables(tables)
    keep = pc.and_(pc.is_valid(table["line"]), pc.is_valid(table["frame_id"]))
    keep = pc.and_(keep, pc.is_null(table["error_reason"]))
    table = table.filter(keep)
    table = table.take(pc.sort_indices(table, sort_keys=[("decided_at", "ascending")]))
    if table.num_rows > capacity:
        table = table.slice(table.num_rows - capacity)
    for line, frame_id in zip(table["line"].to_pylist(), table["frame_id"].to_pylist()):
        recent.add((line, frame_id))
    logger.info("dedupe: %d decided frame id(s) read back from the audit %s", len(recent), directory)
    return recent


def last_decisions(directory: Path, limit: int = 2000, files: int = 32) -> dict[Key, Decision]:
    """The newest decisions in the audit (from its ``files`` most recently written files), as
    Decisions again: a frame decided just before a crash is redelivered by the broker, and its
    result may never have left the process, so the service publishes it once more from here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(directory).is_dir():
        return {}
    paths = sorted(Path(directory).rglob("*.parquet"), key=lambda p: p.stat().st_mtime)[-files:]
    rows: list[dict] = []
    for path in paths:
        try:
            rows += [r for r in pq.read_table(path).to_pylist()
                     if r.get("error_reason") is None and r.get("feedback_verdict") is None]
        except (OSError, pa.ArrowException) as exc:
            logger.warning("audit file %s not read for redelivery: %s", path, exc)
    rows.sort(key=lambda r: r["decided_at"].timestamp() if r.get("decided_at") else 0.0)
    out: dict[Key, Decision] = {}
    for row in rows[-limit:]:
        if row.get("line") is not None and row.get("frame_id") is not None:
            out[(row["line"], row["frame_id"])] = decision_from_row(row)
    return out


def decision_from_row(row: dict) -> Decision:
    """An audit row back as a Decision (no heatmap: an alert re-sent from here has no picture)."""
    def epoch(value) -> float:
        return value.timestamp() if value is not None else 0.0

    return Decision(
        line=row["line"], frame_id=row["frame_id"], ts=epoch(row.get("ts")), score=row["score"],
        threshold=row.get("threshold"), is_anomaly=bool(row.get("is_anomaly")), warmup=bool(row.get("warmup")),
        window_score=row.get("window_score"), memory_score=row.get("memory_score"),
        regions=[Region(**r) for r in row.get("regions") or []],
        window_size=row.get("window_size") or 0, memory_size=row.get("memory_size") or 0,
        changeover=bool(row.get("changeover")), camera=row.get("camera"),
        received_at=epoch(row.get("received_at")), decided_at=epoch(row.get("decided_at")),
        latency_s={k: v for k, v in (row.get("latency_s") or {}).items() if v is not None},
        model=row.get("model") or "", weights=row.get("weights") or "",
    )
