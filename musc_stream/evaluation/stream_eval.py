"""Stream evaluation in the operator's terms: lines of one camera set-up replayed through the engine.

A real line has one camera set-up, so each evaluated line holds the frames of one set-up only (the
``exp1``…``exp6`` file-name prefixes of magnetic tiles; a category for MVTec, whose normals come
from ``train/good`` when it exists). Defects are mixed in at exactly the requested rate after a
normal head of ``window_size`` frames (a line starts on good parts). Every line is replayed through
the same ``Engine`` the service runs, and reported as an operator sees it: recall and false alarms
per 1,000 normal frames at the engine's own threshold, beside AUROC, the best recall a fixed
threshold reaches at the same false-alarm rate, and false alarms per 1,000 at 100 % recall.
A changeover run appends another set-up's frames to a line unannounced and counts the alerts.

This module computes; ``cli.py`` and ``benchmarks/`` write the files.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from musc_stream.evaluation.datasets import Sample, camera_setup, discover, load_image, load_mask
from musc_stream.evaluation.quality_metrics import image_metrics, pixel_metrics
from musc_stream.model.backbone import Backbone, Features
from musc_stream.model.musc import MuscSettings, musc_from_tokens
from musc_stream.service.config import Settings, settings_with
from musc_stream.stream.engine import Engine
from musc_stream.stream.records import Frame

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)
CHANGEOVER_FRAMES = 30  # alerts are counted over this many frames after an unannounced change


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class StreamLine:
    """One evaluated line: the frames of one camera set-up in stream order."""

    name: str
    samples: tuple[Sample, ...]

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)


def _train_good(root: Path, category: str) -> list[Sample]:
    """MVTec-layout normals of ``<category>/train/good`` (the stream's normal frames when present)."""
    for folder in (root / category / "train" / "good", root / "train" / "good"):
        if folder.is_dir() and (folder.parent.parent.name == category or folder.parent.parent == root):
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
            return [Sample(p, 0, "good", None, category) for p in files]
    return []


def build_lines(root: Path, n_frames: int = 200, anomaly_rate: float = 0.1, seed: int = 42,
                head: int = 16, setups: Sequence[str] | None = None,
                categories: Sequence[str] | None = None) -> list[StreamLine]:
    """One line per camera set-up, ``n_frames`` long when the set-up has enough normals.

    The number of defects is exactly round(n · rate) for the n frames a line gets; a set-up with fewer
    normals than n·(1−rate) gets a shorter line with the same rate (the report states each length).
    """
    if not 0 <= anomaly_rate < 1:
        raise ValueError(f"anomaly_rate must be in [0, 1), got {anomaly_rate}")
    found = discover(root)
    if categories:
        unknown = sorted(set(categories) - set(found))
        if unknown:
            raise ValueError(f"unknown categories {unknown}; found {sorted(found)}")
        found = {c: found[c] for c in categories}
    lines = []
    for category, samples in sorted(found.items()):
        train = _train_good(Path(root), category)
        groups: dict[str, list[Sample]] = {}
        for s in samples:
            if train and s.label == 0:
                continue  # normals come from train/good when the layout has it
            groups.setdefault(camera_setup(s), []).append(s)
        if train:
            groups.setdefault(category, []).extend(train)
        for setup, group in sorted(groups.items()):
            if setups and setup not in setups:
                continue
            line = _one_line(group, n_frames, anomaly_rate, seed, head)
            if line:
                name = setup if setup == category else f"{category}/{setup}" if len(found) > 1 else setup
                lines.append(StreamLine(name, tuple(line)))
    if setups:
        missing = sorted(set(setups) - {ln.name.split("/")[-1] for ln in lines})
        if missing:
            raise ValueError(f"unknown camera set-ups {missing}")
    return lines


def _one_line(group: list[Sample], n_frames: int, rate: float, seed: int, head: int) -> list[Sample]:
    rng = random.Random(f"{seed}:{group[0].category}:{camera_setup(group[0])}")
    normals = sorted((s for s in group if s.label == 0), key=lambda s: str(s.path))
    defects = sorted((s for s in group if s.label == 1), key=lambda s: str(s.path))
    n = n_frames
    n = min(n, int(len(normals) / (1 - rate)) if rate < 1 else n)
    if rate > 0:
        n = min(n, int(len(defects) / rate))
    n_defects = round(n * rate)
    n_normals = n - n_defects
    if n_normals <= head or (rate > 0 and n_defects == 0):
        return []
    chosen_normals = rng.sample(normals, n_normals)
    chosen_defects = _stratified(defects, n_defects, rng)
    tail = chosen_normals[head:] + chosen_defects
    rng.shuffle(tail)
    return chosen_normals[:head] + tail


def _stratified(defects: list[Sample], k: int, rng: random.Random) -> list[Sample]:
    """k defects spread over the defect types (round robin over shuffled types), seeded."""
    by_type: dict[str, list[Sample]] = {}
    for s in defects:
        by_type.setdefault(s.defect_type, []).append(s)
    for items in by_type.values():
        rng.shuffle(items)
    out, types = [], sorted(by_type)
    while len(out) < k:
        for t in types:
            if by_type[t] and len(out) < k:
                out.append(by_type[t].pop())
    return out


def seeded_stream(samples: list[Sample], n_frames: int, anomaly_rate: float, seed: int) -> list[Sample]:
    """The mixed-set-up stream of earlier benchmarks (stream_vs_batch.md, bench_rscin.py's "stream"
    set): normal frames of any set-up with defective ones mixed in at ``anomaly_rate``. Lines of one
    set-up, as a real line is, come from ``build_lines``.

    The first frames of the stream are normal (a line starts on good parts); defects land at
    seeded random positions after the warm-up of 5 frames.
    """
    rng = random.Random(seed)
    normals = [s for s in samples if s.label == 0]
    defects = [s for s in samples if s.label == 1]
    n_defects = min(len(defects), round(n_frames * anomaly_rate))
    n_normals = min(len(normals), n_frames - n_defects)
    chosen_normals = rng.sample(normals, n_normals)
    chosen_defects = rng.sample(defects, n_defects)
    head, tail = chosen_normals[:5], chosen_normals[5:] + chosen_defects
    rng.shuffle(tail)
    return head + tail


class PrecomputedBackbone:
    """Stands in for a Backbone whose features were computed once, so several engine variants can
    replay the same stream without re-running the network. Looks frames up by image identity."""

    def __init__(self, backbone: Backbone, images: Sequence[np.ndarray], features: Features):
        self.spec = backbone.spec
        self.weights_label = backbone.weights_label
        self.image_size = backbone.image_size
        self.layers = backbone.layers
        self.device = backbone.device
        self._row = {id(image): i for i, image in enumerate(images)}
        self._features = features

    def embed(self, images: Sequence[np.ndarray], batch_size: int = 8) -> Features:
        rows = torch.tensor([self._row[id(image)] for image in images])
        return Features(
            patch_tokens=[t[rows] for t in self._features.patch_tokens],
            image_features=self._features.image_features[rows],
            grid=self._features.grid,
        )


def embed_cached(backbone: Backbone, paths: Sequence[Path], images: Sequence[np.ndarray],
                 cache_dir: Path | None, batch_size: int = 8) -> Features:
    """Backbone features of ``images``, read from / written to ``cache_dir`` when given (keyed by
    the model, its weights and the image paths), so benchmark reruns skip the network."""
    if cache_dir is None:
        return backbone.embed(list(images), batch_size=batch_size)
    key = hashlib.sha256("\n".join([backbone.spec.name, backbone.weights_label, str(backbone.image_size),
                                    *map(str, paths)]).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"features-{key}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return Features(patch_tokens=list(saved["patch_tokens"]), image_features=saved["image_features"],
                        grid=tuple(saved["grid"]))
    features = backbone.embed(list(images), batch_size=batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"patch_tokens": features.patch_tokens, "image_features": features.image_features,
                "grid": list(features.grid)}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return features


@dataclass
class ReplayResult:
    """Per-frame outcome of one replay, in stream order."""

    scores: np.ndarray  # (N,) image score
    alerts: np.ndarray  # (N,) bool
    warmup: np.ndarray  # (N,) bool: decided before the line's threshold was warm
    thresholds: np.ndarray  # (N,) threshold in force (nan while undecided)
    changeover: np.ndarray  # (N,) bool: a changeover was detected on this frame
    memory_scored: np.ndarray  # (N,) bool: the memory contributed to the score
    maps: list[np.ndarray] | None  # per frame (h, w) patch map, when asked for


def replay_stream(engine: Engine, images: Sequence[np.ndarray], line: str = "eval",
                  batch_size: int = 1, keep_maps: bool = False, start_s: float = 0.0) -> ReplayResult:
    """Feed frames through ``engine`` in order, one camera second apart on the engine's clock."""
    n = len(images)
    scores, thresholds = np.full(n, np.nan), np.full(n, np.nan)
    alerts, warm, change, mem = (np.zeros(n, bool) for _ in range(4))
    maps: list[np.ndarray | None] = [None] * n
    frames = [Frame(line=line, frame_id=str(i), ts=start_s + i, image=img, received_at=start_s + i)
              for i, img in enumerate(images)]
    clock = _SteppedClock(start_s)
    engine.clock = clock
    for start in range(0, n, batch_size):
        clock.now = start_s + start
        for d in engine.process(frames[start:start + batch_size]):
            i = int(d.frame_id)
            scores[i], alerts[i], warm[i], change[i] = d.score, d.is_anomaly, d.warmup, d.changeover
            thresholds[i] = np.nan if d.threshold is None else d.threshold
            mem[i] = d.memory_score is not None
            if keep_maps:
                maps[i] = d.patch_map
    if np.isnan(scores).any():
        raise RuntimeError(f"{int(np.isnan(scores).sum())} frames were never scored")
    return ReplayResult(scores, alerts, warm, thresholds, change, mem, maps if keep_maps else None)


class _SteppedClock:
    """The service clock during a replay: one second per frame, so age-out behaves as on a line."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def operator_metrics(labels: np.ndarray, scores: np.ndarray, alerts: np.ndarray,
                     counted: np.ndarray) -> dict[str, float]:
    """What the line sees, over the ``counted`` frames (those after the line's warm-up):
    recall and false alarms per 1,000 normal frames at the engine's threshold; the best recall a
    fixed threshold reaches at no more false alarms; false alarms per 1,000 at 100 % recall."""
    y, s, a = labels[counted], scores[counted], alerts[counted]
    normal, defect = y == 0, y == 1
    out = {"frames": int(counted.sum()), "normals": int(normal.sum()), "defects": int(defect.sum())}
    out["recall"] = float(a[defect].mean()) if defect.any() else float("nan")
    fa = int(a[normal].sum())
    out["false_alarms"] = fa
    out["fa_per_1000"] = 1000.0 * fa / max(1, int(normal.sum()))
    if defect.any() and normal.any():
        normal_sorted = np.sort(s[normal])[::-1]
        # A fixed threshold allowing the same number of false alarms: just above the (fa+1)-th normal.
        cut = normal_sorted[fa] if fa < len(normal_sorted) else -np.inf
        out["best_fixed_recall"] = float((s[defect] > cut).mean())
        lowest_defect = s[defect].min()
        out["fa_per_1000_at_full_recall"] = 1000.0 * float((s[normal] >= lowest_defect).mean())
        out.update({f"image_{k}": v for k, v in image_metrics(y, s).items()})
    return out


def changeover_metrics(changeover: np.ndarray, alerts: np.ndarray, change_at: int) -> dict[str, float]:
    """Detection delay (frames after the change, None if never) and alerts in the next 30 frames."""
    after = np.flatnonzero(changeover[change_at:])
    window = alerts[change_at:change_at + CHANGEOVER_FRAMES]
    return {"detected_after_frames": int(after[0]) + 1 if after.size else None,
            "alerts_in_30": int(window.sum()), "frames_counted": int(window.size)}


def run_stream_eval(
    root: Path,
    backbone: Backbone,
    settings: Settings | None = None,
    n_frames: int = 200,
    anomaly_rate: float = 0.1,
    seed: int = 42,
    modes: Sequence[str] = ("window", "memory", "combined"),
    setups: Sequence[str] | None = None,
    categories: Sequence[str] | None = None,
    batch_settings: MuscSettings | None = MuscSettings(),
    batch_size: int = 8,
    pixel: bool = True,
    changeover: bool = True,
    cache_dir: Path | None = None,
    progress: Progress = _no_progress,
) -> dict:
    """Per line and overall: operator metrics per scoring mode, batch MuSc on the same frames, pixel
    metrics of the stream, and an unannounced changeover to the next line's set-up. settings: the
    engine's (default: the defaults); each mode replaces its engine.score_mode."""
    settings = Settings() if settings is None else settings
    lines = build_lines(root, n_frames, anomaly_rate, seed, head=settings.engine.window_size, setups=setups,
                        categories=categories)
    if not lines:
        raise ValueError(f"no line could be built from {root} with {n_frames} frames at rate {anomaly_rate}")
    side = backbone.image_size
    per_line, embedded = [], {}
    for li, line in enumerate(lines):
        progress(f"features {line.name}", li, len(lines))
        paths = [s.path for s in line.samples]
        images = [np.asarray(load_image(p)) for p in paths]
        started = time.perf_counter()
        features = embed_cached(backbone, paths, images, cache_dir, batch_size)
        embedded[line.name] = (images, features, (time.perf_counter() - started) / len(images))
    rows = []
    for li, line in enumerate(lines):
        images, features, extract_s = embedded[line.name]
        labels = line.labels
        cached = PrecomputedBackbone(backbone, images, features)
        entry = {"line": line.name, "frames": len(images), "defects": int(labels.sum()),
                 "extract_s_per_frame": extract_s, "modes": {}}
        if batch_settings is not None:
            progress(f"batch MuSc {line.name}", li, len(lines))
            started = time.perf_counter()
            batch = musc_from_tokens(features.patch_tokens, features.image_features, batch_settings, (side, side))
            entry["batch_s_per_frame"] = (time.perf_counter() - started) / len(images)
            entry["batch"] = {"rscin_windows": list(batch_settings.rscin_windows),
                              "rscin": image_metrics(labels, batch.scores.numpy())["auroc"],
                              "no_rscin": image_metrics(labels, batch.raw_scores.numpy())["auroc"]}
        for mode in modes:
            progress(f"stream {mode} {line.name}", li, len(lines))
            engine = Engine(cached, settings_with(settings, engine={"score_mode": mode}), keep_maps=pixel)
            started = time.perf_counter()
            result = replay_stream(engine, images, line=line.name, keep_maps=pixel)
            scoring_s = (time.perf_counter() - started) / len(images)
            counted = ~result.warmup
            metrics = operator_metrics(labels, result.scores, result.alerts, counted)
            metrics["auroc_all_frames"] = image_metrics(labels, result.scores)["auroc"]
            metrics["warmup_frames"] = int(result.warmup.sum())
            metrics["false_changeovers"] = int(result.changeover.sum())
            metrics["scoring_s_per_frame"] = scoring_s
            metrics["memory_frames"] = int(result.memory_scored.sum())
            if result.maps is not None:
                metrics.update(_pixel(line, result.maps))
            entry["modes"][mode] = metrics
        if changeover and len(lines) > 1:
            other = lines[(li + 1) % len(lines)]
            entry["changeover"] = changeover_run(backbone, settings, line, other, embedded)
        rows.append(entry)
    return {"root": str(root), "n_frames": n_frames, "anomaly_rate": anomaly_rate, "seed": seed,
            "backbone": backbone.spec.name, "weights": backbone.weights_label, "image_size": side,
            "config": _config_summary(settings), "lines": rows, "overall": _overall(rows, modes)}


def _pixel(line: StreamLine, maps: list[np.ndarray]) -> dict[str, float]:
    """Pixel AUROC and AUPRO of the stream's patch maps, upsampled to 224² to keep memory small."""
    size = (224, 224)
    grids = torch.as_tensor(np.stack(maps), dtype=torch.float32)[:, None]
    up = torch.nn.functional.interpolate(grids, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    masks = np.stack([load_mask(s, size) for s in line.samples])
    return {f"pixel_{k}": v for k, v in pixel_metrics(masks, up).items()}


def changeover_run(backbone, settings, line: StreamLine, other: StreamLine, embedded) -> dict:
    """Line ``line`` runs 60 of its normals, then ``other``'s normals arrive unannounced: when the
    engine detects the change, and the alerts after it (changeover_metrics). Public for
    benchmarks/bench_changeover.py, which runs every ordered pair of set-ups."""
    images_a, feats_a, _ = embedded[line.name]
    images_b, feats_b, _ = embedded[other.name]
    keep_a = [i for i, s in enumerate(line.samples) if s.label == 0][:60]
    keep_b = [i for i, s in enumerate(other.samples) if s.label == 0][:CHANGEOVER_FRAMES + 10]
    images = [images_a[i] for i in keep_a] + [images_b[i] for i in keep_b]
    features = Features(
        patch_tokens=[torch.cat([ta[keep_a], tb[keep_b]]) for ta, tb in zip(feats_a.patch_tokens, feats_b.patch_tokens)],
        image_features=torch.cat([feats_a.image_features[keep_a], feats_b.image_features[keep_b]]),
        grid=feats_a.grid,
    )
    engine = Engine(PrecomputedBackbone(backbone, images, features), settings)
    result = replay_stream(engine, images, line="changeover")
    out = changeover_metrics(result.changeover, result.alerts, len(keep_a))
    out["to"] = other.name
    out["false_changeovers_before"] = int(result.changeover[:len(keep_a)].sum())
    return out


def _overall(rows: list[dict], modes: Sequence[str]) -> dict:
    """Frames of all lines pooled (each line at its own threshold), and the mean per-line AUROC."""
    out = {}
    for mode in modes:
        ms = [r["modes"][mode] for r in rows]
        normals = sum(m["normals"] for m in ms)
        defects = sum(m["defects"] for m in ms)
        fa = sum(m["false_alarms"] for m in ms)
        caught = sum(_count(m.get("recall"), m["defects"]) for m in ms)
        best = sum(_count(m.get("best_fixed_recall"), m["defects"]) for m in ms)
        out[mode] = {"normals": normals, "defects": defects, "false_alarms": fa,
                     "fa_per_1000": 1000.0 * fa / max(1, normals), "recall": caught / max(1, defects),
                     "best_fixed_recall": best / max(1, defects),
                     "mean_line_auroc": float(np.mean([m.get("image_auroc", np.nan) for m in ms]))}
    batch = [r["batch"] for r in rows if "batch" in r]
    if batch:
        out["batch"] = {k: float(np.mean([b[k] for b in batch])) for k in ("rscin", "no_rscin")}
        out["batch"]["rscin_windows"] = batch[0]["rscin_windows"]
    ch = [r["changeover"] for r in rows if "changeover" in r]
    if ch:
        out["changeover"] = {
            "detected": sum(c["detected_after_frames"] is not None for c in ch), "runs": len(ch),
            "max_delay": max((c["detected_after_frames"] or 10**6) for c in ch),
            "max_alerts_in_30": max(c["alerts_in_30"] for c in ch),
        }
    return out


def _count(rate: float | None, total: int) -> int:
    """Frames behind a rate (0 when the rate is undefined: no frame of that kind was counted)."""
    return 0 if rate is None or not np.isfinite(rate) else round(rate * total)


def _config_summary(settings: Settings) -> dict:
    """The engine settings a report's numbers depend on (names as in earlier reports)."""
    e, m = settings.engine, settings.memory
    return {"window_size": e.window_size, "min_references": e.min_references, "r_list": settings.model.r_list,
            "score_mode": e.score_mode, "aligned": e.aligned, "drift_threshold": e.drift_threshold,
            "drift_feature": e.drift_feature,
            "drift_patience": e.drift_patience, "memory_enabled": m.enabled, "memory_r_list": m.r_list,
            "memory_max_patches": m.max_patches_per_line, "image_score": e.image_score,
            "target_false_alarms_per_1000": settings.threshold.target_false_alarms_per_1000,
            "threshold_method": settings.threshold.method}


def stream_report_markdown(result: dict) -> str:
    """The per-line table and the overall summary as Markdown."""
    cfg = result["config"]
    lines = [
        "# Stream evaluation: lines of one camera set-up",
        "",
        f"- data: {result['root']}; {result['n_frames']} frames per line asked, defect rate "
        f"{result['anomaly_rate']}, seed {result['seed']}; first {cfg.get('window_size')} frames normal",
        f"- backbone: {result['backbone']} at {result['image_size']} px, weights: {result['weights']}",
        f"- engine: {', '.join(f'{k}={v}' for k, v in cfg.items())}",
        "- recall / false alarms are at the engine's own threshold, over frames decided after the line's "
        "warm-up; 'best fixed' = best recall of any fixed threshold with no more false alarms on that line",
        "",
        "| line | mode | frames | defects | AUROC | recall | FA/1000 | best fixed recall | FA/1000 @100% recall "
        "| px AUROC | AUPRO | memory frames | s/frame |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["lines"]:
        for mode, m in row["modes"].items():
            lines.append(
                f"| {row['line']} | {mode} | {m['frames']} | {m['defects']} | {_pct(m.get('image_auroc'))} | "
                f"{_pct(m['recall'])} | {m['fa_per_1000']:.1f} | {_pct(m.get('best_fixed_recall'))} | "
                f"{m.get('fa_per_1000_at_full_recall', float('nan')):.0f} | {_pct(m.get('pixel_auroc'))} | "
                f"{_pct(m.get('pixel_aupro'))} | {m['memory_frames']} | {m['scoring_s_per_frame']:.3f} |")
    lines += ["", "## Overall (all lines pooled, each at its own threshold)", "",
              "| mode | normals | defects | recall | FA/1000 | best fixed recall | mean line AUROC |",
              "|---|---|---|---|---|---|---|"]
    for mode, m in result["overall"].items():
        if mode in ("batch", "changeover"):
            continue
        lines.append(f"| {mode} | {m['normals']} | {m['defects']} | {_pct(m['recall'])} | {m['fa_per_1000']:.1f} | "
                     f"{_pct(m['best_fixed_recall'])} | {_pct(m['mean_line_auroc'])} |")
    if "batch" in result["overall"]:
        b = result["overall"]["batch"]
        lines += ["", f"Batch MuSc on the same frames, mean line image AUROC: RsCIN {b['rscin_windows']} "
                  f"{_pct(b['rscin'])}, "
                  f"no RsCIN {_pct(b['no_rscin'])}."]
    ch = [r for r in result["lines"] if "changeover" in r]
    if ch:
        lines += ["", "## Unannounced changeover (60 normal frames of a line, then another set-up)", "",
                  "| from | to | detected after (frames) | alerts in the next 30 | false changeovers before |",
                  "|---|---|---|---|---|"]
        for r in ch:
            c = r["changeover"]
            lines.append(f"| {r['line']} | {c['to']} | {c['detected_after_frames']} | {c['alerts_in_30']} | "
                         f"{c['false_changeovers_before']} |")
    return "\n".join(lines) + "\n"


def _pct(value) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"
