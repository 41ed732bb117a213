"""Per-line FAISS memory of normal patch features: one exact L2 index per (layer, r) feature set."""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import faiss
import numpy as np
import torch

# Bump when the snapshot layout changes; load() refuses other versions instead of guessing.
FORMAT_VERSION = 1
_META_FILE = "memory.json"
_TIMESTAMPS_FILE = "timestamps.npy"
_POSITIONS_FILE = "positions.npy"

Features = Mapping[str, "np.ndarray | torch.Tensor"]


class MemoryMismatchError(ValueError):
    """A snapshot was written for other features (backbone, weights, layers, widths, format)."""


class EmptyMemoryError(RuntimeError):
    """search() on a memory without patches: there is nothing to compare against."""


@dataclass(frozen=True)
class MemoryRows:
    """Copies of some stored patches, in index order, for a snapshot (see musc_stream/state/store.py).

    seqs: (n,) int64 row ids, ascending: every patch ever added gets the next id, so a snapshot can
    say which rows it already holds and which of them are no longer live."""

    seqs: np.ndarray  # (n,) int64
    timestamps: np.ndarray  # (n,) float64
    positions: np.ndarray  # (n,) int32
    vectors: dict[str, np.ndarray]  # set name -> (n, C) float32

    def __len__(self) -> int:
        return int(self.seqs.shape[0])


class PatchMemory:
    """FAISS memory of unit-norm patch features of one line's normal frames, bounded in size and age.

    MuSc features come as several sets, one per (layer, r); the memory keeps one `IndexFlatL2` per set
    (exact search, so memory distances sit on the same scale as MSM distances). Every frame adds the
    same randomly chosen patch positions to every set, so all sets always hold the same number of
    patches, with one shared timestamp per patch.

    The CPU indexes are the master copy: removal (cap, age) compacts them with `remove_ids`, which
    keeps insertion order. With a GPU, search runs on a mirror made by `index_cpu_to_gpu`; appends
    are mirrored as they come, and any removal re-uploads the whole mirror before the next search
    (GPU flat indexes cannot remove), i.e. once per frame when the memory is full.

    Not thread-safe: one thread (the engine's) owns a memory.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        max_patches: int = 50_000,
        patches_per_frame: int = 256,
        max_age_s: float | None = 3600.0,
        use_gpu: bool | None = None,
        seed: int = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """dims: feature width C per set name, e.g. {"l5_r3": 1024}; set names are strings because
        they are written to JSON. max_patches: cap per set. max_age_s: patches older than this (same
        clock as the timestamps given to add/expire) are dropped; None keeps them forever. use_gpu:
        None picks the GPU when FAISS sees one; True without a GPU raises. metadata: JSON-able
        description of the features (backbone, weights, layers, image size) saved with the memory
        and checked by load()."""
        if not dims:
            raise ValueError("dims must name at least one feature set")
        for key, dim in dims.items():
            if not isinstance(key, str):
                raise TypeError(f"feature-set names must be str (they go to JSON), got {key!r}")
            if int(dim) != dim or dim < 1:
                raise ValueError(f"feature width of {key!r} must be a positive int, got {dim!r}")
        if max_patches < 1:
            raise ValueError(f"max_patches must be >= 1, got {max_patches}")
        if patches_per_frame < 1:
            raise ValueError(f"patches_per_frame must be >= 1, got {patches_per_frame}")
        if max_age_s is not None and not max_age_s > 0:
            raise ValueError(f"max_age_s must be > 0 or None, got {max_age_s}")
        self._dims = {key: int(dim) for key, dim in dims.items()}
        self.max_patches = int(max_patches)
        self.patches_per_frame = int(patches_per_frame)
        self.max_age_s = None if max_age_s is None else float(max_age_s)
        self.use_gpu = _resolve_use_gpu(use_gpu)
        self._metadata = _normalise_metadata(metadata or {})
        self._rng = np.random.default_rng(seed)
        self._cpu = {key: faiss.IndexFlatL2(dim) for key, dim in self._dims.items()}
        self._timestamps = np.empty(0, dtype=np.float64)  # (n,) seconds, index order
        self._positions = np.empty(0, dtype=np.int32)  # (n,) patch index in its frame, -1 unknown
        self._seqs = np.empty(0, dtype=np.int64)  # (n,) row id of each patch, ascending (snapshots)
        self._next_seq = 0  # id of the next patch added; never reused, not even after clear()
        self._version = 0  # bumped by every change, so a snapshot can tell a memory changed
        self._gpu: dict[str, Any] | None = None  # search mirror, built on first search
        self._gpu_stale = False

    # -- state -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of patches in each set (all sets hold the same patches)."""
        return int(self._timestamps.shape[0])

    @property
    def dims(self) -> dict[str, int]:
        return dict(self._dims)

    @property
    def metadata(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._metadata))

    @property
    def timestamps(self) -> np.ndarray:
        """(n,) float64 timestamp of each stored patch, read-only view."""
        view = self._timestamps.view()
        view.flags.writeable = False
        return view

    @property
    def nbytes(self) -> int:
        """Bytes of stored vectors over all sets (a GPU mirror doubles this on the device)."""
        return len(self) * sum(self._dims.values()) * 4

    def clear(self) -> None:
        """Forget every patch, e.g. on a product changeover."""
        for index in self._cpu.values():
            index.reset()
        self._timestamps = np.empty(0, dtype=np.float64)
        self._positions = np.empty(0, dtype=np.int32)
        self._seqs = np.empty(0, dtype=np.int64)
        self._version += 1
        self._gpu = None
        self._gpu_stale = False

    # -- updates -----------------------------------------------------------------------------

    def add(self, features: Features, timestamp: float) -> int:
        """Store a random subset of one normal frame's patches, then apply age-out and the cap.

        features: per set (L, C) unit-norm patch features of ONE frame. timestamp: the frame's time in
        seconds; patches older than timestamp - max_age_s are dropped. Returns the patches added.
        """
        timestamp = float(timestamp)
        if not np.isfinite(timestamp):
            raise ValueError(f"timestamp must be finite, got {timestamp}")
        matrices = self._as_matrices(features)
        num_patches = next(iter(matrices.values())).shape[0]
        take = min(self.patches_per_frame, num_patches)
        if take == num_patches:
            rows = np.arange(num_patches)
        else:
            # Same positions for every set, so the sets keep describing the same patches.
            rows = np.sort(self._rng.choice(num_patches, size=take, replace=False))
        picked = {key: np.ascontiguousarray(x[rows]) for key, x in matrices.items()}  # (take, C)
        # Check before touching any index: a NaN would poison every later distance.
        for key, x in picked.items():
            if not np.isfinite(x).all():
                raise ValueError(f"features of set {key!r} contain NaN or inf")
        for key, x in picked.items():
            self._cpu[key].add(x)
            if self._gpu is not None and not self._gpu_stale:
                self._gpu[key].add(x)
        self._timestamps = np.concatenate([self._timestamps, np.full(take, timestamp)])
        self._positions = np.concatenate([self._positions, rows.astype(np.int32)])
        self._seqs = np.concatenate([self._seqs, np.arange(self._next_seq, self._next_seq + take, dtype=np.int64)])
        self._next_seq += take
        self._version += 1
        self.expire(timestamp)
        self._enforce_cap()
        return take

    def expire(self, now: float, keep_newest: int = 0) -> int:
        """Drop patches older than now - max_age_s (seconds, the clock of add). Returns how many.

        keep_newest: never drop the newest this many patches, however old: an idle line keeps a
        memory to score its next frames against instead of losing it all at once (which would
        change the score's scale when the line restarts)."""
        if self.max_age_s is None or len(self) == 0:
            return 0
        old = self._timestamps < float(now) - self.max_age_s
        if keep_newest > 0:
            newest = np.argsort(self._timestamps, kind="stable")[-int(keep_newest):]
            old[newest] = False
        return self._drop(old)

    def _enforce_cap(self) -> int:
        """Drop the oldest patches (smallest timestamp, then first added) beyond max_patches."""
        excess = len(self) - self.max_patches
        if excess <= 0:
            return 0
        oldest = np.argsort(self._timestamps, kind="stable")[:excess]
        mask = np.zeros(len(self), dtype=bool)
        mask[oldest] = True
        return self._drop(mask)

    def _drop(self, mask: np.ndarray) -> int:
        """Remove the patches where mask is True from every set; order of the rest is kept."""
        ids = np.flatnonzero(mask).astype(np.int64)
        if ids.size == 0:
            return 0
        if ids[-1] == ids.size - 1:  # a prefix: the usual case, timestamps arrive in order
            selector = faiss.IDSelectorRange(0, int(ids.size))
        else:
            selector = faiss.IDSelectorBatch(ids)
        for key, index in self._cpu.items():
            removed = index.remove_ids(selector)
            if removed != ids.size:  # would leave the sets out of step with the timestamps
                raise RuntimeError(f"set {key!r}: removed {removed} patches, expected {ids.size}")
        self._timestamps = self._timestamps[~mask]
        self._positions = self._positions[~mask]
        self._seqs = self._seqs[~mask]
        self._version += 1
        self._gpu_stale = True
        return int(ids.size)

    # -- search ------------------------------------------------------------------------------

    def search(self, features: Features, k: int = 1, aligned_radius: int | None = None) -> dict[str, np.ndarray]:
        """Per set, the mean Euclidean distance of each patch to its k nearest memory patches.

        features: per set (L, C) patch features of one frame. Returns per set an (L,) float32 array
        (not squared: FAISS L2 gives squares, we take the root; unit vectors give values in [0, 2]).
        k larger than the memory is clipped to its size. Raises EmptyMemoryError on an empty memory:
        check len() first. aligned_radius: compare each patch only with stored patches that came from
        within this many patches of the same grid position (aligned parts; the window's rule), on the
        square grid of the query; stored patches of unknown position match everywhere.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if len(self) == 0:
            raise EmptyMemoryError("the memory holds no patches yet")
        matrices = self._as_matrices(features)
        k = min(int(k), len(self))
        if not self.use_gpu or aligned_radius is not None:
            return self._search_cpu(matrices, k, aligned_radius)
        indexes = self._search_indexes()
        out = {}
        for key, x in matrices.items():
            squared, _ = indexes[key].search(x, k)  # (L, k) squared L2
            # The BLAS path (‖x‖²+‖y‖²−2x·y) can dip a hair below zero for identical vectors.
            out[key] = np.sqrt(np.maximum(squared, 0.0)).mean(axis=1)  # (L,)
        return out

    def _search_cpu(self, matrices: dict[str, np.ndarray], k: int,
                    aligned_radius: int | None = None) -> dict[str, np.ndarray]:
        """Exact kNN on the CPU as one torch matmul over a zero-copy view of each index's vectors.

        Same distances as IndexFlatL2.search, but 2.8× faster on this 2-core box under load (one
        set of 20 000 × 384 patches, 256 queries: FAISS 4.3 s, torch 1.5 s with one thread each,
        /tmp/mb.py in the session log of issue 9): FAISS's OpenMP loop stalls when cores are
        shared, BLAS does not. The FAISS indexes stay the storage (snapshots, GPU mirror)."""
        out = {}
        n = len(self)
        num_patches = next(iter(matrices.values())).shape[0]
        far = None if aligned_radius is None else self._far_mask(num_patches, aligned_radius)  # (L, M)
        for key, x in matrices.items():
            dim = self._dims[key]
            stored = faiss.rev_swig_ptr(self._cpu[key].get_xb(), n * dim).reshape(n, dim)  # no copy
            bank = torch.from_numpy(stored)  # (M, C)
            query = torch.from_numpy(x)  # (L, C)
            # ‖b‖² − 2q·b ranks the bank for each query (‖q‖² is the same along a row) ...
            ranking = (bank * bank).sum(1)[None] - 2.0 * (query @ bank.T)  # (L, M)
            if far is not None:
                ranking = ranking.masked_fill(far, float("inf"))
            idx = torch.topk(ranking, k, dim=1, largest=False).indices  # (L, k)
            # ... and the distance to the chosen neighbours is taken directly, without the
            # cancellation of the expanded form (identical vectors give 0, not 3e-4).
            nearest = (query[:, None, :] - bank[idx]).norm(dim=-1)  # (L, k)
            out[key] = nearest.mean(1).numpy().astype(np.float32)  # (L,)
        return out

    def _far_mask(self, num_patches: int, radius: int) -> torch.Tensor:
        """(L, M) True where stored patch m lies more than ``radius`` patches from query position l."""
        side = int(round(num_patches ** 0.5))
        if side * side != num_patches:
            raise ValueError(f"aligned search needs a square patch grid, got {num_patches} patches")
        q = torch.arange(num_patches)
        pos = torch.from_numpy(self._positions.astype(np.int64))
        known = pos >= 0
        dy = (q[:, None] // side - pos[None] // side).abs()
        dx = (q[:, None] % side - pos[None] % side).abs()
        return ((dy > radius) | (dx > radius)) & known[None]

    def score(self, features: Features, k: int = 1, aligned_radius: int | None = None) -> np.ndarray:
        """Memory patch map: (L,) float64 mean over sets of search() distances, the MSM scale (§4.2)."""
        distances = self.search(features, k, aligned_radius)
        return np.mean(np.stack(list(distances.values())), axis=0, dtype=np.float64)  # (L,)

    def _search_indexes(self) -> dict[str, Any]:
        if not self.use_gpu:
            return self._cpu
        if self._gpu is None or self._gpu_stale:
            resources = _gpu_resources()
            self._gpu = {
                key: faiss.index_cpu_to_gpu(resources, 0, index) for key, index in self._cpu.items()
            }
            self._gpu_stale = False
        return self._gpu

    def _as_matrices(self, features: Features) -> dict[str, np.ndarray]:
        """Check set names and shapes; return contiguous float32 (L, C) arrays in dims order."""
        if set(features) != set(self._dims):
            missing = sorted(set(self._dims) - set(features))
            extra = sorted(set(features) - set(self._dims))
            raise ValueError(
                f"feature sets differ from the memory's: missing {missing}, unexpected {extra}")
        out = {}
        num_patches = None
        for key, dim in self._dims.items():
            x = features[key]
            if isinstance(x, torch.Tensor):
                x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
            x = np.ascontiguousarray(x, dtype=np.float32)
            if x.ndim != 2 or x.shape[1] != dim:
                raise ValueError(f"set {key!r}: expected (L, {dim}) features, got {x.shape}")
            if num_patches is None:
                num_patches = x.shape[0]
            elif x.shape[0] != num_patches:
                raise ValueError(f"set {key!r} has {x.shape[0]} patches, other sets {num_patches}")
            out[key] = x
        if num_patches == 0:
            raise ValueError("features hold no patches")
        return out

    # -- persistence -------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """Changes with every add, drop and clear: equal versions mean the same patches."""
        return self._version

    @property
    def seqs(self) -> np.ndarray:
        """(n,) int64 row id of each stored patch, ascending, read-only view."""
        view = self._seqs.view()
        view.flags.writeable = False
        return view

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def rng_state(self) -> dict[str, Any]:
        """State of the subsampling RNG (JSON-able), so a loaded memory picks the same positions."""
        return json.loads(json.dumps(self._rng.bit_generator.state))

    def export_rows(self, after_seq: int = -1) -> MemoryRows:
        """Copies of the stored patches whose row id is above ``after_seq`` (all by default).

        They are a suffix of the index (ids ascend in index order), so this is one slice copy per
        set: cheap enough for the scoring thread, which owns the memory, to hand to a writer."""
        start = int(np.searchsorted(self._seqs, after_seq, side="right"))
        n = len(self)
        vectors = {}
        for key, dim in self._dims.items():
            stored = faiss.rev_swig_ptr(self._cpu[key].get_xb(), n * dim).reshape(n, dim) if n else \
                np.empty((0, dim), np.float32)
            vectors[key] = np.array(stored[start:], dtype=np.float32, copy=True)
        return MemoryRows(self._seqs[start:].copy(), self._timestamps[start:].copy(),
                          self._positions[start:].copy(), vectors)

    @classmethod
    def from_rows(
        cls,
        rows: MemoryRows,
        *,
        next_seq: int,
        rng_state: Mapping[str, Any] | None,
        dims: Mapping[str, int],
        metadata: Mapping[str, Any],
        max_patches: int = 50_000,
        patches_per_frame: int = 256,
        max_age_s: float | None = 3600.0,
        use_gpu: bool | None = None,
    ) -> PatchMemory:
        """Rebuild a memory from rows read back from a snapshot: the same vectors, timestamps,
        positions and ids in the same order, hence the same search results. Cap, subsampling, age
        and GPU come from the arguments (today's settings); a smaller cap drops the oldest now."""
        memory = cls(dims, max_patches=max_patches, patches_per_frame=patches_per_frame,
                     max_age_s=max_age_s, use_gpu=use_gpu, metadata=metadata)
        if set(rows.vectors) != set(memory._dims):
            raise ValueError(f"rows hold sets {sorted(rows.vectors)}, the memory {sorted(memory._dims)}")
        n = len(rows)
        for key, dim in memory._dims.items():
            x = np.ascontiguousarray(rows.vectors[key], dtype=np.float32)
            if x.shape != (n, dim):
                raise ValueError(f"set {key!r}: rows of shape {x.shape}, expected {(n, dim)}")
            if n:
                memory._cpu[key].add(x)
        seqs = np.asarray(rows.seqs, dtype=np.int64)
        if n and (np.any(np.diff(seqs) <= 0) or int(seqs[-1]) >= next_seq):
            raise ValueError("row ids must ascend and stay below next_seq")
        memory._seqs = seqs.copy()
        memory._timestamps = np.asarray(rows.timestamps, dtype=np.float64).copy()
        memory._positions = np.asarray(rows.positions, dtype=np.int32).copy()
        memory._next_seq = int(next_seq)
        if rng_state is not None:
            memory._rng.bit_generator.state = dict(rng_state)
        memory._enforce_cap()
        return memory

    def save(self, path_dir: Path | str) -> None:
        """Write the memory to the folder path_dir, replacing what is there (the single-folder
        format of earlier releases; the service now writes musc_stream/state/store.py's segments,
        and still loads this format once, see Engine.load_state).

        Layout: memory.json (format, dims, metadata, file names, RNG state), one FAISS index file per
        set written from the CPU master, timestamps.npy. No pickle anywhere. Written to
        `<name>.tmp`, fsynced, then renamed into place; the previous snapshot sits at `<name>.old`
        between the two renames, and load() falls back to it if a crash lands there.
        """
        path_dir = Path(path_dir)
        tmp = path_dir.with_name(path_dir.name + ".tmp")
        old = path_dir.with_name(path_dir.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash during an earlier save
        tmp.mkdir(parents=True)
        files = {}
        for i, (key, index) in enumerate(self._cpu.items()):
            files[key] = f"set{i:02d}.faiss"  # set names may hold characters unfit for file names
            faiss.write_index(index, str(tmp / files[key]))
        with open(tmp / _TIMESTAMPS_FILE, "wb") as f:
            np.save(f, self._timestamps, allow_pickle=False)
        with open(tmp / _POSITIONS_FILE, "wb") as f:
            np.save(f, self._positions, allow_pickle=False)
        meta = {
            "format": FORMAT_VERSION,
            "dims": self._dims,
            "metadata": self._metadata,
            "files": files,
            "num_patches": len(self),
            "rng_state": self._rng.bit_generator.state,
            # For people reading the folder; load() takes these from its caller, not from here.
            "settings": {
                "max_patches": self.max_patches,
                "patches_per_frame": self.patches_per_frame,
                "max_age_s": self.max_age_s,
            },
        }
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        if path_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            path_dir.rename(old)
        tmp.rename(path_dir)
        _fsync(path_dir.parent)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(
        cls,
        path_dir: Path | str,
        expected_metadata: Mapping[str, Any],
        *,
        dims: Mapping[str, int],
        max_patches: int = 50_000,
        patches_per_frame: int = 256,
        max_age_s: float | None = 3600.0,
        use_gpu: bool | None = None,
    ) -> PatchMemory:
        """Read a memory saved by save(), refusing one made for other features.

        dims and expected_metadata describe the features the caller will produce now; any
        difference from the snapshot (set names, widths, metadata keys or values, format version)
        raises MemoryMismatchError. A missing file raises FileNotFoundError, an inconsistent
        snapshot ValueError. Cap, subsampling, age and GPU come from the arguments (today's
        settings): a smaller cap drops the oldest patches now. Ages are not applied here, since the
        clock is the caller's: call expire(now) after loading. The RNG continues where it stopped.
        """
        path_dir = Path(path_dir)
        if not (path_dir / _META_FILE).exists():
            old = path_dir.with_name(path_dir.name + ".old")
            if not (old / _META_FILE).exists():
                raise FileNotFoundError(f"no memory snapshot in {path_dir}")
            path_dir = old  # a save crashed between its two renames
        meta = json.loads((path_dir / _META_FILE).read_text())
        expected = _normalise_metadata(expected_metadata)
        problems = []
        if meta.get("format") != FORMAT_VERSION:
            problems.append(f"format {meta.get('format')!r} != {FORMAT_VERSION}")
        if meta.get("dims") != {key: int(dim) for key, dim in dims.items()}:
            problems.append(f"dims {meta.get('dims')!r} != {dict(dims)!r}")
        saved = meta.get("metadata")
        if saved != expected:
            saved = saved if isinstance(saved, dict) else {}
            for key in sorted(set(saved) | set(expected)):
                if saved.get(key, "<missing>") != expected.get(key, "<missing>"):
                    problems.append(f"{key}: saved {saved.get(key, '<missing>')!r}, "
                                    f"expected {expected.get(key, '<missing>')!r}")
        if problems:
            raise MemoryMismatchError(f"memory in {path_dir} does not match: " + "; ".join(problems))

        memory = cls(dims, max_patches=max_patches, patches_per_frame=patches_per_frame,
                     max_age_s=max_age_s, use_gpu=use_gpu, metadata=expected_metadata)
        with open(path_dir / _TIMESTAMPS_FILE, "rb") as f:
            timestamps = np.load(f, allow_pickle=False)
        if timestamps.ndim != 1 or timestamps.shape[0] != meta.get("num_patches"):
            raise ValueError(f"{path_dir}: timestamps {timestamps.shape} do not match "
                             f"num_patches {meta.get('num_patches')}")
        if set(meta.get("files", {})) != set(memory._dims):
            raise ValueError(
                f"{path_dir}: index files {sorted(meta.get('files', {}))} do not match dims")
        for key, name in meta["files"].items():
            index = faiss.read_index(str(path_dir / Path(name).name))
            if (not isinstance(index, faiss.IndexFlatL2) or index.d != memory._dims[key]
                    or index.ntotal != timestamps.shape[0]):
                raise ValueError(f"{path_dir / name}: expected IndexFlatL2 of width "
                                 f"{memory._dims[key]} with {timestamps.shape[0]} vectors")
            memory._cpu[key] = index
        memory._timestamps = timestamps.astype(np.float64)
        memory._positions = np.full(timestamps.shape[0], -1, dtype=np.int32)  # older snapshots: unknown
        if (path_dir / _POSITIONS_FILE).exists():
            with open(path_dir / _POSITIONS_FILE, "rb") as f:
                positions = np.load(f, allow_pickle=False)
            if positions.shape != timestamps.shape:
                raise ValueError(f"{path_dir}: positions {positions.shape} do not match {timestamps.shape}")
            memory._positions = positions.astype(np.int32)
        memory._seqs = np.arange(timestamps.shape[0], dtype=np.int64)
        memory._next_seq = int(timestamps.shape[0])
        memory._rng.bit_generator.state = meta["rng_state"]
        memory._enforce_cap()
        return memory


def _normalise_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """JSON round trip, so tuples compare equal to the lists they become on disk."""
    for key in metadata:
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be str, got {key!r}")
    return json.loads(json.dumps(dict(metadata), sort_keys=True))


def _resolve_use_gpu(use_gpu: bool | None) -> bool:
    available = faiss.get_num_gpus() > 0
    if use_gpu is None:
        return available
    if use_gpu and not available:
        raise RuntimeError("use_gpu=True, but FAISS sees no GPU (faiss-cpu installed, or no device)")
    return bool(use_gpu)


@functools.cache
def _gpu_resources() -> Any:
    """One StandardGpuResources for all memories: each holds its own scratch pool on the device."""
    return faiss.StandardGpuResources()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
