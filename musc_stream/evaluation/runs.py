"""Evaluation runs: batch MuSc per category, and a seeded stream through the service's engine.

Batch mode follows the reference protocol (musc-method.md §7): every image of a category (or a
seeded subset) scored together, maps and masks compared at S×S, metrics averaged over categories.
The stream evaluation (lines of one camera set-up through the service's engine) lives in
``stream_eval.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from musc_stream.evaluation.datasets import MASK_RULES, RSCIN_WINDOWS, Sample, discover, load_image, load_mask, seeded_subset
from musc_stream.evaluation.quality_metrics import image_metrics, pixel_metrics
from musc_stream.model.backbone import Backbone
from musc_stream.model.batch import score_batch
from musc_stream.model.musc import MuscSettings
from musc_stream.stream.threshold import AdaptiveThreshold, estimate

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


class CategoryOutput(NamedTuple):
    """What the heatmap grid and the score table of one category need."""

    samples: list[Sample]
    maps: list[np.ndarray]  # (S, S) anomaly maps
    scores: np.ndarray  # (N,) image scores
    threshold: float | None  # batch_threshold of the normal images' scores


def batch_threshold(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """The threshold a line would set from these normal images' scores (the service's default rule
    and target, threshold.py), for the grid's and the table's verdicts. In hindsight: the normal
    images it is estimated from are among those it judges. None with fewer than 2 normal images."""
    normal = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(labels) == 0])
    if len(normal) < 2:
        return None
    return estimate(normal, AdaptiveThreshold(min_history=2))[0]


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
) -> tuple[dict, dict[str, CategoryOutput]]:
    """Batch MuSc over every category under ``root``. Returns the report dict (report.py schema)
    and, per category, the evaluated samples with their S×S maps, scores and threshold (for the
    heatmap grid and the score table).

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
        scores = np.asarray(result.scores, dtype=np.float64)
        outputs[name] = CategoryOutput(samples, list(result.maps), scores, batch_threshold(scores, labels))
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
