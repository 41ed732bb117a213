"""Per-line rates and latency percentiles for the periodic heartbeat log line.

Why: an operator reading the journal must see at once that the service is alive and keeping up
(frames/s, queue depth, p95 end-to-end latency per line) and which line falls behind. Pure
bookkeeping; the service decides when to log.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class _LinePeriod:
    latencies: list[float] = field(default_factory=list)
    dropped: int = 0  # stale or refused in this period


class Heartbeat:
    """Collects decisions and drops per line between two ``report`` calls."""

    def __init__(self, behind_s: float, now: float):
        self.behind_s = behind_s  # p95 end-to-end latency above this, or any stale drop: behind
        self._since = now
        self._lines: dict[str, _LinePeriod] = {}

    def decided(self, line: str, latency_s: float) -> None:
        self._lines.setdefault(line, _LinePeriod()).latencies.append(latency_s)

    def dropped(self, line: str | None) -> None:
        if line:
            self._lines.setdefault(line, _LinePeriod()).dropped += 1

    def report(self, now: float, queue_depth: int, held: int) -> tuple[str, list[str]]:
        """(the INFO line, one WARNING line per line that fell behind), and start a new period."""
        span = max(1e-9, now - self._since)
        total = sum(len(p.latencies) for p in self._lines.values())
        parts, behind = [], []
        for line in sorted(self._lines):
            period = self._lines[line]
            p95 = float(np.percentile(period.latencies, 95)) if period.latencies else None
            text = f"{line}: {len(period.latencies) / span:.2f}/s"
            text += f" p95 {p95:.2f} s" if p95 is not None else " p95 -"
            if period.dropped:
                text += f" dropped {period.dropped}"
            parts.append(text)
            if period.dropped or (p95 is not None and p95 > self.behind_s):
                behind.append(
                    f"line {line} falls behind: p95 latency {'-' if p95 is None else f'{p95:.1f} s'} "
                    f"(limit {self.behind_s:.1f} s), {period.dropped} frame(s) dropped in the last {span:.0f} s; "
                    "the service gets more frames than it can score (add a worker or a GPU, or lower fps)")
        info = (f"heartbeat: {total / span:.2f} frames/s, queue {queue_depth}, held in warm-up {held}; "
                + ("; ".join(parts) if parts else "no frames"))
        self._since = now
        self._lines = {}
        return info, behind
