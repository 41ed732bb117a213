"""Evaluation report files: report.json, report.md and the heatmap grid PNG. Formats only; no metric math.

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

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("auroc", "ap", "f1_max")
PIXEL_KEYS = ("auroc", "ap", "f1_max", "aupro")
_HEADERS = {"auroc": "AUROC", "ap": "AP", "f1_max": "F1-max", "aupro": "AUPRO"}
# Grid cells are square and of fixed size (no tight bbox), so the PNG is 3 cells wide and one cell
# tall per row: height / width = rows / 3.
GRID_CELL_INCHES = 2.5
GRID_DPI = 80
_GRID_COLUMNS = ("image", "heatmap", "mask")


def write_report(out_dir: Path, result: dict[str, Any]) -> tuple[Path, Path]:
    """Write out_dir/report.json and out_dir/report.md for one evaluation run; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(_finite_or_none(result), indent=2, allow_nan=False) + "\n")
    md_path.write_text(_markdown(result))
    logger.info("report written to %s and %s", json_path, md_path)
    return json_path, md_path


def write_heatmap_grid(
    path: Path,
    images: Sequence[np.ndarray | Image.Image],
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    titles: Sequence[str],
    max_items: int = 16,
) -> Path:
    """PNG with one row per item: image | heatmap over the image | ground-truth mask.

    images: (H, W, 3) uint8 arrays or PIL images; maps: (h, w) float anomaly maps, stretched over
    the image (they may be at the model's S×S); masks: (H', W') bool or None. The first max_items
    items are drawn. All heatmaps share one colour scale, so rows compare like the scores do.
    """
    n_items = len(images)
    if not (len(maps) == len(masks) == len(titles) == n_items):
        raise ValueError(
            f"images, maps, masks, titles differ in length: {n_items}, {len(maps)}, {len(masks)}, {len(titles)}"
        )
    if n_items == 0:
        raise ValueError("no items to draw")
    rows = min(n_items, max_items)
    shown_maps = [np.asarray(m, dtype=np.float64) for m in maps[:rows]]
    vmin = min(float(m.min()) for m in shown_maps)
    vmax = max(float(m.max()) for m in shown_maps)

    fig = Figure(figsize=(len(_GRID_COLUMNS) * GRID_CELL_INCHES, rows * GRID_CELL_INCHES))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, len(_GRID_COLUMNS), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.96, wspace=0.05, hspace=0.2)
    for row in range(rows):
        image = np.asarray(images[row].convert("RGB") if isinstance(images[row], Image.Image) else images[row])
        height, width = image.shape[:2]
        extent = (0, width, height, 0)  # stretch map and mask over the image's pixel grid
        ax_img, ax_map, ax_mask = axes[row]
        ax_img.imshow(image, extent=extent)
        ax_img.set_title(titles[row], fontsize=8)
        ax_map.imshow(image, extent=extent)
        ax_map.imshow(shown_maps[row], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax, extent=extent)
        ax_map.set_title(f"max {shown_maps[row].max():.3f}", fontsize=8)
        if masks[row] is None:
            ax_mask.text(0.5, 0.5, "no mask", ha="center", va="center", transform=ax_mask.transAxes)
        else:
            ax_mask.imshow(np.asarray(masks[row], dtype=np.float64), cmap="gray", vmin=0, vmax=1, extent=extent)
        for ax in (ax_img, ax_map, ax_mask):
            ax.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=GRID_DPI)
    logger.info("heatmap grid of %d of %d items written to %s", rows, n_items, path)
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
