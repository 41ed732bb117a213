"""Feedback rows in the real Parquet audit: readable beside files written before the feedback
columns existed (DuckDB and pyarrow, as README "Feedback" says), and never taken for decisions."""

import time

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from musc_stream.service.dedupe import decided_in_audit, last_decisions
from musc_stream.service.sinks.audit import AUDIT_SCHEMA, AuditLog
from musc_stream.stream.feedback import FeedbackCommand, FeedbackResult
from musc_stream.stream.records import Decision

FEEDBACK_COLUMNS = [f.name for f in AUDIT_SCHEMA if f.name.startswith("feedback_")]


def _old_file(root, now):
    """A decision row as the audit wrote it before feedback: no feedback_* columns."""
    old_schema = pa.schema([f for f in AUDIT_SCHEMA if f.name not in FEEDBACK_COLUMNS])
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    folder = root / f"date={day}" / "line_id=l1"
    folder.mkdir(parents=True)
    row = {"schema_version": 1, "frame_id": "old", "line": "l1", "decided_at": round(now * 1000) - 5000,
           "score": 0.4, "is_anomaly": False, "warmup": False}
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), folder / "part-old.parquet")


def test_feedback_rows_read_with_old_files_and_decide_nothing(tmp_path):
    now = time.time()
    _old_file(tmp_path, now)
    with AuditLog(tmp_path, clock=lambda: now) as audit:
        audit.write_decision(Decision(line="l1", frame_id="f1", ts=now, score=0.9, threshold=0.5, is_anomaly=True,
                                      warmup=False, received_at=now - 1, decided_at=now - 1))
        audit.write_feedback(FeedbackCommand("l1", "f1", "not_defect", "line_page", "ana", received_at=now),
                             FeedbackResult("applied", "learnt as normal", 0.9, 12, True), "m@224", "w")
        audit.write_feedback(FeedbackCommand("l1", "never-decided", "defect", "mqtt", received_at=now),
                             FeedbackResult("unknown_frame", "not known"))
    glob = f"{tmp_path}/**/*.parquet"
    rows = duckdb.connect().execute(
        f"SELECT frame_id, feedback_verdict, feedback_outcome, feedback_source, feedback_user "
        f"FROM read_parquet('{glob}', hive_partitioning=true, union_by_name=true) ORDER BY decided_at").fetchall()
    assert rows == [("old", None, None, None, None), ("f1", None, None, None, None),
                    ("f1", "not_defect", "applied", "line_page", "ana"),
                    ("never-decided", "defect", "unknown_frame", "mqtt", None)]
    table = ds.dataset(tmp_path, format="parquet", partitioning="hive", schema=AUDIT_SCHEMA).to_table()
    assert sorted(table.column("feedback_outcome").to_pylist(), key=str) == [None, None, "applied", "unknown_frame"]
    # A feedback row is not a decision: its id stays free, and it is never re-published as one.
    recent = decided_in_audit(tmp_path, 100)
    assert ("l1", "f1") in recent and ("l1", "old") in recent and ("l1", "never-decided") not in recent
    replay = last_decisions(tmp_path)
    assert replay[("l1", "f1")].score == 0.9 and ("l1", "never-decided") not in replay
