"""Bytes one line's snapshots write per simulated day, before (PatchMemory.save of the whole memory
every snapshot_interval_s, the old periodic snapshot) and after (state_plan + state_store, default
budget), at 0.2, 1 and 5 frames/s. No backbone: real PatchMemory, AdaptiveThreshold, LinePlan and
SnapshotStore with random unit features of ViT-S width (384, 4 sets), a fake clock, real files.

To stay a few minutes long, each 60 s tick adds the tick's patches at once (rate x 60 frames x
256 patches, at most the cap: rows beyond it would be dropped before any snapshot sees them).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_snapshot_bytes.py [--hours 24] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, environment_lines  # noqa: E402

from musc_stream.model.memory import PatchMemory  # noqa: E402
from musc_stream.state.plan import LinePlan, SnapshotBudget, threshold_text  # noqa: E402
from musc_stream.state.store import SnapshotStore  # noqa: E402
from musc_stream.stream.threshold import AdaptiveThreshold  # noqa: E402

DIMS = {f"l{i}_r3": 384 for i in range(4)}
CAP, PER_FRAME, TICK_S, BUDGET = 20_000, 256, 60.0, 1024 ** 3
META = {"backbone": "vit_small_patch14_dinov2", "image_size": 224}


def _pool(rng, n):
    out = {}
    for key, dim in DIMS.items():
        x = rng.standard_normal((n, dim), dtype=np.float32)
        out[key] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _write_bytes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def simulate(rate: float, hours: float, folder: Path, pool) -> dict:
    rows_per_tick = min(CAP, int(round(rate * TICK_S * PER_FRAME)))
    memory = PatchMemory(DIMS, max_patches=CAP, patches_per_frame=rows_per_tick, max_age_s=3600.0,
                         use_gpu=False, metadata=META)
    threshold = AdaptiveThreshold()
    rng = np.random.default_rng(1)
    start = 1_000_000.0
    plan = LinePlan("line-1", folder / "line-1", SnapshotBudget(BUDGET, capacity=1 << 20, now=start))
    store = SnapshotStore()
    ticks = int(hours * 3600 / TICK_S)
    memory_writes = 0
    io_before = _write_bytes()
    started = time.perf_counter()
    for tick in range(1, ticks + 1):
        now = start + tick * TICK_S
        offset = int(rng.integers(0, pool["l0_r3"].shape[0] - rows_per_tick))
        memory.add({k: v[offset:offset + rows_per_tick] for k, v in pool.items()}, now)
        memory.expire(now, keep_newest=16 * PER_FRAME)
        for score in rng.normal(0.3, 0.02, size=min(20, max(1, int(rate * TICK_S)))):
            threshold.update(float(score), False)
        job = plan.plan(threshold_text("line-1", threshold.state_dict()), memory, now, force=False)
        if job is not None:
            memory_writes += job.memory is not None
            store.write(job)
    io_after = _write_bytes()
    # Before: the whole memory (PatchMemory.save) and threshold.json at every tick.
    probe = folder / "before"
    memory.save(probe / "memory")
    save_bytes = sum(p.stat().st_size for p in (probe / "memory").iterdir())
    threshold_bytes = len(json.dumps({"line": "line-1", "threshold": threshold.state_dict()}))
    shutil.rmtree(probe)
    day = 86_400 / (ticks * TICK_S)
    return {"frames_per_s": rate, "simulated_h": hours, "memory_writes": memory_writes,
            "after_bytes_per_day": store.bytes_written * day,
            "after_proc_io_bytes_per_day": None if io_before is None or io_after is None
            else (io_after - io_before) * day,
            "before_bytes_per_day": (save_bytes + threshold_bytes) * (86_400 / TICK_S),
            "full_memory_bytes": save_bytes, "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.2, 1.0, 5.0])
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temp folder)")
    args = parser.parse_args()
    pool = _pool(np.random.default_rng(0), 2 * CAP)
    rows = []
    for rate in args.rates:
        folder = Path(tempfile.mkdtemp(prefix="snapbench-", dir=args.dir))
        try:
            rows.append(simulate(rate, args.hours, folder, pool))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(json.dumps(rows[-1]))
    gib = 1024 ** 3
    env = environment()
    lines = ["# Snapshot bytes written per line per day", "",
             *environment_lines(env), f"- machine: {platform.node()}",
             f"- command: `PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_snapshot_bytes.py --hours {args.hours:g}`",
             "", "One line, ViT-S width (4 sets x 384), memory cap 20 000 patches, 256 patches per frame, "
             "snapshot tick 60 s, default budget state.max_snapshot_bytes_per_day = 1 GiB; simulated with a "
             "fake clock (bytes scaled to 24 h when fewer hours were simulated). before: the old snapshot "
             "(PatchMemory.save of the whole memory + threshold.json every 60 s). after: bytes the store "
             "wrote (segments, manifests, threshold.json); /proc: write_bytes of the process over the run "
             "(page-cache writeback, so it can lag or read 0 in a container).", "",
             "| frames/s | before GiB/day | after GiB/day | after (/proc) GiB/day | memory snapshots/day | full memory MiB |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        proc = r["after_proc_io_bytes_per_day"]
        lines.append(f"| {r['frames_per_s']:g} | {r['before_bytes_per_day'] / gib:.1f} | "
                     f"{r['after_bytes_per_day'] / gib:.3f} | {'n/a' if proc is None else f'{proc / gib:.3f}'} | "
                     f"{r['memory_writes'] * 24 / r['simulated_h']:.1f} | {r['full_memory_bytes'] / 2 ** 20:.0f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "snapshot_bytes.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "snapshot_bytes.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
