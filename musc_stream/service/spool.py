"""Durable spool of frames the engine holds in warm-up, so they can be acked without being lost.

Why: a line's first frames wait (unscored) until ``min_references`` exist. Held unacked, they
count against the broker's in-flight quota (Mosquitto's default ``max_inflight_messages 20``):
4 lines in warm-up at 5 frames fill it and nothing more is delivered, so no line ever warms up.
Spooled first (decoded pixels + metadata, fsynced), a held frame is safe to ack: a crash or a
restart feeds it back to the engine from here. A spool file is deleted once the frame's decision
(or failure) is durable in the audit.

One file per frame, ``<dir>/<seq>-<key>.frame``: a JSON header (line, frame_id, times, shape),
the raw RGB bytes, and a SHA-256 of both, written to ``.tmp``, fsynced, renamed, directory
fsynced. A file whose checksum does not match (torn or damaged) is set aside as ``.bad`` with a
warning: the broker acknowledged that frame already, so it is reported, never silently scored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musc_stream.durable import fsync_path
from musc_stream.stream.records import Frame

logger = logging.getLogger(__name__)

_MAGIC = b"MUSCSPL1"
_SUFFIX = ".frame"


@dataclass
class SpooledFrame:
    """A frame read back from the spool, with the file to delete once it is decided."""

    frame: Frame
    path: Path


class SpoolError(ValueError):
    """A spool file that cannot be read back (torn, damaged, or from another format)."""


class FrameSpool:
    """Write, list and delete spooled frames under one directory (owned by one service)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seq = max((_seq_of(p) for p in self.directory.glob(f"*{_SUFFIX}")), default=0)
        for tmp in self.directory.glob("*.tmp"):
            logger.warning("removing leftover spool file %s (a previous run died mid-write)", tmp)
            tmp.unlink(missing_ok=True)

    def write(self, frame: Frame) -> Path:
        """Make ``frame`` durable; returns its file. Raises OSError when the disk refuses."""
        self._seq += 1
        key = hashlib.sha256(f"{frame.line}\0{frame.frame_id}".encode("utf-8", "surrogatepass")).hexdigest()[:16]
        path = self.directory / f"{self._seq:012d}-{key}{_SUFFIX}"
        image = np.ascontiguousarray(frame.image, dtype=np.uint8)
        header = json.dumps({
            "line": frame.line, "frame_id": frame.frame_id, "ts": frame.ts, "received_at": frame.received_at,
            "camera": frame.camera, "payload_bytes": frame.payload_bytes, "decode_s": frame.decode_s,
            "shape": list(image.shape),
        }, ensure_ascii=True).encode()
        body = len(header).to_bytes(4, "big") + header + image.tobytes()
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(_MAGIC + hashlib.sha256(body).digest() + body)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(self.directory)
        return path

    def load(self) -> list[SpooledFrame]:
        """Every readable spooled frame, oldest first; unreadable files are renamed ``.bad``."""
        out = []
        for path in sorted(self.directory.glob(f"*{_SUFFIX}"), key=_seq_of):
            try:
                out.append(SpooledFrame(read_frame(path), path))
            except (SpoolError, OSError) as exc:
                bad = path.with_name(path.name + ".bad")
                logger.warning("spooled frame %s unreadable (%s); set aside as %s", path.name, exc, bad.name)
                os.replace(path, bad)
        return out

    def delete(self, path: Path) -> None:
        """Forget a frame whose decision is durable elsewhere (no fsync: a leftover is deduped)."""
        path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob(f"*{_SUFFIX}"))


def read_frame(path: Path) -> Frame:
    data = path.read_bytes()
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 36:
        raise SpoolError("not a spool file")
    digest, body = data[len(_MAGIC):len(_MAGIC) + 32], data[len(_MAGIC) + 32:]
    if hashlib.sha256(body).digest() != digest:
        raise SpoolError("checksum mismatch (torn or damaged file)")
    size = int.from_bytes(body[:4], "big")
    meta = json.loads(body[4:4 + size])
    shape = tuple(meta["shape"])
    image = np.frombuffer(body[4 + size:], dtype=np.uint8)
    if image.size != int(np.prod(shape)):
        raise SpoolError(f"{image.size} pixel bytes for shape {shape}")
    return Frame(line=meta["line"], frame_id=meta["frame_id"], ts=meta["ts"], image=image.reshape(shape).copy(),
                 received_at=meta["received_at"], camera=meta["camera"], payload_bytes=meta["payload_bytes"],
                 decode_s=meta["decode_s"])


def _seq_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[0])
    except ValueError:
        return 0
