"""Per-line adaptive decision threshold from the robust spread of recent normal image scores."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Mapping

import numpy as np

# 1.4826 · MAD estimates σ for normal data, so k_mad reads as "standard deviations".
_MAD_TO_SIGMA = 1.4826
# Floor on the σ estimate, relative to |median| and absolute: identical scores (MAD 0) would
# otherwise flag any frame a rounding error above them.
_SIGMA_FLOOR_ABS = 1e-6
_STATE_VERSION = 1


class AdaptiveThreshold:
    """threshold = median + k_mad · 1.4826 · MAD over the last `history` scores judged normal.

    Zero-shot scores are relative (a line's normal level depends on product, lighting, backbone), so
    each line learns its own level. Until `warmup_frames` normal scores exist, `value` is `default`;
    with default None the line is undecided: decide() says False and is_warm is False, so results
    should carry `warmup`. An override fixes the value for good (it never adapts).

    Anomalous frames do not enter the history, so a run of defects cannot drag the threshold up to
    meet them. The price: if the line's normal level moves up for good (new product, new lighting),
    every frame is flagged and the history never follows. The cure is the changeover path: the
    engine calls reset() on a product change (explicit reset message or detected drift), and the
    threshold warms up again on the new level.

    Not thread-safe: one thread (the engine's) owns a threshold.
    """

    def __init__(
        self,
        k_mad: float = 4.0,
        warmup_frames: int = 10,
        history: int = 200,
        default: float | None = None,
        override: float | None = None,
        sigma_floor_fraction: float = 1e-3,
    ) -> None:
        """k_mad: distance above the median in robust σ. warmup_frames: normal scores needed before
        the threshold adapts. history: how many recent normal scores it remembers. default: value
        during warm-up (None = undecided). override: fixed value. sigma_floor_fraction: lower bound
        on the σ estimate as a fraction of |median|, so a near-constant line still needs a real
        excursion (0.1 % of its level by default) to be flagged."""
        if not k_mad > 0:
            raise ValueError(f"k_mad must be > 0, got {k_mad}")
        if warmup_frames < 1:
            raise ValueError(f"warmup_frames must be >= 1, got {warmup_frames}")
        if history < warmup_frames:
            raise ValueError(f"history ({history}) must be >= warmup_frames ({warmup_frames})")
        if sigma_floor_fraction < 0:
            raise ValueError(f"sigma_floor_fraction must be >= 0, got {sigma_floor_fraction}")
        for name, given in (("default", default), ("override", override)):
            if given is not None and not math.isfinite(given):
                raise ValueError(f"{name} must be finite or None, got {given}")
        self.k_mad = float(k_mad)
        self.warmup_frames = int(warmup_frames)
        self.history = int(history)
        self.default = None if default is None else float(default)
        self.override = None if override is None else float(override)
        self.sigma_floor_fraction = float(sigma_floor_fraction)
        self._scores: deque[float] = deque(maxlen=self.history)
        self._adaptive: float | None = None  # cached median + k·σ, None when stale or cold

    def __len__(self) -> int:
        """Normal scores currently in the history."""
        return len(self._scores)

    @property
    def is_warm(self) -> bool:
        """True once the value no longer depends on warm-up (enough history, or an override)."""
        return self.override is not None or len(self._scores) >= self.warmup_frames

    @property
    def value(self) -> float | None:
        """Current threshold in score units; None while warming up without a default."""
        if self.override is not None:
            return self.override
        if len(self._scores) < self.warmup_frames:
            return self.default
        if self._adaptive is None:
            scores = np.fromiter(self._scores, dtype=np.float64, count=len(self._scores))
            median = float(np.median(scores))
            mad = float(np.median(np.abs(scores - median)))
            sigma = max(_MAD_TO_SIGMA * mad, self.sigma_floor_fraction * abs(median), _SIGMA_FLOOR_ABS)
            self._adaptive = median + self.k_mad * sigma
        return self._adaptive

    def decide(self, score: float) -> bool:
        """Is this image score anomalous? score > value; always False while value is None."""
        score = _finite(score)
        threshold = self.value
        return threshold is not None and score > threshold

    def update(self, score: float, is_anomaly: bool) -> None:
        """Record a scored frame; only frames judged normal enter the history (see class doc)."""
        score = _finite(score)
        if is_anomaly:
            return
        self._scores.append(score)
        self._adaptive = None

    def reset(self) -> None:
        """Forget the history (product changeover); warm-up starts again. Override and default stay."""
        self._scores.clear()
        self._adaptive = None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able settings and history, for persistence across restarts."""
        return {
            "version": _STATE_VERSION,
            "k_mad": self.k_mad,
            "warmup_frames": self.warmup_frames,
            "history": self.history,
            "default": self.default,
            "override": self.override,
            "sigma_floor_fraction": self.sigma_floor_fraction,
            "scores": list(self._scores),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore only the history from a state_dict(), keeping this object's settings (today's
        config). Scores beyond this object's history length are dropped, oldest first."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"threshold state version {state.get('version')!r} != {_STATE_VERSION}")
        scores = [_finite(s) for s in state["scores"]]
        self._scores = deque(scores, maxlen=self.history)
        self._adaptive = None

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> AdaptiveThreshold:
        """Rebuild a threshold with the settings and history of a state_dict()."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"threshold state version {state.get('version')!r} != {_STATE_VERSION}")
        threshold = cls(
            k_mad=state["k_mad"],
            warmup_frames=state["warmup_frames"],
            history=state["history"],
            default=state["default"],
            override=state["override"],
            sigma_floor_fraction=state["sigma_floor_fraction"],
        )
        threshold.load_state_dict(state)
        return threshold


def _finite(score: float) -> float:
    """Scores must be finite: a NaN in the history would turn every later threshold into NaN."""
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(f"score must be finite, got {score}")
    return score
