"""The incremental snapshot store (state/store.py), its planner and budget (state/plan.py) and the
background writer (state/writer.py), on real files with random unit features (no backbone)."""

import threading

import numpy as np
import pytest

from musc_stream.model.memory import PatchMemory
from musc_stream.state.plan import LinePlan, SnapshotBudget, threshold_text
from musc_stream.state.store import SnapshotDamagedError, SnapshotStore, row_bytes
from musc_stream.state.writer import THREAD_NAME, SnapshotWriter

DIMS = {"l0_r3": 16, "l1_r3": 8}
META = {"backbone": "test", "image_size": 64}
SETTINGS = dict(max_patches=60, patches_per_frame=10, max_age_s=None)
ROW = row_bytes(DIMS)


def _frame(rng, n=16):
    out = {}
    for key, dim in DIMS.items():
        x = rng.normal(size=(n, dim)).astype(np.float32)
        out[key] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _memory(rng, frames, start=0.0):
    memory = PatchMemory(DIMS, metadata=META, use_gpu=False, **SETTINGS)
    for t in range(frames):
        memory.add(_frame(rng), start + t)
    return memory


def _plan(tmp_path, per_day=1e12):
    budget = SnapshotBudget(per_day, capacity=1e12, now=0.0)
    budget.tokens = 1e12 if per_day >= 1e12 else 0.0
    return LinePlan("a", tmp_path / "a", budget)


def _load(store, tmp_path):
    loaded = store.load(tmp_path / "a", DIMS, META)
    return loaded, PatchMemory.from_rows(loaded.rows, next_seq=loaded.next_seq, rng_state=loaded.rng_state,
                                         dims=DIMS, metadata=META, use_gpu=False, **SETTINGS)


def test_round_trip_gives_the_same_memory_after_drops(tmp_path):
    rng = np.random.default_rng(0)
    memory = _memory(rng, 9)  # 90 added, cap 60: the oldest 30 dropped
    store, plan = SnapshotStore(), _plan(tmp_path)
    store.write(plan.plan(threshold_text("a", {}), memory, 1.0, force=False))
    for t in range(9, 12):  # more rows, more drops, a second (incremental) snapshot
        memory.add(_frame(rng), float(t))
    store.write(plan.plan(threshold_text("a", {}), memory, 2.0, force=False))
    _, loaded = _load(store, tmp_path)
    np.testing.assert_array_equal(loaded.timestamps, memory.timestamps)
    np.testing.assert_array_equal(loaded.seqs, memory.seqs)
    query = _frame(rng, 20)
    for k in (1, 3):
        before, after = memory.search(query, k), loaded.search(query, k)
        for key in DIMS:
            np.testing.assert_array_equal(before[key], after[key])
    nxt = _frame(rng)  # the RNG goes on where it stopped: the same patches are picked next
    memory.add(nxt, 20.0)
    loaded.add(nxt, 20.0)
    np.testing.assert_array_equal(memory.score(query), loaded.score(query))


def test_only_new_rows_are_written_and_nothing_when_nothing_changed(tmp_path):
    rng = np.random.default_rng(1)
    memory = _memory(rng, 4)  # 40 rows, under the cap
    store, plan = SnapshotStore(), _plan(tmp_path)
    first = store.write(plan.plan(threshold_text("a", {}), memory, 1.0, force=False))
    assert first >= 40 * ROW
    memory.add(_frame(rng), 5.0)
    second = store.write(plan.plan(threshold_text("a", {}), memory, 2.0, force=False))
    assert 10 * ROW <= second < 10 * ROW + 8192  # the 10 new rows and a manifest, not 50 rows
    assert plan.plan(threshold_text("a", {}), memory, 3.0, force=False) is None  # clean: 0 bytes
    changed = plan.plan(threshold_text("a", {"scores": [0.1]}), memory, 4.0, force=False)
    assert changed.memory is None and changed.threshold is not None  # only the threshold is dirty


def test_dead_segments_are_deleted_and_stored_bytes_stay_bounded(tmp_path):
    rng = np.random.default_rng(2)
    memory = _memory(rng, 6)  # 60 rows: the cap
    store, plan = SnapshotStore(), _plan(tmp_path)
    store.write(plan.plan(threshold_text("a", {}), memory, 0.0, force=False))
    for t in range(6, 13):  # every row of the first segment dies (kept one generation more)
        memory.add(_frame(rng), float(t))
        store.write(plan.plan(threshold_text("a", {}), memory, float(t), force=False))
    folder = tmp_path / "a"
    segments = sorted(p.name for p in folder.glob("seg-*.bin"))
    manifests = sorted(p.name for p in folder.glob("manifest-*.json"))
    assert len(manifests) == 2  # the newest and the previous one
    assert "seg-00000001.bin" not in segments  # all its rows dead: deleted
    stored = sum(p.stat().st_size for p in folder.glob("seg-*.bin"))
    assert stored <= 3 * 60 * ROW  # bounded: never every row ever added
    _, loaded = _load(store, tmp_path)
    np.testing.assert_array_equal(loaded.seqs, memory.seqs)


def test_a_torn_newest_snapshot_falls_back_to_the_previous_one(tmp_path):
    rng = np.random.default_rng(3)
    memory = _memory(rng, 3)
    store, plan = SnapshotStore(), _plan(tmp_path)
    store.write(plan.plan(threshold_text("a", {}), memory, 0.0, force=False))
    previous = memory.seqs.copy()
    memory.add(_frame(rng), 3.0)
    store.write(plan.plan(threshold_text("a", {}), memory, 1.0, force=False))
    newest = tmp_path / "a" / "seg-00000002.bin"
    newest.write_bytes(newest.read_bytes()[:-7])  # a torn write of the newest segment
    loaded, restored = _load(SnapshotStore(), tmp_path)
    assert loaded.generation == 1 and "torn" in loaded.damaged[0]
    np.testing.assert_array_equal(restored.seqs, previous)


@pytest.mark.parametrize("damage", ["garbage_manifests", "shared_segment_flipped"])
def test_no_intact_snapshot_raises_damaged(tmp_path, damage):
    rng = np.random.default_rng(4)
    memory = _memory(rng, 3)
    store, plan = SnapshotStore(), _plan(tmp_path)
    store.write(plan.plan(threshold_text("a", {}), memory, 0.0, force=False))
    memory.add(_frame(rng), 3.0)
    store.write(plan.plan(threshold_text("a", {}), memory, 1.0, force=False))
    folder = tmp_path / "a"
    if damage == "garbage_manifests":
        for manifest in folder.glob("manifest-*.json"):
            manifest.write_bytes(b"\x00{not json")
    else:  # the first segment is in both generations: neither can be used
        first = folder / "seg-00000001.bin"
        raw = bytearray(first.read_bytes())
        raw[20] ^= 1
        first.write_bytes(bytes(raw))
    with pytest.raises(SnapshotDamagedError, match="manifest-00000002"):
        SnapshotStore().load(folder, DIMS, META)


def test_the_budget_defers_the_memory_but_not_the_threshold(tmp_path):
    rng = np.random.default_rng(5)
    memory = _memory(rng, 4)
    per_day = 86_400 * 100.0  # 100 bytes/s
    plan = LinePlan("a", tmp_path / "a", SnapshotBudget(per_day, capacity=1e9, now=0.0))
    job = plan.plan(threshold_text("a", {"n": 1}), memory, 60.0, force=False)
    assert job.threshold is not None and job.memory is None  # 6 KB earned, the memory costs more
    need = 40 * ROW + 4096 + 16
    later = plan.plan(threshold_text("a", {"n": 1}), memory, 60.0 + need / 100.0 + 60, force=False)
    assert later is not None and later.memory is not None  # affordable once enough time passed
    forced = LinePlan("b", tmp_path / "b", SnapshotBudget(per_day, capacity=1e9, now=0.0))
    assert forced.plan(threshold_text("b", {}), memory, 1.0, force=True).memory is not None  # clean stop


def test_the_writer_writes_on_its_own_thread_and_counts_failures(tmp_path):
    rng = np.random.default_rng(6)
    memory = _memory(rng, 2)
    threads, errors = [], []

    def guard(fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    writer = SnapshotWriter(SnapshotStore(), guard=guard,
                            on_written=lambda job, n: threads.append(threading.current_thread().name)).start()
    plan = _plan(tmp_path)
    writer.submit(plan.plan(threshold_text("a", {}), memory, 0.0, force=False))
    assert writer.flush(30)
    assert threads == [THREAD_NAME] and threading.current_thread().name != THREAD_NAME
    (tmp_path / "blocked").write_text("a file where the line's folder should be")
    bad = LinePlan("b", tmp_path / "blocked" / "b", SnapshotBudget(1e12, 1e12, 0.0))
    bad.budget.tokens = 1e12
    writer.submit(bad.plan(threshold_text("b", {}), memory, 0.0, force=False))
    assert writer.flush(30)
    writer.stop()
    assert len(errors) == 1 and bad.needs_full  # counted by the guard; the next write is in full
