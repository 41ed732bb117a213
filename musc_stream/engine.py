"""Streaming MuSc: per-line rolling window, patch memory and threshold, and the scoring step.

How a frame is scored (our streaming design; batch mode lives in model/batch.py):
- The backbone runs once per micro-batch over frames of all lines. Each frame's tapped tokens go
  through LNAMD, giving one unit-norm feature set per (layer, r), exactly as batch MuSc.
- Window score: for each set, the nearest-patch distance to every frame in the line's window, then
  the interval average over the smallest 30 % (MSM with the window as "the other images").
- Memory score: per set, the distance to the nearest patch in the line's FAISS memory of patches
  from frames judged normal (a long memory that outlives the window).
- ``score_mode`` picks window, memory or combined (mean of the two maps when the memory holds
  patches). Image score = max of the patch map upsampled to S×S, as in batch MuSc. RsCIN needs the
  whole batch, so streaming skips it. ``musc-stream eval --stream`` measures the choices.
- Warm-up: a line holds its first frames until ``min_references`` exist, then scores them with
  batch MuSc among themselves (``warmup: true``), so no score is ever NaN.
- Changeover: a line resets on an explicit command, or when ``drift_patience`` consecutive frames
  look unlike every frame in the window (image-feature cosine drift), and says so in the result.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from musc_stream.model.backbone import Backbone
from musc_stream.model.memory import MemoryMismatchError, PatchMemory
from musc_stream.model.musc import (
    aligned_nearest_distances,
    interval_average,
    lnamd,
    mutual_scores,
    nearest_distances,
    upsample_maps,
)
from musc_stream.records import Decision, Frame
from musc_stream.regions import find_regions
from musc_stream.threshold import AdaptiveThreshold

logger = logging.getLogger(__name__)

ScoreMode = Literal["window", "memory", "combined"]
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, decoupled from how settings are read."""

    window_size: int = 16
    min_references: int = 5
    r_list: tuple[int, ...] = (1, 3, 5)
    topmin_max: float = 0.3
    score_mode: ScoreMode = "combined"
    aligned: bool = False
    aligned_radius: int = 1
    drift_threshold: float | None = 0.25  # 1 − best cosine to the window; None disables detection
    drift_patience: int = 3
    memory_enabled: bool = True
    memory_r_list: tuple[int, ...] = (3,)  # LNAMD degrees whose sets enter the memory (cost ∝ sets)
    memory_max_patches: int = 20_000
    memory_patches_per_frame: int = 256
    memory_max_age_s: float = 3600.0
    memory_k: int = 1
    memory_use_gpu: bool | None = None
    threshold_k_mad: float = 4.0
    threshold_warmup: int = 10
    threshold_history: int = 200
    threshold_default: float | None = None
    threshold_overrides: dict[str, float] = field(default_factory=dict)
    distance_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not set(self.memory_r_list) <= set(self.r_list):
            raise ValueError(f"memory r_list {self.memory_r_list} must be a subset of r_list {self.r_list}")
        if self.min_references > self.window_size:
            raise ValueError("min_references must not exceed window_size")

    @classmethod
    def from_settings(cls, settings) -> "EngineConfig":
        """Build from the service's ``Settings`` (config.py)."""
        e, m, t, mo = settings.engine, settings.memory, settings.threshold, settings.model
        use_gpu = None if str(m.use_gpu) == "auto" else bool(m.use_gpu)
        dtypes = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
        return cls(
            window_size=e.window_size, min_references=e.min_references,
            r_list=tuple(mo.r_list), topmin_max=mo.topmin_max, score_mode=e.score_mode,
            aligned=e.aligned, aligned_radius=e.aligned_radius, drift_threshold=e.drift_threshold,
            memory_enabled=m.enabled, memory_r_list=tuple(m.r_list), memory_max_patches=m.max_patches_per_line,
            memory_patches_per_frame=m.patches_per_frame, memory_max_age_s=m.max_age_s,
            memory_k=m.k, memory_use_gpu=use_gpu, threshold_k_mad=t.k_mad,
            threshold_warmup=t.warmup_frames, threshold_history=t.history,
            threshold_default=t.default_threshold, threshold_overrides=dict(t.overrides),
            distance_dtype=dtypes[str(mo.distance_dtype)],
        )


@dataclass
class _Embedded:
    """One frame after the backbone and LNAMD."""

    frame: Frame
    sets: dict[str, torch.Tensor]  # set key → (L, C) unit-norm features
    image_feature: torch.Tensor  # (D,) unit-norm, for drift detection
    backbone_s: float
    queued_s: float


class _Window:
    """Ring buffer of the last ``capacity`` frames' feature sets: key → (capacity, L, C)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.buffers: dict[str, torch.Tensor] = {}
        self.image_features: torch.Tensor | None = None  # (capacity, D)
        self.count = 0
        self._next = 0

    def __len__(self) -> int:
        return self.count

    def add(self, sets: dict[str, torch.Tensor], image_feature: torch.Tensor) -> None:
        if not self.buffers:
            self.buffers = {k: v.new_zeros((self.capacity, *v.shape)) for k, v in sets.items()}
            self.image_features = image_feature.new_zeros((self.capacity, *image_feature.shape))
        for key, value in sets.items():
            self.buffers[key][self._next] = value
        self.image_features[self._next] = image_feature
        self._next = (self._next + 1) % self.capacity
        self.count = min(self.capacity, self.count + 1)

    def references(self, key: str) -> torch.Tensor:
        return self.buffers[key][: self.count]  # (W, L, C); order does not matter to MSM

    def best_similarity(self, image_feature: torch.Tensor) -> float:
        if self.count == 0:
            return 1.0
        return float((self.image_features[: self.count] @ image_feature).max())


class LineState:
    """Window, memory, threshold and warm-up queue of one production line."""

    def __init__(self, line: str, config: EngineConfig, memory_metadata: dict[str, str | int]):
        self.line = line
        self.config = config
        self.window = _Window(config.window_size)
        self.pending: list[_Embedded] = []  # held during warm-up
        self.memory: PatchMemory | None = None
        self._memory_metadata = memory_metadata
        override = config.threshold_overrides.get(line)
        self.threshold = AdaptiveThreshold(
            k_mad=config.threshold_k_mad, warmup_frames=config.threshold_warmup,
            history=config.threshold_history, default=config.threshold_default, override=override,
        )
        self.drift_run = 0
        self.changeover_pending = False

    def ensure_memory(self, sets: dict[str, np.ndarray]) -> PatchMemory:
        if self.memory is None:
            dims = {k: int(v.shape[-1]) for k, v in sets.items()}
            self.memory = PatchMemory(
                dims, max_patches=self.config.memory_max_patches,
                patches_per_frame=self.config.memory_patches_per_frame,
                max_age_s=self.config.memory_max_age_s, use_gpu=self.config.memory_use_gpu,
                metadata=self._memory_metadata,
            )
        return self.memory

    @property
    def memory_size(self) -> int:
        return len(self.memory) if self.memory is not None else 0

    def reset(self) -> None:
        self.window = _Window(self.config.window_size)
        self.pending.clear()
        if self.memory is not None:
            self.memory.clear()
        self.threshold.reset()
        self.drift_run = 0
        self.changeover_pending = True


class Engine:
    """Scores micro-batches of frames from any lines; owns every line's state. Not thread-safe:
    one thread (the GPU thread) calls it."""

    def __init__(self, backbone: Backbone, config: EngineConfig = EngineConfig(), clock=time.time):
        self.backbone = backbone
        self.config = config
        self.clock = clock
        self.lines: dict[str, LineState] = {}
        self._memory_metadata = {
            "backbone": backbone.spec.name, "weights": backbone.weights_label,
            "image_size": backbone.image_size, "layers": ",".join(map(str, backbone.layers)),
            "r_list": ",".join(map(str, config.memory_r_list)),
        }

    # -- state -----------------------------------------------------------------------------
    def line(self, line: str) -> LineState:
        if line not in self.lines:
            self.lines[line] = LineState(line, self.config, self._memory_metadata)
        return self.lines[line]

    def reset(self, line: str) -> None:
        """Product changeover: forget the line's window, memory and threshold."""
        logger.info("line %s reset (changeover)", line)
        self.line(line).reset()

    # -- scoring ---------------------------------------------------------------------------
    def process(self, frames: list[Frame]) -> list[Decision]:
        """Score a micro-batch. Returns decisions for every frame scored now, which may include
        frames held from earlier calls (warm-up) and excludes frames held by this call."""
        if not frames:
            return []
        embedded = self._embed(frames)
        decisions: list[Decision] = []
        for item in embedded:  # arrival order: a frame's window holds the frames before it
            decisions.extend(self._score_one(item))
        return decisions

    def _embed(self, frames: list[Frame]) -> list[_Embedded]:
        start = time.perf_counter()
        started_at = self.clock()
        with torch.no_grad():
            features = self.backbone.embed([f.image for f in frames], batch_size=len(frames))
            sets_per_r = {
                f"l{li}_r{r}": lnamd(tokens, r)  # (N, L, C)
                for r in self.config.r_list
                for li, tokens in enumerate(features.patch_tokens)
            }
            image_features = F.normalize(features.image_features.float(), dim=-1)
        per_frame_s = (time.perf_counter() - start) / len(frames)
        return [
            _Embedded(
                frame=f,
                sets={k: v[i] for k, v in sets_per_r.items()},
                image_feature=image_features[i],
                backbone_s=per_frame_s,
                queued_s=max(0.0, started_at - f.received_at),
            )
            for i, f in enumerate(frames)
        ]

    def _score_one(self, item: _Embedded) -> list[Decision]:
        state = self.line(item.frame.line)
        changeover = self._check_drift(state, item)
        if len(state.window) < self.config.min_references:
            state.pending.append(item)
            if len(state.window) + len(state.pending) < self.config.min_references:
                return []  # keep holding until min_references frames can score each other
            return self._score_warmup(state)
        start = time.perf_counter()
        window_map = self._window_map(state, item.sets)
        memory_map = self._memory_map(state, item.sets) if self.config.score_mode != "window" else None
        patch_map = self._combine(window_map, memory_map)
        decision = self._decide(state, item, patch_map, window_map, memory_map, warmup=False,
                                scoring_s=time.perf_counter() - start)
        decision.changeover = changeover
        self._remember(state, item, decision)
        return [decision]

    def _score_warmup(self, state: LineState) -> list[Decision]:
        """Batch MuSc among the held frames (the window is empty during warm-up), then move them
        into the window."""
        start = time.perf_counter()
        held = state.pending
        state.pending = []
        maps = [
            mutual_scores(torch.stack([h.sets[key] for h in held]), self.config.topmin_max,
                          distance_dtype=self.config.distance_dtype)  # (P, L)
            for key in held[0].sets
        ]
        patch_maps = torch.stack(maps).mean(0)  # (P, L)
        scoring_s = (time.perf_counter() - start) / len(held)
        decisions = []
        changeover = state.changeover_pending
        state.changeover_pending = False
        for i, item in enumerate(held):
            decision = self._decide(state, item, patch_maps[i], patch_maps[i], None, warmup=True,
                                    scoring_s=scoring_s)
            decision.changeover = changeover and i == 0
            decision.window_size = len(held) - 1
            decisions.append(decision)
        for item, decision in zip(held, decisions):
            self._remember(state, item, decision)
        return decisions

    def _window_map(self, state: LineState, sets: dict[str, torch.Tensor]) -> torch.Tensor:
        per_set = []
        for key, feats in sets.items():
            refs = state.window.references(key)  # (W, L, C)
            if self.config.aligned:
                dist = aligned_nearest_distances(feats[None], refs, self.config.aligned_radius)
            else:
                dist = nearest_distances(feats[None], refs, distance_dtype=self.config.distance_dtype)
            per_set.append(interval_average(dist[0], self.config.topmin_max))  # (L,)
        return torch.stack(per_set).mean(0)

    def _memory_sets(self, sets: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The feature sets the memory keeps, as CPU arrays for FAISS."""
        keep = tuple(f"_r{r}" for r in self.config.memory_r_list)
        return {k: v.detach().float().cpu().numpy() for k, v in sets.items() if k.endswith(keep)}

    def _memory_map(self, state: LineState, sets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Nearest-patch distance to the line's memory, once the memory holds at least as many
        frames as the window: a memory of one or two frames only adds noise to the score."""
        if not self.config.memory_enabled or state.memory_size == 0:
            return None
        state.memory.expire(self.clock())
        num_patches = next(iter(sets.values())).shape[0]
        per_frame = min(num_patches, self.config.memory_patches_per_frame)
        if len(state.memory) < len(state.window) * per_frame:
            return None
        arrays = self._memory_sets(sets)
        score = state.memory.score(arrays, k=self.config.memory_k)
        return torch.as_tensor(score, dtype=torch.float32, device=next(iter(sets.values())).device)

    def _combine(self, window_map: torch.Tensor, memory_map: torch.Tensor | None) -> torch.Tensor:
        mode = self.config.score_mode
        if memory_map is None or mode == "window":
            return window_map
        if mode == "memory":
            return memory_map
        return 0.5 * (window_map + memory_map)

    def _check_drift(self, state: LineState, item: _Embedded) -> bool:
        """Count consecutive frames unlike the whole window; reset the line after ``patience``."""
        limit = self.config.drift_threshold
        if limit is None or len(state.window) < self.config.min_references:
            return False
        drift = 1.0 - state.window.best_similarity(item.image_feature)
        state.drift_run = state.drift_run + 1 if drift > limit else 0
        if state.drift_run < self.config.drift_patience:
            return False
        logger.warning("line %s: %d frames drifted (%.3f > %.3f), assuming product changeover",
                       state.line, state.drift_run, drift, limit)
        state.reset()
        return True

    def _decide(self, state, item, patch_map, window_map, memory_map, *, warmup, scoring_s) -> Decision:
        frame = item.frame
        side = int(round(patch_map.numel() ** 0.5))
        grid = patch_map.reshape(1, side, side).double()
        s = self.backbone.image_size
        score = float(upsample_maps(grid, (s, s)).max())
        window_score = float(window_map.max()) if window_map is not None else None
        memory_score = float(memory_map.max()) if memory_map is not None else None
        threshold = state.threshold.value
        is_anomaly = state.threshold.decide(score)
        state.threshold.update(score, is_anomaly)
        heatmap, regions = None, []
        if is_anomaly:
            h, w = frame.image.shape[:2]
            heatmap = upsample_maps(grid, (h, w))[0].float().cpu().numpy()
            regions = find_regions(heatmap, threshold)
        return Decision(
            line=frame.line, frame_id=frame.frame_id, ts=frame.ts, score=score,
            threshold=threshold, is_anomaly=is_anomaly, warmup=warmup or not state.threshold.is_warm,
            window_score=window_score, memory_score=memory_score, regions=regions, heatmap=heatmap,
            image=frame.image if is_anomaly else None,
            window_size=len(state.window), memory_size=state.memory_size, camera=frame.camera,
            received_at=frame.received_at, decided_at=self.clock(),
            latency_s={"decode": frame.decode_s, "queue": item.queued_s,
                       "backbone": item.backbone_s, "scoring": scoring_s},
            model=f"{self.backbone.spec.name}@{self.backbone.image_size}",
            weights=self.backbone.weights_label, ack=frame.ack,
        )

    def _remember(self, state: LineState, item: _Embedded, decision: Decision) -> None:
        """Every frame joins the window (MSM tolerates a few defects there); only frames judged
        normal with a known threshold feed the long memory."""
        state.window.add(item.sets, item.image_feature)
        if (self.config.memory_enabled and self.config.score_mode != "window" and not decision.is_anomaly
                and state.threshold.value is not None and not decision.warmup):
            arrays = self._memory_sets(item.sets)
            state.ensure_memory(arrays).add(arrays, decision.ts)

    def _feature_dims(self) -> dict[str, int]:
        """Width of every feature set, from one forward pass of a blank image."""
        blank = np.zeros((self.backbone.image_size, self.backbone.image_size, 3), np.uint8)
        tokens = self.backbone.embed([blank], batch_size=1).patch_tokens
        return {f"l{li}_r{r}": int(t.shape[-1]) for r in self.config.memory_r_list for li, t in enumerate(tokens)}

    # -- persistence -----------------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        """Write each line's memory and threshold so a restart does not forget."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, state in self.lines.items():
            line_dir = directory / _SAFE_NAME.sub("_", name)
            line_dir.mkdir(exist_ok=True)
            if state.memory is not None and len(state.memory):
                state.memory.save(line_dir / "memory")
            tmp = line_dir / "threshold.json.tmp"
            tmp.write_text(json.dumps({"line": name, "threshold": state.threshold.state_dict()}))
            tmp.replace(line_dir / "threshold.json")
        logger.info("saved state of %d line(s) to %s", len(self.lines), directory)

    def load_state(self, directory: Path) -> list[str]:
        """Load what save_state wrote; a snapshot from another model is refused and skipped."""
        loaded = []
        if not directory.is_dir():
            return loaded
        for line_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
            meta_file = line_dir / "threshold.json"
            if not meta_file.exists():
                continue
            saved = json.loads(meta_file.read_text())
            state = self.line(saved["line"])
            state.threshold.load_state_dict(saved["threshold"])  # settings from config, history from disk
            if (line_dir / "memory").exists() and self.config.memory_enabled:
                try:
                    state.memory = PatchMemory.load(
                        line_dir / "memory", self._memory_metadata, dims=self._feature_dims(),
                        max_patches=self.config.memory_max_patches,
                        patches_per_frame=self.config.memory_patches_per_frame,
                        max_age_s=self.config.memory_max_age_s, use_gpu=self.config.memory_use_gpu,
                    )
                    state.memory.expire(self.clock())
                except (MemoryMismatchError, ValueError, OSError) as exc:  # start fresh, say why
                    logger.warning("line %s: memory snapshot not loaded: %s", saved["line"], exc)
            state.changeover_pending = False
            loaded.append(saved["line"])
        logger.info("loaded state of %d line(s) from %s", len(loaded), directory)
        return loaded
