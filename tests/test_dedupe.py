"""Decided ids rebuilt from a real Parquet audit: only decisions count, newest kept."""


from musc_stream.service.dedupe import RecentIds, decided_in_audit
from musc_stream.service.sinks.audit import AuditLog
from musc_stream.stream.records import Decision, FrameFailure


def _decision(line: str, frame_id: str, t: float) -> Decision:
    return Decision(line=line, frame_id=frame_id, ts=t, score=0.1, threshold=None, is_anomaly=False,
                    warmup=True, received_at=t, decided_at=t)


def test_rebuilt_from_the_audit(tmp_path):
    with AuditLog(tmp_path / "audit") as audit:
        for i in range(5):
            audit.write_decision(_decision("a", f"f{i}", 1_700_000_000 + i))
        audit.write_decision(_decision("b", "f0", 1_700_000_010))
        audit.write_failure(FrameFailure("stale", "waited", "a", "late", 1_700_000_011))
        audit.flush()
    recent = decided_in_audit(tmp_path / "audit", capacity=4)
    assert len(recent) == 4
    assert ("b", "f0") in recent and ("a", "f4") in recent and ("a", "f2") in recent
    assert ("a", "f0") not in recent  # oldest beyond the capacity
    assert ("a", "late") not in recent  # a refused frame may be sent again and decided


def test_missing_audit_is_empty_and_capacity_is_kept(tmp_path):
    assert len(decided_in_audit(tmp_path / "nothing", 10)) == 0
    recent = RecentIds(capacity=2)
    for key in [("l", "1"), ("l", "2"), ("l", "1"), ("l", "3")]:
        recent.add(key)
    assert ("l", "1") in recent and ("l", "3") in recent and ("l", "2") not in recent
    assert len(recent) == 2


def test_last_decisions_come_back_as_decisions(tmp_path):
    from musc_stream.service.dedupe import last_decisions
    from musc_stream.stream.records import Region

    d = _decision("a", "f9", 1_700_000_100)
    d.is_anomaly, d.threshold, d.regions = True, 0.05, [Region(1, 2, 3, 4, 0.5, 4)]
    with AuditLog(tmp_path / "audit") as audit:
        audit.write_decision(d)
        audit.write_failure(FrameFailure("stale", "waited", "a", "late", 1_700_000_011))
        audit.flush()
    again = last_decisions(tmp_path / "audit")
    assert set(again) == {("a", "f9")}
    back = again[("a", "f9")]
    assert (back.score, back.threshold, back.is_anomaly, back.regions) == (0.1, 0.05, True, d.regions)
    assert abs(back.decided_at - d.decided_at) < 1e-3 and back.heatmap is None
