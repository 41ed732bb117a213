"""Tests of the streaming engine with a small random backbone (weights do not matter here) and
real texture photos from scikit-image."""

import json
import math
import time

import numpy as np
import pytest
from skimage import data

from musc_stream.model.backbone import BackboneSpec, load_backbone
from musc_stream.service.config import settings_with
from musc_stream.stream.engine import Engine
from musc_stream.stream.records import Frame


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BackboneSpec(name="random-vit-tiny", pretrained=None, image_size=112))


def crops(texture: np.ndarray, n: int, seed: int, defects: set[int] = frozenset(), size: int = 160):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y, x = rng.integers(0, texture.shape[0] - size, 2)
        img = np.stack([texture[y:y + size, x:x + size]] * 3, -1).copy()
        if i in defects:
            img[60:100, 60:100] = 255
        out.append(img)
    return out


def frames_for(line, images, start=0):
    now = time.time()
    return [Frame(line=line, frame_id=str(start + i), ts=now + i, image=img, received_at=now)
            for i, img in enumerate(images)]


def run(engine, frames):
    decisions = []
    for f in frames:
        decisions.extend(engine.process([f]))
    return decisions


def test_warmup_holds_first_frames_then_scores_all_without_nan(backbone):
    engine = Engine(backbone, settings_with(engine={"window_size": 8, "min_references": 5}))
    frames = frames_for("a", crops(data.brick(), 7, seed=0))
    assert engine.process(frames[:4]) == []  # held: not enough references yet
    held = engine.process(frames[4:5])
    assert [d.frame_id for d in held] == ["0", "1", "2", "3", "4"]
    assert all(d.warmup and math.isfinite(d.score) for d in held)
    later = engine.process(frames[5:6])
    assert later[0].window_size == 5 and later[0].frame_id == "5"


def test_painted_defect_scores_highest_and_gets_regions(backbone):
    settings = settings_with(engine={"window_size": 8, "min_references": 5},
                             threshold={"min_history": 5, "k_mad": 3.0, "method": "mad"})
    engine = Engine(backbone, settings)
    images = crops(data.brick(), 24, seed=1, defects={20})
    decisions = run(engine, frames_for("a", images))
    scores = {d.frame_id: d.score for d in decisions}
    assert max(scores, key=scores.get) == "20"
    defect = next(d for d in decisions if d.frame_id == "20")
    assert defect.is_anomaly and defect.heatmap.shape == (160, 160)
    box = defect.regions[0]
    assert box.x0 < 100 and box.x1 > 60 and box.y0 < 100 and box.y1 > 60  # overlaps the painted square


def test_memory_holds_only_frames_judged_normal(backbone):
    # drift off: with random weights a painted 6 % square moves the whole mean patch token (changeover.py)
    settings = settings_with(engine={"window_size": 6, "min_references": 5, "drift_threshold": None}, memory={"patches_per_frame": 10},
                             threshold={"min_history": 5, "k_mad": 3.0, "method": "mad"})
    engine = Engine(backbone, settings)
    decisions = run(engine, frames_for("a", crops(data.brick(), 24, seed=2, defects={18, 21})))
    normal = [d for d in decisions if not d.is_anomaly]
    anomalous = [d for d in decisions if d.is_anomaly]
    state = engine.lines["a"]
    # Every frame judged normal feeds the memory, warm-up frames too unless they stand out among
    # the warm-up's own scores; no alerted frame ever does.
    assert state.memory_size % 10 == 0
    assert len(normal) - 3 <= state.memory_size // 10 <= len(normal) < len(decisions)
    assert anomalous and {"18", "21"} & {d.frame_id for d in anomalous}  # painted defects alerted
    assert any(d.memory_score is not None for d in decisions)


def test_window_mode_never_builds_a_memory(backbone):
    engine = Engine(backbone, settings_with(engine={"window_size": 6, "score_mode": "window"},
                                            threshold={"min_history": 5}))
    decisions = run(engine, frames_for("a", crops(data.brick(), 16, seed=3)))
    assert engine.lines["a"].memory is None
    assert all(d.memory_score is None for d in decisions)


def test_lines_are_independent_and_reset_starts_over(backbone):
    engine = Engine(backbone, settings_with(engine={"window_size": 6, "min_references": 5}))
    run(engine, frames_for("a", crops(data.brick(), 8, seed=4)))
    run(engine, frames_for("b", crops(data.grass(), 3, seed=4)))
    assert len(engine.lines["a"].window) == 6 and len(engine.lines["b"].pending) == 3
    engine.reset("a")
    assert len(engine.lines["a"].window) == 0
    out = run(engine, frames_for("a", crops(data.brick(), 5, seed=5), start=100))
    assert [d.changeover for d in out] == [True, False, False, False, False]
    assert all(d.warmup for d in out)


def test_drift_to_another_product_triggers_changeover(backbone):
    engine = Engine(backbone, settings_with(engine={"window_size": 8, "min_references": 5, "drift_threshold": 3.0,
                                                    "drift_patience": 3}))
    run(engine, frames_for("a", crops(data.brick(), 10, seed=6)))
    after = run(engine, frames_for("a", crops(data.gravel(), 8, seed=6), start=10))
    assert any(d.changeover for d in after)


def test_aligned_mode_scores_and_flags_the_defect(backbone):
    engine = Engine(backbone, settings_with(engine={"window_size": 8, "aligned": True, "aligned_radius": 1},
                                            threshold={"min_history": 5}))
    images = crops(data.brick(), 16, seed=7, defects={14})
    decisions = run(engine, frames_for("a", images))
    scores = {d.frame_id: d.score for d in decisions}
    assert max(scores, key=scores.get) == "14"


def test_state_round_trip_restores_memory_and_threshold(backbone, tmp_path):
    settings = settings_with(engine={"window_size": 6}, memory={"patches_per_frame": 16},
                             threshold={"min_history": 5})
    engine = Engine(backbone, settings)
    run(engine, frames_for("line-1", crops(data.brick(), 20, seed=8)))
    before = engine.lines["line-1"]
    engine.save_state(tmp_path)
    fresh = Engine(backbone, settings)
    assert fresh.load_state(tmp_path) == ["line-1"]
    after = fresh.lines["line-1"]
    assert after.memory_size == before.memory_size > 0
    assert after.threshold.value == pytest.approx(before.threshold.value)


def test_state_from_another_model_is_refused(backbone, tmp_path):
    settings = settings_with(engine={"window_size": 6}, memory={"patches_per_frame": 16},
                             threshold={"min_history": 5})
    engine = Engine(backbone, settings)
    run(engine, frames_for("x", crops(data.brick(), 16, seed=9)))
    engine.save_state(tmp_path)
    other = load_backbone(BackboneSpec(name="random-vit-tiny", pretrained=None, image_size=128))
    fresh = Engine(other, settings)
    fresh.load_state(tmp_path)
    assert fresh.lines["x"].memory is None  # image size differs: the snapshot is not trusted


def test_engine_reads_its_areas_of_the_settings(backbone):
    import torch

    settings = settings_with(engine={"window_size": 6, "feedback_frames": 3, "feedback_max_bytes": 1000,
                                     "window_dtype": "float16"},
                             memory={"r_list": (1,), "patches_per_frame": 16},
                             model={"r_list": (1, 3)}, threshold={"method": "quantile", "overrides": {"b": 0.5}})
    engine = Engine(backbone, settings, keep_maps=True)
    a, b = engine.line("a"), engine.line("b")
    assert (a.recent.max_frames, a.recent.max_bytes, a.window.dtype) == (3, 1000, torch.float16)
    assert a.threshold.method == "quantile" and a.threshold.override is None and b.threshold.override == 0.5
    images = crops(data.brick(), 7, seed=14)
    sets = engine._embed(frames_for("a", images[:1]))[0].sets
    assert {k.split("_")[1] for k in sets} == {"r1", "r3"}  # model.r_list
    assert {k.split("_")[1] for k in engine._memory_keys(sets)} == {"r1"}  # memory.r_list
    assert all(d.patch_map is not None for d in run(engine, frames_for("a", images)))  # keep_maps
    assert all(d.patch_map is None for d in run(Engine(backbone, settings), frames_for("a", images)))


def test_memory_degrees_must_be_scored_degrees():
    with pytest.raises(ValueError, match="memory.r_list"):
        settings_with(model={"r_list": (1, 3)}, memory={"r_list": (5,)})


@pytest.mark.parametrize("damage", [
    "threshold_truncated", "threshold_not_json", "threshold_no_line", "manifest_garbage",
    "segment_missing", "segment_truncated", "segment_bit_flip", "live_rows_in_no_segment",
])
def test_a_damaged_snapshot_is_set_aside_and_the_line_starts_fresh(backbone, tmp_path, damage):
    """No snapshot can stop the service from starting: with no intact snapshot left, the damaged
    folder is moved aside, the other lines load, and the damaged line starts fresh."""
    settings = settings_with(engine={"window_size": 6}, memory={"patches_per_frame": 16},
                             threshold={"min_history": 5})
    engine = Engine(backbone, settings)
    run(engine, frames_for("good", crops(data.brick(), 14, seed=10)))
    run(engine, frames_for("bad", crops(data.brick(), 14, seed=11)))
    engine.save_state(tmp_path)
    from musc_stream.stream.engine import state_dir_name

    bad = tmp_path / state_dir_name("bad")
    threshold = bad / "threshold.json"
    manifest = next(bad.glob("manifest-*.json"))
    segment = next(bad.glob("seg-*.bin"))
    if damage == "threshold_truncated":
        threshold.write_text(threshold.read_text()[:30])
    elif damage == "threshold_not_json":
        threshold.write_bytes(b"\x00\xff garbage")
    elif damage == "threshold_no_line":
        threshold.write_text('{"threshold": {}}')
    elif damage == "manifest_garbage":
        manifest.write_text("[1, 2")
    elif damage == "segment_missing":
        segment.unlink()
    elif damage == "segment_truncated":
        segment.write_bytes(segment.read_bytes()[:100])
    elif damage == "segment_bit_flip":
        raw = bytearray(segment.read_bytes())
        raw[-5] ^= 0x10
        segment.write_bytes(bytes(raw))
    elif damage == "live_rows_in_no_segment":
        meta = json.loads(manifest.read_text())
        meta["live"][-1][1] += 7
        meta["num_live"] += 7
        manifest.write_text(json.dumps(meta))
    fresh = Engine(backbone, settings)
    assert fresh.load_state(tmp_path) == ["good"]
    assert fresh.lines["good"].memory_size > 0
    assert "bad" not in fresh.lines  # starts fresh on its next frame
    assert not bad.exists() and len(list(tmp_path.glob(f"{bad.name}.damaged-*"))) == 1
    assert run(fresh, frames_for("bad", crops(data.brick(), 5, seed=12)))  # and scores again


def test_a_threshold_of_another_version_is_relearnt_and_the_memory_kept(backbone, tmp_path):
    settings = settings_with(engine={"window_size": 6}, memory={"patches_per_frame": 16},
                             threshold={"min_history": 5})
    engine = Engine(backbone, settings)
    run(engine, frames_for("a", crops(data.brick(), 14, seed=13)))
    engine.save_state(tmp_path)
    from musc_stream.stream.engine import state_dir_name

    threshold = tmp_path / state_dir_name("a") / "threshold.json"
    saved = json.loads(threshold.read_text())
    saved["threshold"]["version"] = 0
    threshold.write_text(json.dumps(saved))
    fresh = Engine(backbone, settings)
    assert fresh.load_state(tmp_path) == ["a"]
    assert fresh.lines["a"].memory_size == engine.lines["a"].memory_size > 0
    assert len(fresh.lines["a"].threshold) == 0
