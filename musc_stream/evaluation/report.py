"""Evaluation report files: report.json, report.md, the heatmap grid PNG and the per-image score
table (CSV). Formats only; no metric math.

The `result` dict handed to `write_report` (metric values are fractions in [0, 1]; the Markdown
shows them ×100 with 2 decimals):

    {
        "settings": {name: value, ...},        # flat; values JSON-serialisable
        "backbone": str,                       # e.g. "ViT-L-14-336"
        "weights": str,                        # weights label, e.g. "openai" or a checkpoint path
        "seed": int,
        "split": str,                          # how the evaluated images were chosen, in words
        "categories": {
            cat: {
                "image": {"auroc", "ap", "f1_max"},            # -> float
                "pixel": {"auroc", "ap", "f1_max", "aupro"},   # -> float; may be empty without masks
                "n_images": int,
                "n_anomalous": int,
                "mask_rule": str,                              # optional: how its masks were binarised
                "rscin_windows": [int, ...],                   # optional: RsCIN windows used ([0]: off)
            },
        },
        "mean": {"image": {...}, "pixel": {...}},   # unweighted category means (§7), computed by the caller
        "timings": {"extract_s_per_image": float, "score_s_per_image": float, "total_s": float},
    }

Non-finite floats (an undefined AUPRO is NaN) are written as null in report.json so that any JSON
parser reads it, and as "n/a" in report.md.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from musc_stream.service.sinks.alert_picture import BAND, TEXT, ColourScale, fit_text, colour_bar, font, overlay

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("auroc", "ap", "f1_max")
PIXEL_KEYS = ("auroc", "ap", "f1_max", "aupro")
_HEADERS = {"auroc": "AUROC", "ap": "AP", "f1_max": "F1-max", "aupro": "AUPRO"}
GRID_TILE_HEIGHT = 200  # px of each grid tile's image; its width follows the image's aspect ratio


def write_report(out_dir: Path, result: dict[str, Any]) -> tuple[Path, Path]:
    """Write out_dir/report.json and out_dir/report.md for one evaluation run; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(_finite_or_none(result), indent=2, allow_nan=False) + "\n")
    md_path.write_text(_markdown(result))
    logger.info("report written to %s and %s", json_path, md_path)
    return json_path, md_path


@dataclass
class GridItem:
    """One evaluated image for the heatmap grid and the score table."""

    image: np.ndarray | Image.Image  # the image at its own aspect ratio (any size)
    heatmap: np.ndarray  # (h, w) anomaly map, e.g. at the model's S×S; stretched back over the image
    mask: np.ndarray | None  # (H, W) bool ground truth at the image's size, or None
    name: str  # e.g. "crack/exp1_num_123"
    label: int  # 0 normal, 1 defective
    defect_type: str
    score: float


def verdict(score: float, threshold: float | None) -> str:
    """'alerted' (score > threshold), 'not alerted', or 'n/a' without a threshold."""
    return "n/a" if threshold is None else ("alerted" if score > threshold else "not alerted")


def _outline(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    small = np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    return small & ~ndimage.binary_erosion(small, iterations=2)


def _tile(item: GridItem, scale: ColourScale, threshold: float | None, height: int, text_px: int) -> Image.Image:
    image = np.asarray(item.image.convert("RGB") if isinstance(item.image, Image.Image) else item.image)
    h, w = image.shape[:2]
    size = (max(1, round(w * height / h)), height)  # the image's own aspect ratio
    picture = np.array(overlay(image, item.heatmap, scale, size))
    if item.mask is not None:
        picture[_outline(item.mask, size)] = (0, 255, 0)  # ground truth: green outline
    said = verdict(item.score, threshold)
    wrong = {(0, "alerted"): " (false alarm)", (1, "not alerted"): " (missed)"}.get((item.label, said), "")
    lines = [(item.name, TEXT),
             (f"score {item.score:.4f}" + ("" if threshold is None else f" / T {threshold:.4f}"), TEXT),
             (said + wrong, (255, 90, 90) if wrong else (120, 230, 120))]
    text_font = font(text_px)
    line_h = round(text_px * 1.3)
    width = max(size[0], int(max(text_font.getlength(t) for t, _ in lines[1:])) + 6)
    tile = Image.new("RGB", (width, height + len(lines) * line_h + 4), BAND)
    tile.paste(Image.fromarray(picture), (0, 0))
    draw = ImageDraw.Draw(tile)
    for i, (text, colour) in enumerate(lines):
        draw.text((2, height + 2 + i * line_h), fit_text(text, text_font, width - 4), fill=colour, font=text_font)
    return tile


def write_heatmap_grid(path: Path, rows: Sequence[tuple[str, Sequence[GridItem]]], threshold: float | None,
                       title: str = "", tile_height: int = GRID_TILE_HEIGHT) -> Path:
    """PNG of labelled rows (e.g. "normal", then one per defect type) of tiles: each image at its own
    aspect ratio with its heatmap on the alert pictures' colour scale (SCALE_LOW..SCALE_HIGH ×
    ``threshold``, the same for every tile), the ground truth outlined in green, and its score,
    the threshold and the verdict (alerted / not, and whether that was a false alarm or a miss)
    below it. A colour bar with the threshold marked sits on the right."""
    rows = [(label, list(items)) for label, items in rows if items]
    if not rows:
        raise ValueError("no items to draw")
    everything = [item for _, items in rows for item in items]
    scale = ColourScale.for_threshold(threshold, np.concatenate([np.ravel(i.heatmap) for i in everything]))
    text_px = max(10, tile_height // 16)
    gap = text_px // 2
    drawn = [(label, [_tile(item, scale, threshold, tile_height, text_px) for item in items]) for label, items in rows]
    label_h = round(text_px * 1.6)
    heading = [title] if title else []
    top = len(heading) * label_h + gap
    grid_w = max(sum(t.width for t in tiles) + gap * (len(tiles) + 1) for _, tiles in drawn)
    row_h = [label_h + max(t.height for t in tiles) + gap for _, tiles in drawn]
    bar = colour_bar(scale, min(sum(row_h), 3 * tile_height), text_px)
    out = Image.new("RGB", (grid_w + bar.width, top + sum(row_h)), BAND)
    draw, text_font = ImageDraw.Draw(out), font(text_px)
    for i, text in enumerate(heading):
        draw.text((gap, gap + i * label_h), fit_text(text, text_font, out.width - 2 * gap), fill=TEXT, font=text_font)
    y = top
    for (label, tiles), height in zip(drawn, row_h):
        draw.text((gap, y), label, fill=TEXT, font=text_font)
        x = gap
        for tile in tiles:
            out.paste(tile, (x, y + label_h))
            x += tile.width + gap
        y += height
    out.paste(bar, (grid_w, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, format="PNG", compress_level=3)
    logger.info("heatmap grid of %d images written to %s", len(everything), path)
    return path


SCORE_TABLE_COLUMNS = ("image", "label", "defect_type", "score", "threshold", "verdict")


def write_score_table(path: Path, items: Sequence[tuple[str, int, str, float]], threshold: float | None) -> Path:
    """CSV of every evaluated image: image, label (normal / defective), defect type, score, threshold,
    verdict (alerted / not alerted / n/a). items: (image, label 0/1, defect type, score)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(SCORE_TABLE_COLUMNS)
        for image, label, defect_type, score in items:
            writer.writerow([image, "defective" if label else "normal", defect_type, f"{score:.6f}",
                             "" if threshold is None else f"{threshold:.6f}", verdict(score, threshold)])
    return path


def _finite_or_none(value: Any) -> Any:
    """Copy of a JSON-like value with NaN/inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _percent(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.2f}"


def _metric_cells(entry: dict[str, Any]) -> list[str]:
    image, pixel = entry.get("image", {}), entry.get("pixel", {})
    return [_percent(image, key) for key in IMAGE_KEYS] + [_percent(pixel, key) for key in PIXEL_KEYS]


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# musc-stream evaluation report",
        "",
        f"- Backbone: `{result['backbone']}` (weights: `{result['weights']}`)",
        f"- Seed: {result['seed']}",
        f"- Split: {result['split']}",
        "",
        "## Settings",
        "",
        "| Setting | Value |",
        "|---|---|",
    ]
    lines += [f"| {name} | `{value}` |" for name, value in result["settings"].items()]
    header = ["Category", "Images", "Anomalous"]
    header += [f"Image {_HEADERS[key]}" for key in IMAGE_KEYS] + [f"Pixel {_HEADERS[key]}" for key in PIXEL_KEYS]
    lines += [
        "",
        "## Results (×100)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for category, entry in result["categories"].items():
        cells = [category, str(entry["n_images"]), str(entry["n_anomalous"])] + _metric_cells(entry)
        lines.append("| " + " | ".join(cells) + " |")
    n_images = sum(entry["n_images"] for entry in result["categories"].values())
    n_anomalous = sum(entry["n_anomalous"] for entry in result["categories"].values())
    mean_cells = ["**mean**", str(n_images), str(n_anomalous)] + _metric_cells(result["mean"])
    lines.append("| " + " | ".join(mean_cells) + " |")
    rules = {category: entry["mask_rule"] for category, entry in result["categories"].items() if "mask_rule" in entry}
    if rules:
        lines += ["", "Ground-truth masks (at S×S):", ""]
        lines += [f"- {category}: {rule}" for category, rule in rules.items()]
    windows = {category: entry["rscin_windows"] for category, entry in result["categories"].items()
               if "rscin_windows" in entry}
    if windows:
        lines += ["", "RsCIN windows per category (0 = RsCIN off):", ""]
        lines += [f"- {category}: `{value}`" for category, value in windows.items()]
    timings = result["timings"]
    lines += [
        "",
        "## Timings",
        "",
        f"- Feature extraction: {timings['extract_s_per_image']:.4f} s per image",
        f"- Scoring: {timings['score_s_per_image']:.4f} s per image",
        f"- Total: {timings['total_s']:.1f} s",
        "",
    ]
    return "\n".join(lines)
