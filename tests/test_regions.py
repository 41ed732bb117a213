"""Tests of region extraction from heatmaps."""

import numpy as np

from musc_stream.stream.regions import find_regions


def test_two_blobs_become_two_boxes_strongest_first():
    heat = np.zeros((20, 30), dtype=np.float32)
    heat[2:5, 3:7] = 1.0  # 3×4 blob, peak 1.0
    heat[10:18, 20:22] = 2.0  # 8×2 blob, peak 2.0
    regions = find_regions(heat, 0.5)
    assert [(r.x0, r.y0, r.x1, r.y1) for r in regions] == [(20, 10, 22, 18), (3, 2, 7, 5)]
    assert [r.area_px for r in regions] == [16, 12]
    assert regions[0].score == 2.0


def test_diagonal_pixels_are_one_region_and_cap_applies():
    heat = np.zeros((10, 10), dtype=np.float32)
    heat[1, 1] = heat[2, 2] = 1.0
    assert len(find_regions(heat, 0.5)) == 1
    many = np.zeros((10, 40), dtype=np.float32)
    many[5, ::3] = 1.0
    assert len(find_regions(many, 0.5, max_regions=5)) == 5


def test_no_threshold_uses_top_percent_and_flat_map_gives_nothing():
    heat = np.zeros((10, 10), dtype=np.float32)
    heat[4, 4] = 3.0
    assert len(find_regions(heat, None)) == 1
    assert find_regions(np.ones((5, 5), dtype=np.float32), None) == []
