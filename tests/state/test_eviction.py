"""Idle-line eviction (engine.idle_evict_s) with a fake clock and the seeded random tiny ViT
(weights do not matter here): snapshotted, dropped from RAM, loaded back by its next frame."""

import numpy as np
import pytest
from skimage import data

from musc_stream.model.backbone import BackboneSpec, load_backbone
from musc_stream.state.store import SnapshotStore
from musc_stream.state.writer import SnapshotWriter
from musc_stream.service.config import settings_with
from musc_stream.stream.engine import Engine
from musc_stream.stream.records import Frame


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def _frames(line, n, seed, start=0):
    rng = np.random.default_rng(seed)
    brick = data.brick()
    out = []
    for i in range(n):
        y, x = rng.integers(0, brick.shape[0] - 96, 2)
        img = np.stack([brick[y:y + 96, x:x + 96]] * 3, -1).copy()
        out.append(Frame(line=line, frame_id=str(start + i), ts=0.0, image=img, received_at=0.0))
    return out


@pytest.mark.parametrize("background", [False, True])
def test_an_idle_line_is_evicted_and_its_next_frame_loads_it_back(tmp_path, background, caplog):
    backbone = load_backbone(BackboneSpec(name="random-vit-tiny", pretrained=None, image_size=64))
    clock = Clock()
    settings = settings_with(engine={"window_size": 6, "min_references": 5, "idle_evict_s": 600.0,
                                     "drift_threshold": None, "drift_ratio": None},
                             memory={"patches_per_frame": 8}, threshold={"min_history": 5})
    engine = Engine(backbone, settings, clock=clock)
    engine.load_state(tmp_path)
    if background:
        engine.writer = SnapshotWriter(engine.store).start()
    for f in _frames("idle", 10, seed=0) + _frames("busy", 6, seed=1):
        clock.now += 1.0
        engine.process([f])
    before = engine.lines["idle"]
    patches, scores = before.memory_size, list(before.threshold._scores)
    assert patches > 0
    clock.now += 300.0
    engine.process(_frames("busy", 1, seed=2, start=6))
    assert engine.evict_idle() == []  # 300 s idle: not yet
    clock.now += 400.0
    caplog.set_level("INFO")
    assert engine.evict_idle() == ["idle"]  # "busy" saw a frame 400 s ago
    assert "idle" not in engine.lines and "busy" in engine.lines
    assert "line idle evicted after 7" in caplog.text
    decisions = engine.process(_frames("idle", 1, seed=3, start=10))  # loads it back, transparently
    back = engine.lines["idle"]
    assert back is not before and back.memory_size == patches
    assert list(back.threshold._scores) == scores
    assert decisions == [] and len(back.pending) == 1  # its window warms up again, as after a restart
    if background:
        engine.writer.stop()
