"""`musc-stream demo` end to end, as README's first command runs it (fewer frames)."""

import json
import os
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

pytestmark = pytest.mark.integration


def test_demo_leaves_results_alerts_heatmaps_audit_and_summary(tmp_path, magnetic_tile):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "musc_stream.cli", "--log-level", "WARNING", "demo", "--out", str(out),
         "--frames", "30", "--data", str(magnetic_tile)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["results"] == 30 and summary["errors"] == 2
    assert "real magnetic-tile frames" in summary["source"]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["line"] for r in results} == {"tile-a", "tile-b"}
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["reason"] for e in errors} == {"corrupt_image", "unsupported_format"}
    alerts = sorted(p.stem for p in (out / "alerts").glob("*.json"))
    assert alerts == sorted(p.stem for p in (out / "heatmaps").glob("*.png"))
    assert len(alerts) == summary["alerts"] == sum(r["is_anomaly"] for r in results)
    rows = ds.dataset(out / "audit", format="parquet", partitioning="hive").to_table().to_pylist()
    assert len(rows) == 32 and sum(r["error_reason"] is not None for r in rows) == 2
    assert "musc_frames_scored_total" in (out / "metrics.txt").read_text()
    assert "| tile-a |" in (out / "summary.md").read_text()
