"""Tests of musc_stream/threshold.py: warm-up, robust adaptation, override, persistence."""

import json
import math

import numpy as np
import pytest

from musc_stream.threshold import AdaptiveThreshold


def _warmed(seed=0, n=200, **settings):
    threshold = AdaptiveThreshold(**settings)
    for score in np.random.default_rng(seed).normal(1.0, 0.01, n):
        threshold.update(score, threshold.decide(score))
    return threshold


def test_warmup_returns_default():
    undecided = AdaptiveThreshold(warmup_frames=5)
    assert undecided.value is None
    assert not undecided.decide(1e9)  # no threshold yet: nothing is flagged
    with_default = AdaptiveThreshold(warmup_frames=5, default=0.5)
    for i in range(4):
        assert with_default.value == 0.5
        assert not with_default.is_warm
        with_default.update(0.1, is_anomaly=False)
        undecided.update(0.1, is_anomaly=False)
    assert with_default.decide(0.6) and not with_default.decide(0.4)
    with_default.update(0.1, is_anomaly=False)
    assert with_default.is_warm
    assert with_default.value != 0.5
    assert undecided.value is None
    undecided.update(0.1, is_anomaly=False)
    assert undecided.value is not None


def test_flags_outlier_on_normal_scores():
    threshold = _warmed()
    assert threshold.is_warm
    # median + 6·σ with σ ≈ 0.01
    assert 1.03 < threshold.value < 1.09
    assert threshold.decide(2.0)
    assert not threshold.decide(1.01)


def test_anomalies_stay_out_of_history():
    threshold = _warmed()
    before = threshold.value
    for _ in range(500):
        threshold.update(2.0, is_anomaly=True)
    assert threshold.value == before
    assert len(threshold) == 200
    # The same scores judged normal would move it: shows update() really feeds the history.
    for _ in range(150):
        threshold.update(2.0, is_anomaly=False)
    assert threshold.value > 1.5


def test_history_is_bounded_and_follows_recent_scores():
    threshold = AdaptiveThreshold(warmup_frames=3, history=20)
    for score in np.linspace(0.0, 1.0, 20):
        threshold.update(score, is_anomaly=False)
    old = threshold.value
    for score in np.linspace(10.0, 11.0, 20):
        threshold.update(score, is_anomaly=False)
    assert len(threshold) == 20
    assert threshold.value > 10.5 > old


def test_override_is_fixed():
    threshold = AdaptiveThreshold(override=0.7, warmup_frames=3, default=0.1)
    assert threshold.is_warm
    assert threshold.value == 0.7
    for score in np.random.default_rng(1).normal(5.0, 0.1, 50):
        threshold.update(score, is_anomaly=False)
    assert threshold.value == 0.7
    assert threshold.decide(0.71) and not threshold.decide(0.69)


def test_reset_restarts_warmup():
    threshold = _warmed(warmup_frames=10)
    threshold.reset()
    assert len(threshold) == 0
    assert not threshold.is_warm
    assert threshold.value is None


def test_state_round_trip():
    threshold = _warmed(k_mad=4.0, warmup_frames=7, history=50, default=3.0)
    state = json.loads(json.dumps(threshold.state_dict()))  # really JSON-able
    restored = AdaptiveThreshold.from_state_dict(state)
    assert restored.value == threshold.value
    assert restored.k_mad == 4.0 and restored.history == 50 and restored.default == 3.0
    assert len(restored) == 50
    # load_state_dict keeps today's settings and takes only the history.
    today = AdaptiveThreshold(k_mad=4.0, warmup_frames=7, history=30, override=None)
    today.load_state_dict(state)
    assert len(today) == 30
    assert today.history == 30
    with pytest.raises(ValueError, match="version"):
        AdaptiveThreshold.from_state_dict({**state, "version": 99})


def test_constant_scores_never_nan():
    threshold = AdaptiveThreshold(warmup_frames=3)
    for _ in range(10):
        threshold.update(0.5, is_anomaly=False)
    assert math.isfinite(threshold.value)
    assert threshold.value > 0.5  # MAD is 0; the floor keeps the threshold above the level
    assert not threshold.decide(0.5)
    assert not threshold.decide(0.5001)  # rounding-size excursions: the relative floor (0.1 % · 6)
    assert threshold.decide(0.6)
    zero = AdaptiveThreshold(warmup_frames=3)
    for _ in range(5):
        zero.update(0.0, is_anomaly=False)
    assert math.isfinite(zero.value) and zero.value > 0.0
    assert not zero.decide(0.0)


def test_rejects_non_finite_scores():
    threshold = AdaptiveThreshold()
    with pytest.raises(ValueError):
        threshold.update(float("nan"), is_anomaly=False)
    with pytest.raises(ValueError):
        threshold.decide(float("inf"))
    assert len(threshold) == 0
