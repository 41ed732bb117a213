"""Tests of musc_stream/stream/threshold.py: each method hits its target false-alarm rate on samples with
known quantiles (seeded), warm-up, robustness to defects under the threshold, overrides, persistence,
old state versions, guards (few excesses, constant and non-finite scores). Pure math: no models."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from musc_stream.stream.threshold import (
    DEFAULT_METHOD,
    METHODS,
    STATE_VERSION,
    AdaptiveThreshold,
    fit_gpd_pwm,
    gumbel_k,
    pot_quantile,
    student_k,
)


def _fed(scores, **settings):
    threshold = AdaptiveThreshold(**settings)
    for score in scores:
        threshold.update(score, is_anomaly=False)
    return threshold


def _exceedance_per_1000(method, dist, n, target=5.0, repeats=60, seed=0):
    """Mean share of fresh draws above the threshold fitted to n draws, per 1,000 (exact via sf)."""
    rng = np.random.default_rng(seed)
    rates = [dist.sf(_fed(dist.rvs(n, random_state=rng), method=method, history=n,
                          target_false_alarms_per_1000=target).value) for _ in range(repeats)]
    return 1000 * float(np.mean(rates))


@pytest.mark.parametrize("dist", [stats.expon(scale=0.05), stats.genpareto(0.2, scale=0.05),
                                  stats.norm(0.5, 0.02)], ids=["exponential", "gpd-0.2", "normal"])
def test_pot_hits_the_target_rate_on_known_tails(dist):
    # 1,000 scores, as the default history: within 40 % of the target (estimation noise) on average.
    assert 3.0 < _exceedance_per_1000("pot", dist, 1000) < 7.0
    assert 0.6 < _exceedance_per_1000("pot", dist, 1000, target=1.0) < 1.4


def test_pot_small_sample_correction_keeps_the_mean_rate_on_target():
    # A line's history right after a restart: 150 scores. Uncorrected, the fitted quantile's scatter
    # raises the mean rate ~1.5×; the correction brings it back.
    for dist in (stats.expon(scale=0.05), stats.gamma(4.0, scale=0.01)):
        corrected = _exceedance_per_1000("pot", dist, 150, repeats=150, seed=8)
        assert 3.5 < corrected < 6.5
    raw = np.mean([dist.sf(_fed(dist.rvs(150, random_state=np.random.default_rng(s)), method="pot", history=150,
                                small_sample_correction=False).value) for s in range(150)])
    assert 1000 * raw > corrected


def test_gumbel_hits_the_target_on_gumbel_scores_and_is_conservative_on_normal_ones():
    # An image score is a max over patches: Gumbel-like. k(5/1000) → 4.34 for many scores.
    assert gumbel_k(10**6, 0.005) == pytest.approx(4.335, abs=0.01)
    assert gumbel_k(10, 0.005) > gumbel_k(150, 0.005) > gumbel_k(10**6, 0.005)
    assert 3.5 < _exceedance_per_1000("gumbel", stats.gumbel_r(0.4, 0.03), 1000) < 6.5
    assert _exceedance_per_1000("gumbel", stats.norm(0.5, 0.02), 1000) < 0.5


def test_mad_hits_the_target_on_normal_scores_and_overshoots_on_skewed_ones():
    assert 3.5 < _exceedance_per_1000("mad", stats.norm(0.5, 0.02), 1000) < 6.5
    # The normal assumption is why mad is not the default: an exponential tail alarms ~16× too often.
    assert _exceedance_per_1000("mad", stats.expon(scale=0.05), 1000) > 40


def test_quantile_stays_under_the_target():
    for dist in (stats.expon(scale=0.05), stats.norm(0.5, 0.02)):
        assert _exceedance_per_1000("quantile", dist, 1000) < 5.0


def test_few_scores_use_a_wider_bound_not_a_tail_fit():
    scores = stats.expon(scale=0.05).rvs(15, random_state=np.random.default_rng(3))
    threshold = _fed(scores, method="pot", min_excesses=10)
    assert threshold.estimator == "mad (few scores)"  # 15 < 2 · 10: no tail yet
    median = np.median(scores)
    sigma = 1.4826 * np.median(np.abs(scores - median))
    assert threshold.value == pytest.approx(median + student_k(15, 0.005) * sigma)
    assert student_k(10, 0.005) > student_k(100, 0.005) > stats.norm.ppf(0.995)  # widens for few
    for _ in range(5):
        threshold.update(float(median), is_anomaly=False)
    assert threshold.estimator == "pot"
    assert pot_quantile(np.sort(scores), 0.005, 0.1, 10, (-0.5, 0.5)) is None


def test_gpd_fit_recovers_known_shapes_and_clips_wild_ones():
    rng = np.random.default_rng(4)
    for xi in (-0.3, 0.0, 0.3):
        sample = stats.genpareto(xi, scale=2.0).rvs(20_000, random_state=rng)
        fitted_xi, sigma = fit_gpd_pwm(sample, (-0.9, 0.9))
        assert fitted_xi == pytest.approx(xi, abs=0.05) and sigma == pytest.approx(2.0, rel=0.05)
    cauchy_like = stats.genpareto(1.5).rvs(500, random_state=rng)
    xi, sigma = fit_gpd_pwm(cauchy_like, (-0.5, 0.5))
    assert xi == 0.5 and sigma > 0 and math.isfinite(sigma)
    assert fit_gpd_pwm(np.zeros(12)) == (0.0, 0.0)


def test_exponential_case_matches_the_closed_form():
    # Excesses exactly exponential (ξ → 0): z = t − σ·ln(p·n/N_t).
    n, n_tail = 1000, 100
    body = np.linspace(0.0, 1.0, n - n_tail)
    tail = 1.0 + stats.expon(scale=0.1).ppf((np.arange(n_tail) + 0.5) / n_tail)
    z = pot_quantile(np.sort(np.concatenate([body, tail])), 0.005, 0.1, 10, (-0.5, 0.5))
    xi, sigma = fit_gpd_pwm(tail - 1.0)
    assert abs(xi) < 0.05
    assert z == pytest.approx(1.0 - 0.1 * math.log(0.005 * n / n_tail), rel=0.03)


def test_defects_slipping_under_do_not_push_it_up():
    rng = np.random.default_rng(5)
    normals = rng.gamma(4.0, 0.01, 300) + 0.4
    rise = {}
    for method in METHODS:
        threshold = _fed(normals, method=method)
        clean = threshold.value
        # Worst case: ten defects (3 % of the history), each just under the current threshold,
        # enter the history as normal.
        for _ in range(10):
            threshold.update(threshold.value * 0.999, is_anomaly=False)
        rise[method] = (threshold.value - clean) / (clean - np.median(normals))
    assert rise["mad"] < 0.1 and rise["gumbel"] < 0.1  # median and MAD barely notice
    assert rise["pot"] < 0.5  # the tail fit moves, bounded by the ξ clip
    assert rise["quantile"] > 2 * rise["pot"]  # the empirical quantile ratchets up with each one


def test_anomalies_stay_out_of_history():
    threshold = _fed(np.random.default_rng(0).normal(1.0, 0.01, 200))
    before = threshold.value
    for _ in range(500):
        threshold.update(2.0, is_anomaly=True)
    assert threshold.value == before and len(threshold) == 200
    for _ in range(300):  # the same scores judged normal do move it: update() feeds the history
        threshold.update(2.0, is_anomaly=False)
    assert threshold.value > 1.5


def test_warmup_returns_default_then_adapts():
    undecided = AdaptiveThreshold(min_history=5)
    assert undecided.value is None and not undecided.decide(1e9) and undecided.estimator == "default"
    with_default = AdaptiveThreshold(min_history=5, default=0.5)
    for _ in range(4):
        assert with_default.value == 0.5 and not with_default.is_warm
        with_default.update(0.1 + 0.01 * _, is_anomaly=False)
        undecided.update(0.1 + 0.01 * _, is_anomaly=False)
    assert with_default.decide(0.6) and not with_default.decide(0.4)
    with_default.update(0.12, is_anomaly=False)
    undecided.update(0.12, is_anomaly=False)
    assert with_default.is_warm and undecided.is_warm
    assert with_default.value == undecided.value != 0.5
    assert AdaptiveThreshold(warmup_frames=7).min_history == 7  # the engine's old keyword


def test_history_is_bounded_and_follows_recent_scores():
    threshold = _fed(np.linspace(0.0, 1.0, 50), min_history=3, history=50)
    old = threshold.value
    for score in np.linspace(10.0, 11.0, 50):
        threshold.update(score, is_anomaly=False)
    assert len(threshold) == 50 and threshold.value > 10.5 > old


def test_reset_restarts_warmup_and_keeps_settings():
    threshold = _fed(np.linspace(0.0, 1.0, 30), method="quantile", target_false_alarms_per_1000=2.0)
    threshold.reset()
    assert len(threshold) == 0 and not threshold.is_warm and threshold.value is None
    assert threshold.method == "quantile" and threshold.target_false_alarms_per_1000 == 2.0


def test_override_is_fixed():
    threshold = _fed(np.random.default_rng(1).normal(5.0, 0.1, 50), override=0.7, default=0.1)
    assert threshold.is_warm and threshold.value == 0.7 and threshold.estimator == "override"
    assert threshold.decide(0.71) and not threshold.decide(0.69)


def test_k_mad_as_set_is_todays_rule():
    scores = np.random.default_rng(2).normal(1.0, 0.01, 200)
    threshold = _fed(scores, method="mad", k_mad=4.0)
    median = np.median(scores)
    assert threshold.value == pytest.approx(median + 4.0 * 1.4826 * np.median(np.abs(scores - median)))


def test_target_rate_orders_the_thresholds():
    scores = stats.expon(scale=0.05).rvs(1000, random_state=np.random.default_rng(6))
    values = [_fed(scores, target_false_alarms_per_1000=r).value for r in (50.0, 5.0, 1.0)]
    assert values[0] < values[1] < values[2]


def test_state_round_trip():
    scores = np.random.default_rng(7).gamma(3.0, 0.02, 80)
    threshold = _fed(scores, method="pot", target_false_alarms_per_1000=2.0, min_history=7, history=50,
                     default=3.0, tail_fraction=0.2)
    state = json.loads(json.dumps(threshold.state_dict()))  # really JSON-able
    assert state["version"] == STATE_VERSION
    restored = AdaptiveThreshold.from_state_dict(state)
    assert restored.value == threshold.value and len(restored) == 50
    assert restored.settings() == threshold.settings()
    today = AdaptiveThreshold(history=30)  # load_state_dict keeps today's settings, takes the history
    today.load_state_dict(state)
    assert len(today) == 30 and today.history == 30 and today.method == DEFAULT_METHOD


def test_old_or_broken_state_starts_fresh_with_a_clear_error():
    version_1 = {"version": 1, "k_mad": 4.0, "warmup_frames": 10, "history": 200, "default": None,
                 "override": None, "sigma_floor_fraction": 1e-3, "scores": [0.5] * 50}
    threshold = _fed(np.linspace(0, 1, 40))
    with pytest.raises(ValueError, match="version 1 is not 2.*starts fresh"):
        threshold.load_state_dict(version_1)
    assert len(threshold) == 0 and threshold.value is None  # usable, warming up again
    threshold.update(0.3, is_anomaly=False)
    with pytest.raises(ValueError, match="version"):
        AdaptiveThreshold.from_state_dict(version_1)
    with pytest.raises(ValueError, match="no valid scores"):
        threshold.load_state_dict({"version": STATE_VERSION, "scores": [0.1, float("nan")]})
    assert len(threshold) == 0


def test_constant_scores_never_nan():
    for method in METHODS:
        threshold = _fed([0.5] * 30, method=method, min_history=3)
        assert math.isfinite(threshold.value) and threshold.value > 0.5, method
        assert not threshold.decide(0.5) and not threshold.decide(0.5001), method  # rounding size
        assert threshold.decide(0.6), method
        zero = _fed([0.0] * 30, method=method, min_history=3)
        assert math.isfinite(zero.value) and zero.value > 0.0 and not zero.decide(0.0), method


def test_rejects_non_finite_scores_and_bad_settings():
    threshold = AdaptiveThreshold()
    for bad in (float("nan"), float("inf"), "high"):
        with pytest.raises(ValueError, match="score must be"):
            threshold.update(bad, is_anomaly=False)
        with pytest.raises(ValueError, match="score must be"):
            threshold.decide(bad)
    assert len(threshold) == 0
    with pytest.raises(ValueError, match="method must be one of"):
        AdaptiveThreshold(method="spot")
    with pytest.raises(ValueError, match="target_false_alarms_per_1000"):
        AdaptiveThreshold(target_false_alarms_per_1000=0)
    with pytest.raises(ValueError, match="history"):
        AdaptiveThreshold(min_history=20, history=10)
    with pytest.raises(ValueError, match="override must be finite"):
        AdaptiveThreshold(override=float("nan"))
