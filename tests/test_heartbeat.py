"""Heartbeat: rates and p95 per line, and a warning for a line that falls behind."""

from musc_stream.service.heartbeat import Heartbeat


def test_report_rates_p95_and_behind():
    beat = Heartbeat(behind_s=5.0, now=100.0)
    for i in range(20):
        beat.decided("fast", 0.1 + 0.01 * i)
        beat.decided("slow", 8.0)
    beat.dropped("late")
    info, behind = beat.report(110.0, queue_depth=3, held=4)
    assert info.startswith("heartbeat: 4.00 frames/s, queue 3, held in warm-up 4; ")
    assert "fast: 2.00/s p95 0.28 s" in info and "slow: 2.00/s p95 8.00 s" in info
    assert "late: 0.00/s p95 - dropped 1" in info
    assert [w.split(":")[0] for w in behind] == ["line late falls behind", "line slow falls behind"]
    info, behind = beat.report(120.0, queue_depth=0, held=0)  # a new period starts empty
    assert info.endswith("no frames") and behind == []
