"""Operator feedback in the engine, with a small random backbone (weights do not matter here) and
real texture photos from scikit-image: what "not a defect" and "defect" do to memory and threshold."""

import numpy as np
import pytest
from skimage import data

from musc_stream.model.backbone import BackboneSpec, load_backbone
from musc_stream.service.frames import is_valid_id
from musc_stream.service.ui.board import VERDICTS as PAGE_VERDICTS
from musc_stream.service.config import settings_with
from musc_stream.stream.engine import Engine
from musc_stream.stream.feedback import (ALREADY_NORMAL, APPLIED, RECORDED, UNKNOWN_FRAME, FeedbackError, RecentFrames,
                                         parse_payload)
from musc_stream.stream.feedback import VERDICTS

from tests.test_engine import crops, frames_for, run

PATCHES = 12


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BackboneSpec(name="random-vit-tiny", pretrained=None, image_size=112))


@pytest.fixture()
def alerted(backbone):
    """A line past warm-up with a painted defect alerted at frame 14 (mad, k = 3)."""
    settings = settings_with(engine={"window_size": 6, "min_references": 5}, memory={"patches_per_frame": PATCHES},
                             threshold={"min_history": 5, "method": "mad", "k_mad": 3.0})
    engine = Engine(backbone, settings, clock=lambda: 1_000.0)
    decisions = run(engine, frames_for("a", crops(data.brick(), 16, seed=2, defects={14})))
    alert = next(d for d in decisions if d.frame_id == "14")
    assert alert.is_anomaly and not alert.warmup
    return engine, decisions, alert


def test_not_defect_adds_the_frame_to_memory_and_threshold_history_once(alerted):
    engine, decisions, alert = alerted
    state = engine.lines["a"]
    memory, history = state.memory_size, len(state.threshold)
    result = engine.apply_feedback("a", "14", "not_defect")
    assert result.outcome == APPLIED and result.score == pytest.approx(alert.score)
    assert result.patches_added == PATCHES and result.threshold_history_added
    assert state.memory_size == memory + PATCHES
    assert len(state.threshold) == history + 1
    assert state.threshold._scores[-1] == pytest.approx(alert.score)
    assert state.memory.timestamps[-1] == 1_000.0  # the service clock, not the camera's
    again = engine.apply_feedback("a", "14", "not_defect")  # a second click adds nothing
    assert again.outcome == ALREADY_NORMAL
    assert state.memory_size == memory + PATCHES and len(state.threshold) == history + 1


def test_the_learnt_patches_are_the_frames_own(alerted, backbone):
    """After the verdict, the memory holds the frame's own patches (the subset the memory keeps of a
    frame, float16 in between): at those patches its memory distance drops to ~0."""
    engine, _, alert = alerted
    state = engine.lines["a"]
    image = crops(data.brick(), 16, seed=2, defects={14})[14]
    embedded = engine._embed(frames_for("a", [image], start=99))[0]
    before = state.memory.score(engine._memory_sets(embedded.sets), k=1)
    engine.apply_feedback("a", "14", "not_defect")
    distance = state.memory.score(engine._memory_sets(embedded.sets), k=1)
    assert int((before < 0.01).sum()) == 0
    assert int((distance < 0.01).sum()) >= PATCHES and alert.memory_score > 0.05


def test_not_defect_on_a_frame_judged_normal_changes_nothing(alerted):
    engine, decisions, _ = alerted
    normal = next(d for d in decisions if not d.is_anomaly and not d.warmup)
    state = engine.lines["a"]
    memory, history = state.memory_size, len(state.threshold)
    assert engine.apply_feedback("a", normal.frame_id, "not_defect").outcome == ALREADY_NORMAL
    assert (state.memory_size, len(state.threshold)) == (memory, history)


def test_defect_verdict_changes_nothing_and_keeps_the_frame_for_a_later_verdict(alerted):
    engine, _, _ = alerted
    state = engine.lines["a"]
    before = (state.memory_size, len(state.threshold), state.threshold.value)
    result = engine.apply_feedback("a", "14", "defect")
    assert result.outcome == RECORDED
    assert (state.memory_size, len(state.threshold), state.threshold.value) == before
    assert engine.apply_feedback("a", "14", "not_defect").outcome == APPLIED  # the operator changed their mind


def test_unknown_frames_reset_lines_and_unknown_lines_are_unknown_frame(alerted):
    engine, _, _ = alerted
    state = engine.lines["a"]
    before = (state.memory_size, len(state.threshold))
    assert engine.apply_feedback("a", "no-such-frame", "not_defect").outcome == UNKNOWN_FRAME
    assert engine.apply_feedback("other-line", "14", "defect").outcome == UNKNOWN_FRAME
    assert (state.memory_size, len(state.threshold)) == before
    engine.reset("a")  # a changeover: the old product's frames mean nothing now
    result = engine.apply_feedback("a", "14", "not_defect")
    assert result.outcome == UNKNOWN_FRAME and "not known" in result.detail
    assert state.memory_size == 0 and len(state.threshold) == 0


def test_warmup_outlier_gets_memory_but_never_threshold_history(backbone):
    """Warm-up scores are another regime: a verdict on a warm-up frame feeds only the memory."""
    settings = settings_with(engine={"window_size": 8, "min_references": 5}, memory={"patches_per_frame": PATCHES},
                             threshold={"min_history": 5})
    engine = Engine(backbone, settings)
    decisions = run(engine, frames_for("w", crops(data.brick(), 8, seed=3, defects={6})))
    state = engine.lines["w"]
    kept = [d.frame_id for d in decisions if state.recent.peek(d.frame_id) is not None]
    assert kept, "the painted warm-up frame should stand out and stay out of the memory"
    history = len(state.threshold)
    result = engine.apply_feedback("w", kept[0], "not_defect")
    assert result.outcome == APPLIED and result.patches_added == PATCHES and not result.threshold_history_added
    assert len(state.threshold) == history


def test_recent_frames_are_bounded_in_frames_and_bytes():
    sets = {"l0_r3": np.ones((16, 8), np.float32)}  # 256 bytes as float16
    ring = RecentFrames(max_frames=3, max_bytes=600)
    for i in range(5):
        ring.keep(str(i), float(i), sets, to_threshold=True)
    assert len(ring) == 2 and ring.nbytes == 512  # the byte bound bites before the frame bound
    assert ring.peek("2") is None and ring.peek("4").sets["l0_r3"].dtype == np.float16
    ring = RecentFrames(max_frames=3, max_bytes=10**6)
    for i in range(5):
        ring.keep(str(i), float(i), None, to_threshold=True)
    assert [f for f in map(str, range(5)) if ring.peek(f)] == ["2", "3", "4"]


def test_payloads_are_checked_with_one_clear_line():
    assert parse_payload(b'{"frame_id": "f1", "verdict": "normal", "user": "ana"}', is_valid_id) == \
        ("f1", "not_defect", None, "ana")
    for payload, words in [(b"not json", "not JSON"), (b"[1]", "JSON object"),
                           (b'{"verdict": "defect"}', "frame_id"),
                           (b'{"frame_id": "f", "verdict": "maybe"}', "not one of not_defect, defect"),
                           (b'{"frame_id": "f", "verdict": "defect", "source": 5}', "source")]:
        with pytest.raises(FeedbackError, match=words) as caught:
            parse_payload(payload, is_valid_id)
        assert "\n" not in str(caught.value)


def test_the_page_posts_the_verdicts_the_service_takes():
    assert tuple(PAGE_VERDICTS) == VERDICTS
