"""Evaluation metrics of MuSc (image AUROC/AP/F1-max, pixel AUROC/AP/F1-max, AUPRO): arrays in, dict out.

Every number follows the reference `utils/metrics.py` of xrli-U/MuSc as described in
../shared/docs/musc-method.md §7. Values are fractions in [0, 1]; reports multiply by 100.

Deliberate departures, all in cases where the reference crashes or returns NaN by accident:

- pixel labels of one class (no defect pixel, or no normal pixel) give 0.0 for every pixel metric,
  the same rule the reference applies to image labels (the reference raises in `roc_auc_score`);
- AUPRO is NaN, with a warning, when it is undefined: a constant map (no thresholds, the reference
  raises in `np.arange`) or fewer than two distinct kept FPRs (the reference divides 0 by 0).
"""

from __future__ import annotations

import logging

import numpy as np
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

logger = logging.getLogger(__name__)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Max of 2PR/(P+R) over the precision-recall curve, ignoring non-finite points (§7).

    labels: (M,) 0/1 or bool; scores: (M,) float, higher = more anomalous.
    """
    precisions, recalls, _ = precision_recall_curve(np.asarray(labels).ravel(), np.asarray(scores).ravel())
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precisions * recalls / (precisions + recalls)
    return float(np.max(f1[np.isfinite(f1)]))


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Image-level AUROC, AP and F1-max of one category (§7).

    labels: (N,) 1 = anomalous; scores: (N,) image scores. All-one-class labels give 0.0 for every
    metric, as the reference does.
    """
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    if labels.all() or not labels.any():
        logger.warning("image labels are all one class (%d images): image metrics set to 0", labels.size)
        return {"auroc": 0.0, "ap": 0.0, "f1_max": 0.0}
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "ap": float(average_precision_score(labels, scores)),
        "f1_max": f1_max(labels, scores),
    }


def pixel_metrics(
    masks: np.ndarray,
    maps: np.ndarray,
    *,
    pro: bool = True,
    pro_thresholds: int = 200,
    max_fpr: float = 0.3,
) -> dict[str, float]:
    """Pixel-level AUROC, AP, F1-max on all pixels flattened, plus AUPRO (§7).

    masks: (N, H, W) bool ground truth; maps: (N, H, W) float anomaly maps at the same size. With
    pro=False the "aupro" key is NaN (skips the slowest metric). One-class masks give 0.0 for all.
    """
    masks = np.asarray(masks).astype(bool, copy=False)
    maps = np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be (N, H, W)")
    n_pos = int(masks.sum())
    if n_pos == 0 or n_pos == masks.size:
        logger.warning("pixel labels are all one class (%d pixels): pixel metrics set to 0", masks.size)
        return {"auroc": 0.0, "ap": 0.0, "f1_max": 0.0, "aupro": 0.0}
    flat_masks, flat_maps = masks.ravel(), maps.ravel()
    return {
        "auroc": float(roc_auc_score(flat_masks, flat_maps)),
        "ap": float(average_precision_score(flat_masks, flat_maps)),
        "f1_max": f1_max(flat_masks, flat_maps),
        "aupro": aupro(masks, maps, thresholds=pro_thresholds, max_fpr=max_fpr) if pro else float("nan"),
    }


def aupro(masks: np.ndarray, maps: np.ndarray, *, thresholds: int = 200, max_fpr: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to max_fpr, as the reference `cal_pro_score` (§7).

    masks: (N, H, W) bool; maps: (N, H, W) float. Thresholds are `np.arange(min, max, (max-min)/200)`
    over all maps, a pixel counts as positive when map > th, regions are 8-connected GT components
    of each image, PRO(th) is the mean over all regions of overlap/area and FPR(th) counts over every
    GT-negative pixel. Kept points (FPR < max_fpr) are min-max rescaled in FPR and integrated with
    the trapezoidal rule.

    Instead of binarising all maps once per threshold (the reference: 200 passes over N·H·W pixels
    and one `measure.label` per image per threshold), each pixel gets the index of the first
    threshold it does not exceed; per-region histograms of that index, summed from the top, give the
    detected-pixel counts of every threshold at once. Labels are computed once per image, and extra
    memory is one image's worth of indices.
    """
    masks = np.asarray(masks).astype(bool, copy=False)
    maps = np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be (N, H, W)")
    min_th, max_th = maps.min(), maps.max()
    if not min_th < max_th:
        logger.warning("AUPRO undefined: the anomaly maps are constant (%s)", min_th)
        return float("nan")
    ths = np.arange(min_th, max_th, (max_th - min_th) / thresholds)  # (T,) ascending, as the reference
    n_ths = ths.size

    # For a pixel of value v, `v > ths[t]` holds exactly for t < searchsorted(ths, v, side="left").
    neg_hist = np.zeros(n_ths + 1, dtype=np.int64)  # negatives by first-not-exceeded threshold
    region_hists = []  # per image: (R_i, T+1) region pixels by first-not-exceeded threshold
    region_areas = []
    for mask, amap in zip(masks, maps):
        levels = np.searchsorted(ths, amap, side="left")  # (H, W) in [0, T]
        neg_hist += np.bincount(levels[~mask], minlength=n_ths + 1)
        regions = measure.label(mask)  # (H, W) 0 = background, 1..R full (8-)connectivity as the reference
        n_regions = int(regions.max())
        if n_regions == 0:
            continue
        inside = regions > 0
        ids = regions[inside] - 1
        hist = np.bincount(ids * (n_ths + 1) + levels[inside], minlength=n_regions * (n_ths + 1))
        region_hists.append(hist.reshape(n_regions, n_ths + 1))
        region_areas.append(np.bincount(ids, minlength=n_regions))
    if not region_hists:
        logger.warning("AUPRO undefined: no ground-truth region")
        return float("nan")
    hists = np.concatenate(region_hists)  # (R, T+1)
    areas = np.concatenate(region_areas)  # (R,)

    # Pixels above ths[t] are those whose level is > t: reversed cumulative sum, dropping level 0.
    detected = np.cumsum(hists[:, ::-1], axis=1)[:, ::-1][:, 1:]  # (R, T)
    pros = (detected / areas[:, None]).mean(axis=0)  # (T,)
    false_pos = np.cumsum(neg_hist[::-1])[::-1][1:]  # (T,)
    fprs = false_pos / neg_hist.sum()  # (T,)

    keep = fprs < max_fpr
    kept_fprs = fprs[keep]
    if kept_fprs.size == 0 or kept_fprs.max() == kept_fprs.min():
        logger.warning("AUPRO undefined: fewer than two distinct FPRs below %s", max_fpr)
        return float("nan")
    kept_fprs = (kept_fprs - kept_fprs.min()) / (kept_fprs.max() - kept_fprs.min())
    return float(auc(kept_fprs, pros[keep]))
