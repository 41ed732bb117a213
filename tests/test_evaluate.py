"""Tests of batch evaluation (musc_stream/evaluate.run_batch_eval): RsCIN windows and mask rules per
layout, on the real magnetic tiles and a tiny MVTec-layout folder. Backbone: random-vit-tiny
(random weights; these tests check the protocol, not accuracy)."""

import numpy as np
import pytest
from PIL import Image

from musc_stream.evaluation.datasets import MASK_RULES, RSCIN_WINDOWS
from musc_stream.evaluation.runs import Selection, run_batch_eval
from musc_stream.model.backbone import BackboneSpec, load_backbone
from musc_stream.model.musc import MuscSettings


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(BackboneSpec("random-vit-tiny", None, 64, "cpu"))


def _mvtec(root):
    rng = np.random.default_rng(0)
    for kind, n in (("good", 4), ("dent", 2)):
        (root / "widget" / "test" / kind).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                root / "widget" / "test" / kind / f"{i:03d}.png")
            if kind == "dent":
                mask = np.zeros((40, 40), np.uint8)
                mask[10:20, 5:30] = 255
                (root / "widget" / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "widget" / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root


def test_rscin_windows_and_mask_rule_follow_the_layout(tiny, magnetic_tile, tmp_path):
    assert RSCIN_WINDOWS == {"mvtec": (1, 2, 3), "magnetic_tile": (0,)}
    mt, _ = run_batch_eval(magnetic_tile, tiny, selection=Selection(4, 2, 0))
    cat = mt["categories"]["magnetic_tile"]
    assert cat["rscin_windows"] == [0] and cat["mask_rule"] == f"magnetic_tile: {MASK_RULES['magnetic_tile']}"
    assert mt["settings"]["rscin_features"] == "normalised"
    mv, _ = run_batch_eval(_mvtec(tmp_path), tiny, MuscSettings(rscin_features="raw"))
    cat = mv["categories"]["widget"]
    assert cat["rscin_windows"] == [1, 2, 3] and "still at 255" in cat["mask_rule"]
    assert mv["settings"]["rscin_features"] == "raw"


def test_explicit_rscin_windows_apply_to_every_layout(tiny, magnetic_tile):
    selection = Selection(4, 2, 0)
    off, _ = run_batch_eval(magnetic_tile, tiny, selection=selection)
    on, _ = run_batch_eval(magnetic_tile, tiny, selection=selection, rscin_windows=(1, 2))
    assert on["settings"]["rscin_windows"] == [1, 2] and on["categories"]["magnetic_tile"]["rscin_windows"] == [1, 2]
    assert off["categories"]["magnetic_tile"]["pixel"] == on["categories"]["magnetic_tile"]["pixel"]  # maps unchanged
