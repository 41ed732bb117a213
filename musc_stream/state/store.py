"""Per-line snapshot files on disk: append-only memory segments, checksummed manifests, threshold.

Layout of one line's folder (engine.state_dir_name):

- ``threshold.json``: ``{"line", "threshold"}``, small; rewritten (tmp, fsync, rename) when it changed.
- ``seg-<gen>.bin``: memory rows added since the previous memory snapshot, written once, never
  changed: ``MAGIC``, then ids (int64), timestamps (float64), positions (int32) and one float32
  (n, C) block per feature set, in the manifest's ``sets`` order, little-endian.
- ``manifest-<gen>.json``: format, dims, metadata, RNG state, the live row-id ranges (rows dropped
  by age or cap are simply not in them), and every segment it needs with rows, byte size and sha256.

A memory snapshot is durable once its manifest is renamed into place: its new segment is fsynced
first, the manifest is written to ``.tmp``, fsynced, renamed, the folder fsynced. The previous
manifest and its segments stay one more generation, so a damaged newest snapshot (torn segment,
checksum mismatch, garbage manifest, a row in no segment) is detected at load and the one before
is used; with none intact, load raises SnapshotDamagedError and the engine sets the folder aside.
Segments no manifest needs any more (all their rows dead) are deleted after the rename.

This module only reads and writes; what to write (new rows, compaction, budget) is state/plan.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from musc_stream.durable import fsync_path
from musc_stream.model.memory import MemoryMismatchError, MemoryRows

FORMAT = 2  # the segment format; 1 was PatchMemory.save's single folder
MAGIC = b"MUSCSEG1"
THRESHOLD_FILE = "threshold.json"
LEGACY_MEMORY_DIR = "memory"  # PatchMemory.save's folder (format 1)
_MANIFEST = re.compile(r"^manifest-(\d{8,})\.json(\.tmp)?$")
_SEGMENT = re.compile(r"^seg-(\d{8,})\.bin(\.tmp)?$")
_ROW_META_BYTES = 8 + 8 + 4  # id, timestamp, position


class SnapshotDamagedError(ValueError):
    """No intact memory snapshot in a line's folder (every manifest failed its checks)."""


def row_bytes(dims: Mapping[str, int]) -> int:
    """Bytes one memory row takes in a segment."""
    return _ROW_META_BYTES + 4 * sum(int(d) for d in dims.values())


@dataclass
class Segment:
    """One segment file as a manifest lists it. ``name``, ``bytes`` and ``sha256`` are filled in by
    the writer once the file is on disk; the planner only reads ``seqs``."""

    seqs: np.ndarray  # (n,) int64 ids of the rows it holds, ascending
    name: str | None = None
    bytes: int | None = None
    sha256: str | None = None


@dataclass
class MemoryPart:
    """The memory half of a snapshot job: the manifest to write and, when rows were added since
    the last one (or on a compaction), the one new segment with them."""

    segments: list[Segment]  # the manifest's list, in id order; ``new`` is among them
    live: list[list[int]]  # [start, end) ranges of live row ids
    next_seq: int
    rng_state: dict[str, Any]
    dims: dict[str, int]
    metadata: dict[str, Any]
    new: Segment | None = None
    rows: MemoryRows | None = None  # the rows of ``new`` (copies, owned by the job)


@dataclass
class SnapshotJob:
    """What one snapshot writes for one line; built on the scoring thread, written anywhere."""

    line: str
    directory: Path
    threshold: str | None = None  # threshold.json text, when it changed
    memory: MemoryPart | None = None
    on_failure: Any = None  # called when writing fails (the planner then rewrites in full)


@dataclass
class LoadedMemory:
    """A memory snapshot read back: rows of the live set, and what the planner needs to go on."""

    rows: MemoryRows
    segments: list[Segment]
    next_seq: int
    rng_state: dict[str, Any] | None
    generation: int
    written_at: float | None
    damaged: list[str] = field(default_factory=list)  # newer manifests that failed, with the reason


class SnapshotStore:
    """Writes and reads line folders. ``write`` is called by one thread at a time per folder (the
    background writer, or the caller at shutdown); it remembers, per folder, the manifest last
    written or loaded, whose files it keeps one more generation."""

    def __init__(self) -> None:
        self._previous: dict[Path, tuple[int, frozenset[str]]] = {}
        self.bytes_written = 0  # every byte this store wrote, all lines (benchmarks, metrics)

    def forget(self, directory: Path) -> None:
        """The folder was deleted (line reset) or dropped: the next write keeps nothing of it."""
        self._previous.pop(Path(directory), None)

    # -- writing -------------------------------------------------------------------------------

    def write(self, job: SnapshotJob) -> int:
        """Write one job; returns the bytes written. Raises on any I/O error (the caller counts it)."""
        directory = Path(job.directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = 0
        if job.memory is not None:
            written += self._write_memory(job, directory)
        if job.threshold is not None:
            written += _write_atomic(directory / THRESHOLD_FILE, job.threshold.encode("utf-8"))
        self.bytes_written += written
        return written

    def _write_memory(self, job: SnapshotJob, directory: Path) -> int:
        part = job.memory
        generation = max(_generations(directory), default=0) + 1
        written = 0
        if part.new is not None:
            part.new.name = f"seg-{generation:08d}.bin"
            part.new.bytes, part.new.sha256 = _write_segment(directory / part.new.name, part.rows, list(part.dims))
            written += part.new.bytes
            part.rows = None  # the copies are on disk: free them now
        missing = [s for s in part.segments if s.sha256 is None or s.name is None]
        if missing:
            raise RuntimeError(f"line {job.line}: {len(missing)} segment(s) of this snapshot were never written "
                               "(an earlier write failed); the next snapshot rewrites the memory in full")
        manifest = {
            "format": FORMAT, "line": job.line, "generation": generation, "written_at": time.time(),
            "dims": part.dims, "sets": list(part.dims), "metadata": part.metadata, "rng_state": part.rng_state,
            "next_seq": int(part.next_seq), "num_live": int(sum(b - a for a, b in part.live)), "live": part.live,
            "segments": [{"file": s.name, "rows": int(s.seqs.shape[0]), "bytes": s.bytes, "sha256": s.sha256,
                          "first": int(s.seqs[0]), "last": int(s.seqs[-1]),
                          "dead": int(s.seqs.shape[0]) - _count_live(s.seqs, part.live)}
                         for s in part.segments],
        }
        written += _write_atomic(directory / f"manifest-{generation:08d}.json",
                                 json.dumps(manifest, separators=(",", ":")).encode("utf-8"))
        previous = self._previous.get(directory)
        keep_files = {s.name for s in part.segments} | (set(previous[1]) if previous else set())
        keep_generations = {generation} | ({previous[0]} if previous else set())
        for path in directory.iterdir():
            seg, man = _SEGMENT.match(path.name), _MANIFEST.match(path.name)
            if (seg and path.name not in keep_files) or (man and (man.group(2) or int(man.group(1)) not in keep_generations)):
                path.unlink(missing_ok=True)
        for legacy in (LEGACY_MEMORY_DIR, LEGACY_MEMORY_DIR + ".old", LEGACY_MEMORY_DIR + ".tmp"):
            if (directory / legacy).is_dir():  # superseded by the manifest just written
                shutil.rmtree(directory / legacy, ignore_errors=True)
        self._previous[directory] = (generation, frozenset(s.name for s in part.segments))
        return written

    # -- reading -------------------------------------------------------------------------------

    def has_memory(self, directory: Path) -> bool:
        return any(True for _ in _generations(Path(directory)))

    def load(self, directory: Path, dims: Mapping[str, int], metadata: Mapping[str, Any]) -> LoadedMemory | None:
        """The newest intact memory snapshot of a folder; None when it has no manifest at all.

        A manifest made for other features raises MemoryMismatchError; when every manifest is
        damaged, SnapshotDamagedError lists why each failed."""
        directory = Path(directory)
        problems = []
        for generation in sorted(_generations(directory), reverse=True):
            try:
                loaded = _read_generation(directory, generation, dims, metadata)
            except MemoryMismatchError:
                raise
            except Exception as exc:  # noqa: BLE001 - any damage: try the previous generation
                problems.append(f"manifest-{generation:08d}: {type(exc).__name__}: {exc}")
                continue
            loaded.damaged = problems
            self._previous[directory] = (generation, frozenset(s.name for s in loaded.segments))
            return loaded
        if problems:
            raise SnapshotDamagedError("no intact memory snapshot (" + "; ".join(problems) + ")")
        return None


def _generations(directory: Path):
    """Generations of the complete manifests in a folder (a leftover .tmp is not one)."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        match = _MANIFEST.match(path.name)
        if match and not match.group(2):
            yield int(match.group(1))


def _count_live(seqs: np.ndarray, live: list[list[int]]) -> int:
    return int(_live_mask(seqs, live).sum())


def _live_mask(seqs: np.ndarray, live: list[list[int]]) -> np.ndarray:
    """True where a row id lies in one of the [start, end) ranges (ranges ascending, disjoint)."""
    if not live or seqs.size == 0:
        return np.zeros(seqs.shape[0], dtype=bool)
    ranges = np.asarray(live, dtype=np.int64).reshape(-1, 2)
    i = np.searchsorted(ranges[:, 0], seqs, side="right") - 1
    ok = i >= 0
    mask = np.zeros(seqs.shape[0], dtype=bool)
    mask[ok] = seqs[ok] < ranges[i[ok], 1]
    return mask


def _write_segment(path: Path, rows: MemoryRows, sets: list[str]) -> tuple[int, str]:
    """Write rows to a new segment file and fsync it; returns (bytes, sha256)."""
    digest = hashlib.sha256()
    size = 0
    blocks = [np.frombuffer(MAGIC, np.uint8), rows.seqs.astype("<i8"), rows.timestamps.astype("<f8"),
              rows.positions.astype("<i4")] + [np.ascontiguousarray(rows.vectors[k], dtype="<f4") for k in sets]
    with open(path, "wb") as f:
        for block in blocks:
            view = memoryview(np.ascontiguousarray(block)).cast("B")
            f.write(view)
            digest.update(view)
            size += view.nbytes
        f.flush()
        os.fsync(f.fileno())
    return size, digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> int:
    """tmp, fsync, rename, fsync the folder: the file is either the old one or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
    return len(data)


def _read_generation(directory: Path, generation: int, dims: Mapping[str, int],
                     metadata: Mapping[str, Any]) -> LoadedMemory:
    manifest = json.loads((directory / f"manifest-{generation:08d}.json").read_text())
    if not isinstance(manifest, dict):
        raise ValueError("manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise MemoryMismatchError(f"memory in {directory}: format {manifest.get('format')!r} != {FORMAT}")
    want_dims = {k: int(v) for k, v in dims.items()}
    want_meta = json.loads(json.dumps(dict(metadata), sort_keys=True))
    problems = []
    if manifest.get("dims") != want_dims:
        problems.append(f"dims {manifest.get('dims')!r} != {want_dims!r}")
    saved = manifest.get("metadata") if isinstance(manifest.get("metadata"), dict) else {}
    for key in sorted(set(saved) | set(want_meta)):
        if saved.get(key, "<missing>") != want_meta.get(key, "<missing>"):
            problems.append(f"{key}: saved {saved.get(key, '<missing>')!r}, expected {want_meta.get(key, '<missing>')!r}")
    if problems:
        raise MemoryMismatchError(f"memory in {directory} does not match: " + "; ".join(problems))
    sets = list(manifest["sets"])
    if set(sets) != set(want_dims):
        raise ValueError(f"sets {sets} do not match dims")
    live = [[int(a), int(b)] for a, b in manifest["live"]]
    if any(b <= a for a, b in live) or any(live[i][1] > live[i + 1][0] for i in range(len(live) - 1)):
        raise ValueError("live ranges are not ascending and disjoint")
    width = row_bytes(want_dims)
    parts: list[MemoryRows] = []
    segments = []
    for entry in manifest["segments"]:
        name = str(entry["file"])
        if not _SEGMENT.match(name) or name.endswith(".tmp"):
            raise ValueError(f"bad segment name {name!r}")
        data = (directory / name).read_bytes()
        if len(data) != int(entry["bytes"]):
            raise ValueError(f"{name}: {len(data)} bytes, the manifest says {entry['bytes']} (torn write?)")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"{name}: sha256 does not match the manifest")
        n, rest = divmod(len(data) - len(MAGIC), width)
        if not data.startswith(MAGIC) or rest or n != int(entry["rows"]):
            raise ValueError(f"{name}: not a segment of {entry['rows']} rows of {width} bytes")
        rows = _decode(data, n, sets, want_dims)
        if n and np.any(np.diff(rows.seqs) <= 0):
            raise ValueError(f"{name}: row ids do not ascend")
        segments.append(Segment(rows.seqs, name, len(data), entry["sha256"]))
        mask = _live_mask(rows.seqs, live)
        parts.append(MemoryRows(rows.seqs[mask], rows.timestamps[mask], rows.positions[mask],
                                {k: v[mask] for k, v in rows.vectors.items()}))
    seqs = np.concatenate([p.seqs for p in parts]) if parts else np.empty(0, np.int64)
    num_live = int(sum(b - a for a, b in live))
    if seqs.shape[0] != num_live or int(manifest["num_live"]) != num_live:
        raise ValueError(f"{seqs.shape[0]} live rows found in the segments, the manifest lists {num_live} "
                         "(a segment is missing from it)")
    if seqs.size and (np.any(np.diff(seqs) <= 0) or int(seqs[-1]) >= int(manifest["next_seq"])):
        raise ValueError("segments overlap or row ids exceed next_seq")
    rows = MemoryRows(seqs,
                      np.concatenate([p.timestamps for p in parts]) if parts else np.empty(0, np.float64),
                      np.concatenate([p.positions for p in parts]) if parts else np.empty(0, np.int32),
                      {k: (np.concatenate([p.vectors[k] for p in parts]) if parts
                           else np.empty((0, want_dims[k]), np.float32)) for k in want_dims})
    return LoadedMemory(rows, segments, int(manifest["next_seq"]), manifest.get("rng_state"), generation,
                        manifest.get("written_at"))


def _decode(data: bytes, n: int, sets: list[str], dims: Mapping[str, int]) -> MemoryRows:
    offset = len(MAGIC)

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal offset
        out = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        offset += out.nbytes
        return out

    seqs = take("<i8", n).astype(np.int64)
    timestamps = take("<f8", n).astype(np.float64)
    positions = take("<i4", n).astype(np.int32)
    vectors = {k: take("<f4", n * int(dims[k])).reshape(n, int(dims[k])).astype(np.float32) for k in sets}
    return MemoryRows(seqs, timestamps, positions, vectors)
