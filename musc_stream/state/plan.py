"""What each line's snapshot writes, and when: only what changed, within a daily byte budget.

Runs on the scoring thread (it reads the line's memory, which that thread owns) and only decides
and copies; state/store.py does the I/O. Per line:

- Nothing changed since the last snapshot: nothing is written (0 bytes).
- The threshold history changed: threshold.json (about 20 KB) is written at every snapshot tick.
- The memory changed: a new segment with the rows added since the last memory snapshot plus a
  manifest of the live rows. Segments whose rows have all been dropped (age, cap) leave the
  manifest; when dead rows would exceed half of the rows stored, the live rows are rewritten as
  one segment instead (compaction). A failed write makes the next one a full rewrite.
- Budget: a token bucket per line filling at ``bytes_per_day`` / 86 400 s, holding at most one full
  memory (so a line that was quiet cannot burst). Threshold writes always happen and spend from it;
  the memory part waits until the bucket holds its size. So a line writes at most ``bytes_per_day``
  per day plus one memory's worth, whatever its frame rate. Forced snapshots (clean stop, idle
  eviction) write what changed regardless and leave the bucket in debt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from musc_stream.model.memory import PatchMemory
from musc_stream.state.store import LoadedMemory, MemoryPart, Segment, SnapshotJob, row_bytes

DAY_S = 86_400.0
_MANIFEST_BYTES = 4096  # estimate of a manifest's size (RNG state, settings, a few segments)
_SLACK_BYTES = 1 << 20  # room in the bucket for threshold writes on top of one full memory


class SnapshotBudget:
    """Token bucket of snapshot bytes: ``bytes_per_day`` spread evenly, at most ``capacity`` saved up.
    Starts empty, so a restart grants no extra bytes."""

    def __init__(self, bytes_per_day: float, capacity: float, now: float) -> None:
        self.rate = float(bytes_per_day) / DAY_S
        self.capacity = float(capacity)
        self.tokens = 0.0
        self._at = float(now)

    def _fill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + self.rate * max(0.0, float(now) - self._at))
        self._at = max(self._at, float(now))

    def affords(self, size: int, now: float) -> bool:
        self._fill(now)
        return self.tokens >= size

    def spend(self, size: int, now: float) -> None:
        """Take ``size`` bytes, into debt if need be (forced writes, the small threshold file)."""
        self._fill(now)
        self.tokens -= size


def threshold_text(line: str, threshold_state: Mapping[str, Any]) -> str:
    return json.dumps({"line": line, "threshold": threshold_state}, separators=(",", ":"))


@dataclass
class _Cost:
    part: MemoryPart
    bytes: int


class LinePlan:
    """Bookkeeping of one line's snapshots: the segments on disk (as planned), the last threshold
    text and memory version written, and its budget. Only the scoring thread calls ``plan``; the
    writer only sets ``needs_full`` when a write failed."""

    def __init__(self, line: str, directory: Path, budget: SnapshotBudget,
                 loaded: LoadedMemory | None = None, threshold: str | None = None,
                 memory: PatchMemory | None = None) -> None:
        self.line = line
        self.directory = directory
        self.budget = budget
        self.segments: list[Segment] = list(loaded.segments) if loaded is not None else []
        self.sent_seq = int(max((s.seqs[-1] for s in self.segments if s.seqs.size), default=-1))
        self.threshold = threshold  # text last handed to the writer
        self.memory_version = memory.version if (memory is not None and loaded is not None) else None
        self.needs_full = False

    def failed(self) -> None:
        """A write of this line failed: what is on disk is uncertain, so rewrite the memory in full."""
        self.needs_full = True
        self.memory_version = None
        self.threshold = None

    def plan(self, threshold: str, memory: PatchMemory | None, now: float, force: bool) -> SnapshotJob | None:
        """The job for this snapshot, or None when nothing changed (or nothing is affordable yet)."""
        job = SnapshotJob(self.line, self.directory, on_failure=self.failed)
        if threshold != self.threshold:
            job.threshold = threshold
            self.budget.spend(len(threshold), now)
        if memory is not None:  # the bucket holds one full memory and a little more, never less
            self.budget.capacity = max(self.budget.capacity, full_memory_bytes(memory.dims, memory.max_patches))
        if memory is not None and memory.version != self.memory_version:
            cost = self._memory_part(memory)
            if force or self.budget.affords(cost.bytes, now):
                self.budget.spend(cost.bytes, now)
                job.memory = cost.part
                self._commit(cost.part, memory)
        if job.threshold is None and job.memory is None:
            return None
        self.threshold = threshold
        return job

    def _memory_part(self, memory: PatchMemory) -> _Cost:
        """New rows since the last memory snapshot, or all live rows when compacting."""
        live_seqs = np.asarray(memory.seqs)
        live = _ranges(live_seqs)
        kept, dead, stored = [], 0, 0
        for segment in self.segments:
            alive = int(np.isin(segment.seqs, live_seqs, assume_unique=True).sum())
            if alive == 0:
                continue  # every row dropped: the segment leaves the manifest and is deleted
            kept.append(segment)
            dead += segment.seqs.shape[0] - alive
            stored += segment.seqs.shape[0]
        fresh = int(live_seqs.shape[0] - np.searchsorted(live_seqs, self.sent_seq, side="right"))
        full = self.needs_full or 2 * dead > stored + fresh
        rows = memory.export_rows(-1 if full else self.sent_seq) if (full or fresh) else None
        segments = [] if full else kept
        new = None
        if rows is not None and len(rows):
            new = Segment(rows.seqs)
            segments = segments + [new]
        else:
            rows = None
        part = MemoryPart(segments=segments, live=live, next_seq=memory.next_seq, rng_state=memory.rng_state,
                          dims=memory.dims, metadata=memory.metadata, new=new, rows=rows)
        size = _MANIFEST_BYTES + 16 * len(live) + (row_bytes(memory.dims) * len(rows) if rows is not None else 0)
        return _Cost(part, size)

    def _commit(self, part: MemoryPart, memory: PatchMemory) -> None:
        self.segments = list(part.segments)
        if part.new is not None:
            self.sent_seq = int(part.new.seqs[-1])
        self.memory_version = memory.version
        self.needs_full = False


def full_memory_bytes(dims: Mapping[str, int], max_patches: int) -> int:
    """Bytes of one full memory in segments: the budget's bucket size."""
    return row_bytes(dims) * int(max_patches) + _MANIFEST_BYTES + _SLACK_BYTES


def _ranges(seqs: np.ndarray) -> list[list[int]]:
    """Ascending ids as [start, end) ranges of consecutive ids."""
    if seqs.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(seqs) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [seqs.size - 1]])
    return [[int(seqs[a]), int(seqs[b]) + 1] for a, b in zip(starts, ends)]
