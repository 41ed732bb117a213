"""Tests of musc_stream/evaluation/quality_metrics.py against sklearn, hand-computed cases and a naive AUPRO."""

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score

from musc_stream.evaluation.quality_metrics import aupro, f1_max, image_metrics, pixel_metrics


def _naive_aupro(masks, maps, steps=200, max_fpr=0.3):
    """§7 written as plainly as possible: binarise per threshold, loop over regions."""
    ths = np.arange(maps.min(), maps.max(), (maps.max() - maps.min()) / steps)
    pros, fprs = [], []
    negatives = ~masks
    for th in ths:
        binary = maps > th
        overlaps = []
        for b, m in zip(binary, masks):
            regions, n = ndimage.label(m, structure=np.ones((3, 3)))
            for r in range(1, n + 1):
                overlaps.append(b[regions == r].sum() / (regions == r).sum())
        pros.append(np.mean(overlaps))
        fprs.append((binary & negatives).sum() / negatives.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < max_fpr
    x = fprs[keep]
    return auc((x - x.min()) / (x.max() - x.min()), pros[keep])


def test_f1_max_hand_computed():
    # Thresholds 0.8, 0.4, 0.35, 0.1 give F1 2/3, 1/2, 4/5, 2/3.
    assert f1_max(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.8)


def test_image_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = labels * 0.5 + rng.random(50)
    got = image_metrics(labels, scores)
    assert set(got) == {"auroc", "ap", "f1_max"}
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert got["ap"] == pytest.approx(average_precision_score(labels, scores))
    assert 0.5 < got["f1_max"] <= 1.0


def test_image_metrics_hand_computed():
    got = image_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert got["auroc"] == pytest.approx(0.75)  # 3 of 4 (anomalous, normal) pairs ordered right
    assert got["ap"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    assert got["f1_max"] == pytest.approx(0.8)


@pytest.mark.parametrize("labels", [np.zeros(5, int), np.ones(5, int)])
def test_image_metrics_one_class_are_zero(labels):
    assert image_metrics(labels, np.arange(5.0)) == {"auroc": 0.0, "ap": 0.0, "f1_max": 0.0}


def test_image_metrics_shape_mismatch():
    with pytest.raises(ValueError):
        image_metrics(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))


def test_aupro_perfect_map_is_one():
    rng = np.random.default_rng(1)
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 3:6, 4:9] = True
    masks[1, 10:12, 1:3] = True
    maps = rng.random(masks.shape) * 0.5
    maps[masks] = 1.0  # every defect pixel above every threshold, normal pixels spread below
    assert aupro(masks, maps) == pytest.approx(1.0)


def test_aupro_half_covered_region_is_half():
    masks = np.zeros((1, 10, 10), bool)
    masks[0, 2:4, 2:6] = True  # one region of 8 pixels
    maps = np.linspace(0.0, 0.99, 100).reshape(1, 10, 10)  # normal pixels spread over the range
    maps[0, 2, 2:6] = 1.0  # top half of the region: above every threshold
    maps[0, 3, 2:6] = 0.0  # bottom half: never above any threshold (th >= min = 0)
    # PRO = 4/8 at every threshold, over a rescaled FPR axis of length 1.
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_averages_over_8_connected_regions():
    masks = np.zeros((1, 12, 12), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal pair: one region with 8-connectivity
    masks[0, 8, 8:10] = True  # second region
    maps = np.linspace(0.0, 0.99, 144).reshape(1, 12, 12)
    maps[0, 0, 0] = 1.0
    maps[0, 1, 1] = 0.0
    maps[0, 8, 8:10] = 1.0
    # Regions 1/2 and 1 -> 0.75; 4-connectivity would split the pair: (1 + 0 + 1)/3.
    assert aupro(masks, maps) == pytest.approx(0.75)
    # Region-wise, not pixel-wise, mean: (1 + 0)/2, where pixels would give 1/10.
    masks2 = np.zeros((1, 12, 12), bool)
    masks2[0, 0, 0] = True  # region of 1 pixel, covered
    masks2[0, 5:8, 5:8] = True  # region of 9 pixels, never covered
    maps2 = np.linspace(0.0, 0.99, 144).reshape(1, 12, 12)
    maps2[0, 0, 0] = 1.0
    maps2[0, 5:8, 5:8] = 0.0
    assert aupro(masks2, maps2) == pytest.approx(0.5)


def test_aupro_random_map_is_low():
    rng = np.random.default_rng(2)
    masks = np.zeros((4, 32, 32), bool)
    masks[:, 8:20, 8:20] = True
    value = aupro(masks, rng.random(masks.shape))
    assert value < 0.25  # PRO tracks FPR (~0..0.3), area ~0.15


def test_aupro_matches_naive_definition():
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 24, 24), bool)
    masks[0, 2:8, 3:7] = True
    masks[0, 15:17, 15:22] = True
    masks[1, 10:14, 10:14] = True
    masks[1, 14, 14] = True  # touches diagonally: same region
    maps = rng.random(masks.shape).astype(np.float32)
    maps[masks] += rng.random(int(masks.sum())).astype(np.float32) * 0.8
    assert aupro(masks, maps) == pytest.approx(_naive_aupro(masks, maps), abs=1e-12)


def test_aupro_undefined_cases_are_nan():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = True
    assert math.isnan(aupro(masks, np.ones((1, 4, 4))))  # constant map: no thresholds
    assert math.isnan(aupro(masks, masks.astype(float)))  # binary map: FPR 0 at every threshold


def test_pixel_metrics_keys_and_values():
    rng = np.random.default_rng(4)
    masks = np.zeros((3, 20, 20), bool)
    masks[1, 5:9, 5:9] = True
    maps = rng.random(masks.shape) + masks
    got = pixel_metrics(masks, maps)
    assert set(got) == {"auroc", "ap", "f1_max", "aupro"}
    assert got["auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert got["ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()))
    assert got["f1_max"] == pytest.approx(f1_max(masks.ravel(), maps.ravel()))
    assert got["aupro"] == pytest.approx(aupro(masks, maps))
    assert math.isnan(pixel_metrics(masks, maps, pro=False)["aupro"])


def test_pixel_metrics_rejects_bad_shapes():
    with pytest.raises(ValueError):
        pixel_metrics(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError):
        pixel_metrics(np.zeros((4, 4), bool), np.zeros((4, 4)))


def test_pixel_metrics_without_defect_pixels_are_zero():
    got = pixel_metrics(np.zeros((2, 4, 4), bool), np.random.default_rng(5).random((2, 4, 4)))
    assert got == {"auroc": 0.0, "ap": 0.0, "f1_max": 0.0, "aupro": 0.0}
