"""Evaluation runs: batch MuSc per category, and a seeded stream through the service's engine.

Batch mode follows the reference protocol (musc-method.md §7): every image of a category (or a
seeded subset) scored together, maps and masks compared at S×S, metrics averaged over categories.
Stream mode replays normal frames with defective frames mixed in at a set rate through the same
``Engine`` the service runs, and scores the same frames with batch MuSc for comparison.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from musc_stream.datasets import MASK_RULES, RSCIN_WINDOWS, Sample, discover, load_image, load_mask, seeded_subset
from musc_stream.engine import Engine, EngineConfig
from musc_stream.metrics import image_metrics, pixel_metrics
from musc_stream.model.backbone import Backbone, Features
from musc_stream.model.batch import score_batch
from musc_stream.model.musc import MuscSettings, musc_from_tokens
from musc_stream.records import Frame

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class Selection:
    """Which images of each category are evaluated."""

    n_normal: int | None = None  # None: every image of the category (the reference protocol)
    n_anomalous: int | None = None
    seed: int = 42

    def pick(self, samples: list[Sample]) -> list[Sample]:
        if self.n_normal is None and self.n_anomalous is None:
            return samples
        normals = sum(1 for s in samples if s.label == 0)
        anomalous = len(samples) - normals
        return seeded_subset(samples, min(self.n_normal or normals, normals),
                             min(self.n_anomalous or anomalous, anomalous), self.seed)

    def describe(self) -> str:
        if self.n_normal is None and self.n_anomalous is None:
            return "all test images of each category"
        return (f"seeded subset (seed {self.seed}): {self.n_normal} normal + {self.n_anomalous} "
                "anomalous per category, anomalous stratified over defect types")


def _mean(per_category: dict[str, dict], level: str) -> dict[str, float]:
    keys = next(iter(per_category.values()))[level].keys()
    return {k: float(np.nanmean([c[level][k] for c in per_category.values()])) for k in keys}


def _mask_rules(samples: Sequence[Sample]) -> str:
    """How the category's ground truth was binarised, in words (datasets.MASK_RULES)."""
    return "; ".join(f"{layout}: {MASK_RULES[layout]}" for layout in sorted({s.layout for s in samples}))


def rscin_windows_for(samples: Sequence[Sample]) -> tuple[int, ...]:
    """Default RsCIN windows of a category, by its layout (datasets.RSCIN_WINDOWS)."""
    layouts = {s.layout for s in samples}
    if len(layouts) != 1:
        raise ValueError(f"a category mixes dataset layouts {sorted(layouts)}")
    return RSCIN_WINDOWS[layouts.pop()]


def run_batch_eval(
    root: Path,
    backbone: Backbone,
    settings: MuscSettings = MuscSettings(),
    selection: Selection = Selection(),
    categories: Sequence[str] | None = None,
    batch_size: int = 8,
    progress: Progress = _no_progress,
    rscin_windows: Sequence[int] | None = None,
) -> tuple[dict, dict[str, tuple[list[Sample], list[np.ndarray]]]]:
    """Batch MuSc over every category under ``root``. Returns the report dict (report.py schema)
    and, per category, the evaluated samples with their S×S maps (for the heatmap grid).

    ``rscin_windows`` None uses each category's layout default (``rscin_windows_for``: the
    reference's {1,2,3} for MVTec, off for magnetic tiles); a list applies to every category.
    ``settings.rscin_windows`` is then ignored."""
    found = discover(root)
    names = list(categories) if categories else sorted(found)
    side = backbone.image_size
    per_category, outputs = {}, {}
    extract_s = score_s = 0.0
    total_images = 0
    started = time.perf_counter()
    for index, name in enumerate(names):
        if name not in found:
            raise ValueError(f"category {name!r} not found under {root}; have {sorted(found)}")
        samples = selection.pick(found[name])
        progress(f"{name}: loading {len(samples)} images", index, len(names))
        images = [load_image(s.path) for s in samples]
        progress(f"{name}: scoring", index, len(names))
        windows = tuple(rscin_windows) if rscin_windows is not None else rscin_windows_for(samples)
        result = score_batch(images, backbone, replace(settings, rscin_windows=windows),
                             batch_size=batch_size, map_size=(side, side),
                             on_step=lambda done, total: progress(f"{name}: MSM set", done, total))
        labels = np.array([s.label for s in samples])
        masks = np.stack([load_mask(s, (side, side)) for s in samples])
        maps = np.stack(result.maps)
        per_category[name] = {
            "mask_rule": _mask_rules(samples),
            "rscin_windows": list(windows),
            "image": image_metrics(labels, result.scores),
            "pixel": pixel_metrics(masks, maps),
            "n_images": len(samples),
            "n_anomalous": int(labels.sum()),
        }
        outputs[name] = (samples, result.maps)
        extract_s += result.extract_s
        score_s += result.score_s
        total_images += len(samples)
        progress(f"{name}: done", index + 1, len(names))
    report = {
        "settings": {
            "image_size": side, "r_list": list(settings.r_list), "topmin_max": settings.topmin_max,
            "rscin_windows": list(rscin_windows) if rscin_windows is not None else "per layout (see categories)",
            "rscin_features": settings.rscin_features,
            "layers": list(backbone.layers),
            "distance_dtype": str(settings.distance_dtype or "float32"),
            "device": str(backbone.device), "root": str(root),
        },
        "backbone": backbone.spec.name,
        "weights": backbone.weights_label,
        "seed": selection.seed,
        "split": selection.describe(),
        "categories": per_category,
        "mean": {"image": _mean(per_category, "image"), "pixel": _mean(per_category, "pixel")},
        "timings": {
            "extract_s_per_image": extract_s / max(1, total_images),
            "score_s_per_image": score_s / max(1, total_images),
            "total_s": time.perf_counter() - started,
        },
    }
    return report, outputs


# -- streaming ------------------------------------------------------------------------------


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


def seeded_stream(samples: list[Sample], n_frames: int, anomaly_rate: float, seed: int) -> list[Sample]:
    """A camera-like sequence: normal frames with defective ones mixed in at ``anomaly_rate``.

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


def replay_stream(engine: Engine, images: Sequence[np.ndarray], line: str = "eval",
                  batch_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Feed frames through ``engine`` in order; return each frame's image score and alert flag
    (stream order)."""
    scores = np.full(len(images), np.nan)
    alerts = np.zeros(len(images), dtype=bool)
    now = time.time()
    frames = [Frame(line=line, frame_id=str(i), ts=now + i, image=img, received_at=now + i)
              for i, img in enumerate(images)]
    for start in range(0, len(frames), batch_size):
        for decision in engine.process(frames[start:start + batch_size]):
            scores[int(decision.frame_id)] = decision.score
            alerts[int(decision.frame_id)] = decision.is_anomaly
    # Frames still held in warm-up at the end of a short stream have no score; never expected here.
    if np.isnan(scores).any():
        raise RuntimeError(f"{int(np.isnan(scores).sum())} frames were never scored")
    return scores, alerts


def alert_rates(labels: np.ndarray, alerts: np.ndarray) -> dict[str, float]:
    """What an operator sees at the engine's adaptive threshold: share of defects alerted and
    share of normal frames alerted (false alarms)."""
    defects, normals = labels == 1, labels == 0
    return {"alert_recall": float(alerts[defects].mean()) if defects.any() else float("nan"),
            "false_alarm_rate": float(alerts[normals].mean()) if normals.any() else float("nan")}


def run_stream_eval(
    root: Path,
    backbone: Backbone,
    n_frames: int = 200,
    anomaly_rate: float = 0.1,
    seed: int = 42,
    window_sizes: Sequence[int] = (8, 16, 32),
    modes: Sequence[str] = ("window", "memory", "combined"),
    base_config: EngineConfig = EngineConfig(),
    batch_settings: MuscSettings = MuscSettings(),
    progress: Progress = _no_progress,
) -> dict:
    """Streaming vs batch on the same seeded frames of the first category under ``root``."""
    found = discover(root)
    category = sorted(found)[0]
    stream = seeded_stream(found[category], n_frames, anomaly_rate, seed)
    labels = np.array([s.label for s in stream])
    images = [np.asarray(load_image(s.path)) for s in stream]
    progress("extracting features", 0, 1)
    started = time.perf_counter()
    features = backbone.embed(images, batch_size=8)
    extract_s = time.perf_counter() - started
    progress("batch MuSc", 0, 1)
    side = backbone.image_size
    started = time.perf_counter()
    batch = musc_from_tokens(features.patch_tokens, features.image_features, batch_settings, (side, side),
                             on_step=lambda done, total: progress("batch MuSc (r, layer) sets", done, total))
    batch_s = time.perf_counter() - started
    rows = [{"mode": "batch MuSc (all frames, RsCIN)", "window": len(stream),
             **image_metrics(labels, batch.scores.numpy()), "score_s_per_frame": batch_s / len(stream)}]
    rows.append({"mode": "batch MuSc (no RsCIN)", "window": len(stream),
                 **image_metrics(labels, batch.raw_scores.numpy()), "score_s_per_frame": batch_s / len(stream)})
    cached = PrecomputedBackbone(backbone, images, features)
    variants = [(m, w) for w in window_sizes for m in modes]
    for i, (mode, window) in enumerate(variants):
        progress(f"stream {mode} window={window}", i, len(variants))
        config = replace(base_config, score_mode=mode, window_size=window, drift_threshold=None)
        engine = Engine(cached, config)
        started = time.perf_counter()
        scores, alerts = replay_stream(engine, images)
        rows.append({"mode": f"stream {mode}", "window": window, **image_metrics(labels, scores),
                     **alert_rates(labels, alerts),
                     "score_s_per_frame": (time.perf_counter() - started) / len(stream)})
    return {
        "category": category, "n_frames": len(stream), "n_anomalous": int(labels.sum()),
        "anomaly_rate": anomaly_rate, "seed": seed, "backbone": backbone.spec.name,
        "weights": backbone.weights_label, "image_size": side,
        "extract_s_per_frame": extract_s / len(stream), "rows": rows,
    }


def stream_report_markdown(result: dict) -> str:
    """The streaming-vs-batch table as Markdown."""
    lines = [
        f"# Streaming vs batch MuSc — {result['category']}",
        "",
        f"- frames: {result['n_frames']} ({result['n_anomalous']} defective, rate "
        f"{result['anomaly_rate']}, seed {result['seed']}; first 5 frames normal)",
        f"- backbone: {result['backbone']} at {result['image_size']} px, weights: {result['weights']}",
        f"- feature extraction: {result['extract_s_per_frame']:.3f} s/frame (shared by all rows)",
        "",
        "| scoring | window | image AUROC | AP | F1-max | alerts on defects | false alarms | scoring s/frame |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        rates = (f"{100 * row['alert_recall']:.0f} % | {100 * row['false_alarm_rate']:.1f} %"
                 if "alert_recall" in row else "– | –")
        lines.append(f"| {row['mode']} | {row['window']} | {100 * row['auroc']:.2f} | "
                     f"{100 * row['ap']:.2f} | {100 * row['f1_max']:.2f} | {rates} | {row['score_s_per_frame']:.4f} |")
    lines += ["", "Alerts and false alarms are at the engine's adaptive threshold (defaults), over all "
              "frames including warm-up (no alerts are raised while a line warms up)."]
    return "\n".join(lines) + "\n"
