"""Tests of musc_stream/evaluation/report.py: report.json round trip, Markdown table, heatmap grid PNG."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from musc_stream.evaluation.report import GRID_TILE_HEIGHT, GridItem, verdict, write_heatmap_grid, write_report, \
    write_score_table


def _result(aupro=0.9345):
    return {
        "settings": {"img_size": 518, "r_list": [1, 3, 5], "topmin_max": 0.3},
        "backbone": "ViT-L-14-336",
        "weights": "openai",
        "seed": 42,
        "split": "40 MT_Free + 10 defective (stratified), seed 42",
        "categories": {
            "magnetic_tile": {
                "image": {"auroc": 0.97771, "ap": 0.991, "f1_max": 0.975},
                "pixel": {"auroc": 0.973, "ap": 0.627, "f1_max": 0.626, "aupro": aupro},
                "n_images": 50,
                "n_anomalous": 10,
            },
            "bottle": {
                "image": {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0},
                "pixel": {"auroc": 0.98, "ap": 0.83, "f1_max": 0.79, "aupro": 0.96},
                "n_images": 83,
                "n_anomalous": 63,
            },
        },
        "mean": {
            "image": {"auroc": 0.98886, "ap": 0.9955, "f1_max": 0.9875},
            "pixel": {"auroc": 0.9765, "ap": 0.7285, "f1_max": 0.708, "aupro": 0.94726},
        },
        "timings": {"extract_s_per_image": 0.125, "score_s_per_image": 0.0625, "total_s": 25.0},
    }


def test_report_json_round_trip(tmp_path):
    result = _result()
    json_path, md_path = write_report(tmp_path / "run", result)
    assert json_path == tmp_path / "run" / "report.json" and md_path == tmp_path / "run" / "report.md"
    assert json.loads(json_path.read_text()) == result


def test_report_json_writes_nan_as_null(tmp_path):
    json_path, md_path = write_report(tmp_path, _result(aupro=float("nan")))
    loaded = json.loads(json_path.read_text())  # strict JSON: no NaN token
    assert "NaN" not in json_path.read_text()
    assert loaded["categories"]["magnetic_tile"]["pixel"]["aupro"] is None
    assert "n/a" in md_path.read_text()


def test_report_markdown_table(tmp_path):
    _, md_path = write_report(tmp_path, _result())
    text = md_path.read_text()
    lines = text.splitlines()
    assert "ViT-L-14-336" in text and "openai" in text and "seed 42" in text
    header = next(line for line in lines if line.startswith("| Category"))
    assert header.count("|") == 11  # 10 columns
    row = next(line for line in lines if line.startswith("| magnetic_tile"))
    assert row.split(" | ")[1:] == ["50", "10", "97.77", "99.10", "97.50", "97.30", "62.70", "62.60", "93.45 |"]
    mean = next(line for line in lines if line.startswith("| **mean**"))
    assert "98.89" in mean and "94.73" in mean and "| 133 | 73 |" in mean
    assert "0.1250 s per image" in text and "0.0625 s per image" in text
    assert "| topmin_max | `0.3` |" in text
    assert "Ground-truth masks" not in text  # no category states a rule


def test_report_markdown_says_how_masks_were_binarised(tmp_path):
    from musc_stream.evaluation.datasets import MASK_RULES

    result = _result()
    result["categories"]["magnetic_tile"]["mask_rule"] = f"magnetic_tile: {MASK_RULES['magnetic_tile']}"
    result["categories"]["bottle"]["mask_rule"] = f"mvtec: {MASK_RULES['mvtec']}"
    lines = write_report(tmp_path, result)[1].read_text().splitlines()
    rules = lines[lines.index("Ground-truth masks (at S×S):") + 2:][:2]
    assert rules[0].startswith("- magnetic_tile: magnetic_tile: ") and ">= 128" in rules[0]
    assert rules[1].startswith("- bottle: mvtec: ") and "still at 255" in rules[1]


def test_report_markdown_lists_rscin_windows_per_category(tmp_path):
    result = _result()
    result["categories"]["magnetic_tile"]["rscin_windows"] = [0]
    result["categories"]["bottle"]["rscin_windows"] = [1, 2, 3]
    text = write_report(tmp_path, result)[1].read_text()
    assert "- magnetic_tile: `[0]`" in text and "- bottle: `[1, 2, 3]`" in text


def _items(magnetic_tile, rng):
    """Real tiles at their own (non-square) sizes with smooth maps at a model's 16×16."""
    items = []
    for kind, label in (("MT_Free", 0), ("MT_Free", 0), ("MT_Crack", 1), ("MT_Break", 1), ("MT_Break", 1)):
        path = sorted((magnetic_tile / kind / "Imgs").glob("*.jpg"))[len(items) % 2]
        image = Image.open(path).convert("RGB")
        mask = None if label == 0 else np.asarray(Image.open(path.with_suffix(".png")).convert("L")) >= 128
        items.append(GridItem(np.asarray(image), rng.random((16, 16)) * (0.3 + 0.4 * label), mask,
                              f"{kind}/{path.stem}", label, kind.removeprefix("MT_").lower(), 0.3 + 0.4 * label))
    return items


def test_heatmap_grid_keeps_aspect_ratios_and_has_normal_and_defect_rows(tmp_path, magnetic_tile):
    items = _items(magnetic_tile, np.random.default_rng(0))
    rows = [("normal", items[:2]), ("defect: crack", items[2:3]), ("defect: break", items[3:])]
    path = write_heatmap_grid(tmp_path / "grid" / "heatmaps.png", rows, threshold=0.5, title="tiles")
    with Image.open(path) as png:
        assert png.format == "PNG"
        grid = np.asarray(png.convert("RGB"))
    # each row: a label line, tiles of GRID_TILE_HEIGHT px whose widths follow the images' aspect ratios
    widths = [round(np.asarray(i.image).shape[1] * GRID_TILE_HEIGHT / np.asarray(i.image).shape[0]) for i in items]
    assert len(set(widths)) > 1  # the tiles are not squares
    assert grid.shape[1] >= max(sum(widths[:2]), sum(widths[3:]))
    assert (np.all(grid == (0, 255, 0), axis=-1)).any()  # ground-truth outlines of the defects


def test_tile_verdicts_and_score_table(tmp_path):
    assert verdict(0.6, 0.5) == "alerted" and verdict(0.5, 0.5) == "not alerted" and verdict(0.6, None) == "n/a"
    path = write_score_table(tmp_path / "scores.csv", [("MT_Free/Imgs/a.jpg", 0, "good", 0.61),
                                                       ("MT_Crack/Imgs/b.jpg", 1, "crack", 0.42)], 0.5)
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["image", "label", "defect_type", "score", "threshold", "verdict"]
    assert rows[1] == ["MT_Free/Imgs/a.jpg", "normal", "good", "0.610000", "0.500000", "alerted"]
    assert rows[2][1:] == ["defective", "crack", "0.420000", "0.500000", "not alerted"]


def test_heatmap_grid_rejects_nothing_to_draw(tmp_path):
    with pytest.raises(ValueError):
        write_heatmap_grid(tmp_path / "g.png", [("normal", [])], 0.5)
