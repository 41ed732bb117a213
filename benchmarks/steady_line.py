"""One line of real MT_Free (exp1) JPEGs decoded as the service decodes them, and run through an
engine until it is steady (window full and, when the memory scores, the memory at its cap): what
the timing benchmarks (bench_profile, bench_cost) measure from."""

from __future__ import annotations

from pathlib import Path

from common import DATA

from musc_stream.service.frames import decode_frame, frame_user_properties
from musc_stream.stream.engine import Engine
from musc_stream.stream.records import Frame

LINE = "p"  # the line id of topic line/p/frames


def exp1_payloads(root: Path = DATA) -> list[bytes]:
    return [f.read_bytes() for f in sorted((root / "MT_Free" / "Imgs").glob("exp1_*.jpg"))]


def decoded_frames(payloads: list[bytes], settings, start: int, n: int) -> list[Frame]:
    """Frames start … start+n−1 of the line (payloads repeat), frame ids f<i>."""
    props = frame_user_properties("x", None)
    return [decode_frame(f"line/{LINE}/frames", payloads[i % len(payloads)], dict(props, frame_id=f"f{i}"),
                         settings.frames, "line") for i in range(start, start + n)]


def run_to_steady(engine: Engine, payloads: list[bytes], batch: int, limit: int = 2000) -> int:
    """Feed micro-batches until the line is steady; returns the frames fed."""
    memory_on = engine.settings.memory_scores
    cap = engine.settings.memory.max_patches_per_line
    fed = 0
    while True:
        engine.process(decoded_frames(payloads, engine.settings, fed, batch))
        fed += batch
        state = engine.lines[LINE]
        if state.window.full and (not memory_on or state.memory_size >= cap):
            return fed
        if fed > limit:
            raise RuntimeError(f"the line did not reach steady state in {limit} frames")
