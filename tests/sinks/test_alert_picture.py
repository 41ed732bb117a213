"""The alert picture (sinks/alert_picture.py): colour scale fixed by the line's threshold, the
threshold at a fixed place on the bar, region boxes, caption, upscaling, fitting under a byte limit.
Frames are real magnetic-tile photos (../shared/data/magnetic_tile); heatmaps are smooth blobs like
the engine's. No model: the picture is under test."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from musc_stream.service.sinks.alert_picture import (
    MAX_LONG_SIDE,
    MIN_SHORT_SIDE,
    SCALE_HIGH,
    SCALE_LOW,
    ColourScale,
    alert_png,
    caption_lines,
    colour_bar,
    fit_png,
    frame_png,
    natural_scale,
)
from musc_stream.stream.records import Decision
from musc_stream.stream.regions import find_regions


def _tile(magnetic_tile: Path, size=(494, 361)) -> np.ndarray:
    path = sorted((magnetic_tile / "MT_Break" / "Imgs").glob("*.jpg"))[0]
    return np.asarray(Image.open(path).convert("RGB").resize(size, Image.Resampling.BILINEAR))


def _decision(image: np.ndarray, threshold: float | None, peak: float, base: float = 0.1) -> Decision:
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    heat = (base + (peak - base) * np.exp(-((xx - 0.6 * w) ** 2 + (yy - 0.4 * h) ** 2) / (2 * (w / 10) ** 2)))
    heat = heat.astype(np.float32)
    return Decision(line="tile-a", frame_id="Break-1", ts=1_767_225_600.0, score=float(heat.max()),
                    threshold=threshold, is_anomaly=threshold is not None and heat.max() > threshold,
                    warmup=threshold is None, regions=find_regions(heat, threshold), heatmap=heat)


def _open(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_same_score_same_colour_on_every_alert_of_a_line(magnetic_tile):
    """Two alerts of one line with different peaks: a pixel of the same score gets the same colour
    (a per-frame scale, median..max, would colour them differently)."""
    image = _tile(magnetic_tile)
    flat = np.full_like(image, 128)  # the same grey under both maps, so only the map decides
    weak, strong = _decision(flat, 0.5, peak=0.6), _decision(flat, 0.5, peak=1.2)
    s = natural_scale(*image.shape[:2])
    a, b = _open(alert_png(weak, flat, s)), _open(alert_png(strong, flat, s))
    value = 0.55  # a score both maps reach
    ya, xa = np.argwhere(np.abs(weak.heatmap - value) < 0.002)[0]
    yb, xb = np.argwhere(np.abs(strong.heatmap - value) < 0.002)[0]
    pa, pb = a[round(ya * s), round(xa * s)].astype(int), b[round(yb * s), round(xb * s)].astype(int)
    assert np.abs(pa - pb).max() <= 12, (pa, pb)
    assert pa[0] > pa[2]  # above the threshold: warm (red channel over blue)
    below = a[round(5 * s), round(5 * s)].astype(int)  # background 0.1 < 0.5 × threshold: untinted
    assert np.abs(below - 128).max() <= 2


def test_threshold_sits_at_a_fixed_place_on_the_bar():
    for threshold in (0.2, 0.9):
        scale = ColourScale.for_threshold(threshold)
        assert (scale.low, scale.high) == pytest.approx((SCALE_LOW * threshold, SCALE_HIGH * threshold))
        assert scale.fraction(threshold) == pytest.approx(0.5)
        assert scale.index(np.array([threshold * 0.999]))[0] < 128 <= scale.index(np.array([threshold * 1.001]))[0]
        bar = np.asarray(colour_bar(scale, 400, 16))
        white_rows = np.flatnonzero((bar[:, 16 + 4] > 250).all(axis=1))  # the mark across the bar
        assert white_rows.size and abs(white_rows.mean() - 200) <= 2


def test_boxes_caption_and_upscale(magnetic_tile):
    image = _tile(magnetic_tile, (240, 180))  # a small frame
    d = _decision(image, 0.5, peak=0.9)
    assert d.regions
    s = natural_scale(180, 240)
    assert s == pytest.approx(MIN_SHORT_SIDE / 180)
    picture = _open(alert_png(d, image))
    assert picture.shape[0] > round(180 * s) and picture.shape[1] > round(240 * s)  # caption and bar
    r = d.regions[0]
    edge = picture[round((r.y0 + r.y1) / 2 * s), round(r.x0 * s):round(r.x0 * s) + 6]  # the box's left side
    assert (edge >= 250).all(axis=1).any() and (edge <= 5).all(axis=1).any(), edge  # white inside black
    caption_band = picture[round(180 * s) + 2:, :]
    assert (caption_band > 200).any()  # text drawn
    lines = caption_lines(d)
    assert lines[0] == "line tile-a · frame Break-1"
    assert f"score {d.score:.4f} > threshold 0.5000" in lines[1] and "1 region(s)" in lines[1]
    assert lines[2].startswith("2026-01-01 00:00:00 UTC")


def test_without_threshold_and_grey_frames_it_still_draws(magnetic_tile):
    image = _tile(magnetic_tile)[..., 0]  # (H, W) grey
    d = _decision(np.stack([image] * 3, -1), None, peak=0.9)
    picture = _open(alert_png(d, image))
    assert picture.shape[1] > image.shape[1]
    assert "no threshold yet" in caption_lines(d)[1]


def test_huge_frames_are_capped_and_pictures_fit_a_byte_limit(magnetic_tile):
    image = _tile(magnetic_tile, (4000, 3000))
    assert natural_scale(3000, 4000) == pytest.approx(MAX_LONG_SIDE / 4000)
    d = _decision(image, 0.5, peak=0.9)
    start = natural_scale(3000, 4000)
    png, scale = fit_png(lambda s: alert_png(d, image, s), (3000, 4000), start, 200_000)
    assert png is not None and len(png) <= 200_000 and 0 < scale < start
    assert fit_png(lambda s: alert_png(d, image, s), (3000, 4000), start, 500) == (None, 0.0)
    clean, clean_scale = fit_png(lambda s: frame_png(image, s), (3000, 4000), 1.0, 300_000)
    assert clean is not None and len(clean) <= 300_000
    assert Image.open(io.BytesIO(clean)).size == (round(4000 * clean_scale), round(3000 * clean_scale))
