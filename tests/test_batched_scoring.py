"""Batched scoring equals serial scoring: the same frames of several lines, one at a time and in
micro-batches, give the same decisions and leave the same line state. Random tiny backbone (the
weights do not matter for equality) on real texture photos from scikit-image."""

import numpy as np
import pytest
import torch
from skimage import data

from musc_stream.service.config import settings_with
from musc_stream.stream.engine import Engine
from musc_stream.model import stream_scorer
from musc_stream.model.backbone import BackboneSpec, load_backbone
from musc_stream.model.musc import interval_average, nearest_distances
from musc_stream.stream.records import Frame


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BackboneSpec(name="random-vit-tiny", pretrained=None, image_size=112))


def crops(texture, n, seed, defects=frozenset(), size=160):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y, x = rng.integers(0, texture.shape[0] - size, 2)
        img = np.stack([texture[y:y + size, x:x + size]] * 3, -1).copy() if texture.ndim == 2 \
            else texture[y:y + size, x:x + size].copy()
        if i in defects:
            img[60:100, 60:100] = 255
        out.append(img)
    return out


def stream():
    """Three lines interleaved: "a" with painted defects; "b" with one odd frame (an outlier that
    ends its own drift run) and later a product change (a drift run long enough for a changeover);
    "c" joins late, so its warm-up falls inside later micro-batches."""
    a = crops(data.brick(), 26, seed=0, defects={14, 20})
    b = crops(data.brick(), 26, seed=1)
    grass = crops(data.grass(), 6, seed=2)
    b[12] = grass[0]  # one frame unlike the window: a drift suspect, then the run ends
    b[18:22] = grass[1:5]  # four in a row: a changeover, the rest seeds the new window
    c = crops(data.gravel(), 14, seed=3)
    frames = []
    for i in range(26):
        frames.append(("a", i, a[i]))
        frames.append(("b", i, b[i]))
        if i >= 12:
            frames.append(("c", i, c[i - 12]))
    return [Frame(line=line, frame_id=f"{line}{i}", ts=1_000_000.0 + i, image=img, received_at=1_000_000.0)
            for line, i, img in frames]


SETTINGS = settings_with(engine={"window_size": 6, "min_references": 3, "drift_patience": 3},
                         memory={"patches_per_frame": 10},
                         threshold={"min_history": 4, "method": "mad", "k_mad": 3.0})


def decide(backbone, frames, batch, settings=SETTINGS):
    engine = Engine(backbone, settings, clock=Clock())
    decisions = []
    for start in range(0, len(frames), batch):
        decisions.extend(engine.process(frames[start:start + batch]))
    return engine, decisions


@pytest.mark.parametrize("batch", [4, 8])
def test_batched_decisions_equal_serial_ones(backbone, batch):
    frames = stream()
    serial_engine, serial = decide(backbone, frames, 1)
    engine, batched = decide(backbone, frames, batch)
    assert [d.frame_id for d in batched] == [d.frame_id for d in serial]
    for s, b in zip(serial, batched):
        assert b.score == pytest.approx(s.score, abs=1e-5), s.frame_id
        assert b.window_score == pytest.approx(s.window_score, abs=1e-5)
        assert (b.memory_score is None) == (s.memory_score is None)
        if s.memory_score is not None:
            assert b.memory_score == pytest.approx(s.memory_score, abs=1e-5)
        same = ("is_anomaly", "warmup", "threshold", "drift_suspected", "changeover", "window_size", "memory_size")
        assert {k: getattr(b, k) for k in same} == pytest.approx({k: getattr(s, k) for k in same}, abs=1e-5), s.frame_id
    # the stream covers what it is meant to: warm-up, alerts, memory joined, drift, a changeover
    assert any(d.warmup for d in serial) and any(d.is_anomaly for d in serial)
    assert any(d.memory_score is not None for d in serial)
    assert sum(d.drift_suspected for d in serial) >= 4 and sum(d.changeover for d in serial if d.line == "b") >= 1
    for name, state in serial_engine.lines.items():
        other = engine.lines[name]
        assert other.window.tags == state.window.tags and len(other.window) == len(state.window)
        for key, buf in state.window.buffers.items():
            assert torch.equal(other.window.buffers[key], buf)
        assert len(other.memory) == len(state.memory)
        mine, theirs = other.threshold.state_dict(), state.threshold.state_dict()
        assert np.allclose(mine.pop("scores"), theirs.pop("scores"), atol=1e-5) and mine == theirs
    # most window maps came from the batched plan, some were recomputed after a frame stayed out
    assert engine.window_paths["planned"] > len(frames) // 2
    if batch >= 8:  # a line's drift suspect and its next frame in one batch
        assert engine.window_paths["recomputed"] >= 1


def test_window_maps_match_the_serial_formula():
    """One line's pool, three frames with different causal masks: each map equals MSM against
    exactly the references its mask names."""
    torch.manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s), dim=-1)  # noqa: E731
    window, batch = unit(5, 16, 8), unit(3, 16, 8)
    pool = torch.cat([window, batch])
    dist = stream_scorer.pool_distances([batch], [pool])[None]  # (S=1, G=1, B, L, P)
    masks = [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]  # frame 2: frame 1 stayed out, slot 0 overwritten
    maps = stream_scorer.window_maps(dist, [(0, 0), (0, 1), (0, 2)], masks, 0.3)
    for b, refs in enumerate(masks):
        want = interval_average(nearest_distances(batch[b:b + 1], pool[refs])[0], 0.3)
        assert torch.allclose(maps[b], want, atol=1e-6)


def test_lines_in_one_padded_matmul_equal_each_line_alone():
    torch.manual_seed(1)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s), dim=-1)  # noqa: E731
    queries, pools = [unit(1, 9, 4), unit(3, 9, 4)], [unit(6, 9, 4), unit(2, 9, 4)]
    together = stream_scorer.pool_distances(queries, pools, block_bytes=4096)  # several pool blocks
    for g, (q, p) in enumerate(zip(queries, pools)):
        alone = nearest_distances(q, p)
        assert torch.allclose(together[g, : q.shape[0], :, : p.shape[0]], alone, atol=1e-6)


def test_float16_window_scores_close_and_halves_the_bytes(backbone):
    frames = [f for f in stream() if f.line == "a"]
    full, full_decisions = decide(backbone, frames, 8)
    half, half_decisions = decide(backbone, frames, 8, settings_with(SETTINGS, engine={"window_dtype": "float16"}))
    assert half.lines["a"].window.nbytes * 2 == full.lines["a"].window.nbytes
    diff = max(abs(a.score - b.score) for a, b in zip(full_decisions, half_decisions))
    assert 0 < diff < 1e-2  # rounded, not equal; real-weight numbers in benchmarks/results/batched.md


def test_window_dtype_comes_from_the_settings_and_is_checked(backbone):
    from musc_stream.service.config import load_settings
    settings = load_settings(None, env={"MUSC_ENGINE__WINDOW_DTYPE": "bfloat16"}, overrides={})
    assert Engine(backbone, settings).line("a").window.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="window_dtype"):
        settings_with(engine={"window_dtype": "int8"})


def test_causal_distances_equal_the_full_ones_where_a_frame_may_look():
    torch.manual_seed(2)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s), dim=-1)  # noqa: E731
    frames = [unit(5, 9, 4), unit(3, 9, 4)]
    full = stream_scorer.pool_distances(frames, frames)
    causal = stream_scorer.pool_distances(frames, frames, causal=True)
    for b in range(5):
        assert torch.allclose(causal[:, b, :, :b], full[:, b, :, :b], atol=1e-6)  # every earlier frame, both lines
