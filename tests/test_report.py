"""Tests of musc_stream/report.py: report.json round trip, Markdown table, heatmap grid PNG."""

import json

import numpy as np
import pytest
from PIL import Image

from musc_stream.report import write_heatmap_grid, write_report


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
    from musc_stream.datasets import MASK_RULES

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


@pytest.mark.parametrize("n_items, max_items, rows", [(3, 16, 3), (5, 2, 2)])
def test_heatmap_grid_rows(tmp_path, n_items, max_items, rows):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8) for _ in range(n_items)]
    images[0] = Image.fromarray(images[0]).convert("L")  # PIL input, grayscale
    maps = [rng.random((16, 16)) for _ in range(n_items)]
    masks = [rng.random((30, 40)) > 0.8 for _ in range(n_items)]
    masks[-1] = None  # normal image without mask
    titles = [f"img {i}" for i in range(n_items)]
    path = write_heatmap_grid(tmp_path / "grid" / "heatmaps.png", images, maps, masks, titles, max_items=max_items)
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = png.size
    assert height * 3 == pytest.approx(width * rows, abs=3)  # one square row of 3 cells per item


def test_heatmap_grid_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError):
        write_heatmap_grid(tmp_path / "g.png", [np.zeros((4, 4, 3), np.uint8)], [], [None], ["a"])
