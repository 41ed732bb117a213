"""The hindsight ceiling of benchmarks/bench_threshold.py: a rule fitted on all of a line's normal
scores, held constant, against the best fixed threshold with the same false alarms."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_threshold  # noqa: E402


def _line(normals: np.ndarray, defects: np.ndarray, window: int = 4) -> dict:
    scores = np.concatenate([normals, defects])
    labels = [0] * len(normals) + [1] * len(defects)
    n = len(scores)
    return {"score": scores.tolist(), "labels": labels, "window_size": [window] * n, "memory_scored": [True] * n}


def test_a_constant_far_above_the_normals_loses_the_defects_just_above_them():
    rng = np.random.default_rng(0)
    normals = rng.normal(1.0, 0.01, 400)
    near = normals.max() + np.linspace(0.001, 0.02, 10)  # caught by a threshold at the normals' max
    far = np.full(10, 2.0)  # caught by any sensible threshold
    line = _line(normals, np.concatenate([near, far]))
    strict = bench_threshold.hindsight_constant([line], {"method": "mad", "k_mad": 8.0}, window=4)
    assert strict["false_alarms"] == 0
    assert strict["fixed_caught"] == 20  # the fixed threshold sits at the largest normal score
    assert strict["caught"] == 10 and strict["recall_vs_fixed"] == 0.5


def test_a_constant_at_the_normals_edge_matches_the_fixed_threshold():
    normals = np.linspace(0.0, 1.0, 300)
    line = _line(normals, np.full(5, 3.0))
    edge = bench_threshold.hindsight_constant([line], {"method": "quantile", "quantile_margin": 0.0}, window=4)
    assert edge["caught"] == 5 and edge["fixed_caught"] == 5 and edge["recall_vs_fixed"] == 1.0
    assert edge["false_alarms"] <= 2
