"""Per-line memory of normal patch features: a preallocated ring buffer per feature set, on the
model's device, searched exactly (musc_stream/model/knn.py) or, optionally, approximately (ivf.py)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import faiss
import numpy as np
import torch

from musc_stream.durable import fsync_path
from musc_stream.model import knn
from musc_stream.model.ivf import IvfIndex

# Bump when the single-folder snapshot layout (save/load) changes; load() refuses other versions.
FORMAT_VERSION = 1
_META_FILE = "memory.json"
_TIMESTAMPS_FILE = "timestamps.npy"
_POSITIONS_FILE = "positions.npy"
# Storage dtype of memory.dtype = "auto": fp32 on the CPU (fp16 matmuls are slow there), fp16 on a
# GPU, where storing half the bytes changed image scores by at most 6e-4 (benchmarks/results/memory.md).
AUTO_DTYPE = {"cpu": torch.float32, "cuda": torch.float16}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Reduced-precision banks rank this many extra candidates per query and keep the k nearest by the
# fp32 distance, so a rounding tie does not pick a farther neighbour.
_REFINE = 7

Features = Mapping[str, "np.ndarray | torch.Tensor"]


class MemoryMismatchError(ValueError):
    """A snapshot was written for other features (backbone, weights, layers, widths, format)."""


class EmptyMemoryError(RuntimeError):
    """search() on a memory without patches: there is nothing to compare against."""


@dataclass(frozen=True)
class MemoryRows:
    """Copies of some stored patches, in row-id order, for a snapshot (see musc_stream/state/store.py).

    seqs: (n,) int64 row ids, ascending: every patch ever added gets the next id, so a snapshot can
    say which rows it already holds and which of them are no longer live."""

    seqs: np.ndarray  # (n,) int64
    timestamps: np.ndarray  # (n,) float64
    positions: np.ndarray  # (n,) int32
    vectors: dict[str, np.ndarray]  # set name -> (n, C) float32

    def __len__(self) -> int:
        return int(self.seqs.shape[0])


class PatchMemory:
    """Unit-norm patch features of one line's normal frames, bounded in size (capacity) and age.

    MuSc features come as several sets, one per (layer, r). Each set is a preallocated
    (capacity, C) tensor on the memory's device; every frame writes the same randomly chosen patch
    positions into the same slots of every set, with one shared service-clock timestamp per slot.
    Writes go in place at a write pointer that wraps around, so a full memory overwrites its oldest
    patches; age-out only marks slots dead. Nothing is ever compacted or copied to the host on the
    scoring path: search reads the live span of the bank directly (dead slots masked).

    Slot metadata (timestamp, row id, grid position, live flag) is mirrored on the host: the
    engine's decisions (how many patches, what to age out, what to snapshot) are host decisions, and
    reading them back from the device would cost a sync per frame. The service clock is monotone, so
    live slots normally form one ring range in time order and age-out moves its start; a timestamp
    older than the newest stored one (tests, a wall clock stepped back) switches the memory to
    choosing victims by (timestamp, row id) over all slots, O(capacity) on the host, until it empties.

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
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        backend: str = "auto",
        index: str = "exact",
        ivf_nlist: int = 256,
        ivf_nprobe: int = 16,
    ) -> None:
        """dims: feature width C per set name, e.g. {"l5_r3": 1024}; names are strings because they
        go to JSON. max_patches: the ring's capacity. max_age_s: patches older than this (the clock
        of add/expire) are dropped; None keeps them. device / use_gpu: where the ring lives; with
        neither, it follows the model: it moves once to the device of the first torch tensors it is
        given (numpy input never moves it). use_gpu=True without CUDA raises. dtype: storage,
        "auto" (AUTO_DTYPE), "float32", "float16" or "bfloat16". backend: exact search, "auto"
        (torch), "torch" or "faiss" (knn.py). index: "exact" or "ivf" (approximate, ivf.py).
        metadata: JSON-able description of the features, saved in snapshots and checked on load."""
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
        if index not in ("exact", "ivf"):
            raise ValueError(f"memory index must be exact or ivf, got {index!r}")
        self._dims = {key: int(dim) for key, dim in dims.items()}
        self.max_patches = self.capacity = int(max_patches)
        self.patches_per_frame = int(patches_per_frame)
        self.max_age_s = None if max_age_s is None else float(max_age_s)
        self._metadata = _normalise_metadata(metadata or {})
        self._rng = np.random.default_rng(seed)
        self._follow = device is None and use_gpu is None  # adopt the first torch input's device
        self._device = _resolve_device(device, use_gpu)
        self._dtype_setting = dtype
        self._dtype = _resolve_dtype(dtype, self._device)
        self._backend_setting = backend
        self._backend = knn.resolve_backend(backend, self._device)
        self._index_kind, self._ivf_args = index, (int(ivf_nlist), int(ivf_nprobe))
        self._ivf = IvfIndex(self._dims, *self._ivf_args) if index == "ivf" else None
        cap = self.capacity
        # Host mirror of the slots' metadata.
        self._ts = np.zeros(cap, dtype=np.float64)  # seconds, service clock
        self._seq = np.full(cap, -1, dtype=np.int64)  # row id, -1 never written
        self._pos = np.full(cap, -1, dtype=np.int32)  # patch index in its frame, -1 unknown
        self._live = np.zeros(cap, dtype=bool)
        self._n = 0  # live slots
        self._write = 0  # next slot to write (ordered mode)
        self._ordered = True  # live slots = ring range [write - n, write), timestamps non-decreasing
        self._next_seq = 0  # id of the next patch added; never reused, not even after clear()
        self._version = 0  # bumped by every change, so a snapshot can tell a memory changed
        self._allocate()

    def _allocate(self) -> None:
        cap, dev = self.capacity, self._device
        self._bank = {key: torch.zeros(cap, dim, dtype=self._dtype, device=dev) for key, dim in self._dims.items()}
        self._sq = {key: torch.zeros(cap, dtype=torch.float32, device=dev) for key in self._dims}  # ‖row‖²
        self._dead = torch.ones(cap, dtype=torch.bool, device=dev)
        self._pos_dev = torch.full((cap,), -1, dtype=torch.int64, device=dev)

    # -- state -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of live patches in each set (all sets hold the same patches)."""
        return self._n

    @property
    def dims(self) -> dict[str, int]:
        return dict(self._dims)

    @property
    def metadata(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._metadata))

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def use_gpu(self) -> bool:
        return self._device.type == "cuda"

    @property
    def timestamps(self) -> np.ndarray:
        """(n,) float64 timestamp of each live patch, in row-id order (a read-only copy)."""
        return _read_only(self._ts[self._live_slots()])

    @property
    def nbytes(self) -> int:
        """Bytes of live vectors over all sets (the preallocated ring holds capacity_bytes)."""
        return len(self) * sum(self._dims.values()) * self._element_size()

    @property
    def capacity_bytes(self) -> int:
        """Bytes the preallocated ring takes on its device, vectors and norms."""
        return self.capacity * (sum(self._dims.values()) * self._element_size() + 4 * len(self._dims))

    def _element_size(self) -> int:
        return torch.empty(0, dtype=self._dtype).element_size()

    def clear(self) -> None:
        """Forget every patch, e.g. on a product changeover (the ring stays allocated)."""
        self._live[:] = False
        self._seq[:] = -1
        self._pos[:] = -1
        self._n, self._write, self._ordered = 0, 0, True
        self._dead.fill_(True)
        self._pos_dev.fill_(-1)
        if self._ivf is not None:  # another product: its coarse lists are learnt again
            self._ivf = IvfIndex(self._dims, *self._ivf_args)
        self._version += 1

    # -- updates -----------------------------------------------------------------------------

    def add(self, features: Features, timestamp: float) -> int:
        """Store a random subset of one normal frame's patches, after age-out at its timestamp.

        features: per set (L, C) unit-norm patch features of ONE frame. timestamp: the frame's time in
        seconds (service clock); patches older than timestamp - max_age_s are dropped first. A full
        memory overwrites its oldest patches. Returns the patches added."""
        timestamp = float(timestamp)
        if not np.isfinite(timestamp):
            raise ValueError(f"timestamp must be finite, got {timestamp}")
        matrices = self._as_tensors(features)
        num_patches = next(iter(matrices.values())).shape[0]
        take = min(self.patches_per_frame, num_patches)
        if take == num_patches:
            rows = np.arange(num_patches)
        else:
            # Same positions for every set, so the sets keep describing the same patches.
            rows = np.sort(self._rng.choice(num_patches, size=take, replace=False))
        rows = rows[-self.capacity:]  # more than the ring holds: the last ones, as a cap would keep
        take = int(rows.shape[0])
        rows_dev = torch.from_numpy(rows.astype(np.int64)).to(self._device)
        picked = {key: x if take == num_patches else x.index_select(0, rows_dev) for key, x in matrices.items()}
        # Check before writing any set: a NaN would poison every later distance.
        for key, x in picked.items():
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"features of set {key!r} contain NaN or inf")
        self.expire(timestamp)
        if self._ordered and self._n and timestamp < self._ts[(self._write - 1) % self.capacity]:
            self._ordered = False  # older than the newest stored patch: victims by timestamp from now on
        slots = self._claim(take)
        seqs = np.arange(self._next_seq, self._next_seq + take, dtype=np.int64)
        self._ts[slots], self._seq[slots], self._pos[slots], self._live[slots] = timestamp, seqs, rows, True
        self._write_device(slots, picked, rows_dev)
        self._next_seq += take
        self._version += 1
        if self._ivf is not None:
            self._ivf_add(seqs, picked)
        return take

    def _claim(self, take: int) -> np.ndarray:
        """Slots for ``take`` new rows: dead ones first, then the oldest live ones (overwritten)."""
        cap = self.capacity
        if self._ordered:  # the slots at the write pointer are dead or the oldest live ones
            slots = (self._write + np.arange(take)) % cap
            self._write = (self._write + take) % cap
            self._n = min(self._n + take, cap)
            return slots
        live = self._live
        order = np.lexsort((np.where(live, self._seq, np.arange(cap)), np.where(live, self._ts, -np.inf), live))
        slots = np.sort(order[:take])
        self._n += take - int(live[slots].sum())
        return slots

    def _write_device(self, slots: np.ndarray, picked: dict[str, torch.Tensor], rows_dev: torch.Tensor) -> None:
        """Write new rows into their slots: slices in ordered mode (no index transfer), else index_copy."""
        pieces = _runs(slots)
        if pieces is None:
            slots_dev = torch.from_numpy(slots.astype(np.int64)).to(self._device)
        for key, x in picked.items():
            stored = x.to(self._dtype)
            sq = stored.float().pow(2).sum(-1)
            if pieces is None:
                self._bank[key].index_copy_(0, slots_dev, stored)
                self._sq[key].index_copy_(0, slots_dev, sq)
            else:
                for a, b, offset in pieces:
                    self._bank[key][a:b] = stored[offset:offset + b - a]
                    self._sq[key][a:b] = sq[offset:offset + b - a]
        if pieces is None:
            self._dead.index_fill_(0, slots_dev, False)
            self._pos_dev.index_copy_(0, slots_dev, rows_dev)
        else:
            for a, b, offset in pieces:
                self._dead[a:b] = False
                self._pos_dev[a:b] = rows_dev[offset:offset + b - a]

    def expire(self, now: float, keep_newest: int = 0) -> int:
        """Drop patches older than now - max_age_s (seconds, the clock of add). Returns how many.

        keep_newest: never drop the newest this many patches, however old: an idle line keeps a
        memory to score its next frames against instead of losing it all at once (which would
        change the score's scale when the line restarts)."""
        if self.max_age_s is None or self._n == 0:
            return 0
        cutoff = float(now) - self.max_age_s
        keep = max(0, int(keep_newest))
        if self._ordered:  # the oldest are at the start of the live range: count them, move the start
            start, cap = (self._write - self._n) % self.capacity, self.capacity
            first = self._ts[start:min(start + self._n, cap)]
            old = int(np.searchsorted(first, cutoff, side="left"))
            if old == first.shape[0] and start + self._n > cap:
                old += int(np.searchsorted(self._ts[:start + self._n - cap], cutoff, side="left"))
            old = min(old, self._n - keep)
            if old <= 0:
                return 0
            slots = (start + np.arange(old)) % cap
        else:
            live = self._live_slots()  # row-id order
            old_mask = self._ts[live] < cutoff
            if keep:
                newest = np.lexsort((self._seq[live], self._ts[live]))[-keep:]
                old_mask[newest] = False
            slots = np.sort(live[old_mask])
            old = int(slots.shape[0])
            if old == 0:
                return 0
        self._kill(slots)
        return old

    def _kill(self, slots: np.ndarray) -> None:
        self._live[slots] = False
        self._n -= int(slots.shape[0])
        pieces = _runs(slots)
        if pieces is None:
            self._dead.index_fill_(0, torch.from_numpy(slots.astype(np.int64)).to(self._device), True)
        else:
            for a, b, _ in pieces:
                self._dead[a:b] = True
        if self._n == 0:
            self._ordered = True  # an empty memory is trivially in order again
        self._version += 1

    # -- search ------------------------------------------------------------------------------

    def search_tensors(self, features: Features, k: int = 1,
                       aligned_radius: int | None = None) -> dict[str, torch.Tensor]:
        """Per set, (L,) fp32 tensor on the memory's device: the mean Euclidean distance of each
        patch to its k nearest memory patches (unit vectors give values in [0, 2]).

        k larger than the memory is clipped to its size. Raises EmptyMemoryError on an empty memory:
        check len() first. aligned_radius: compare each patch only with stored patches from within
        this many patches of the same grid position (aligned parts; the window's rule), on the square
        grid of the query; stored patches of unknown position match everywhere."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self._n == 0:
            raise EmptyMemoryError("the memory holds no patches yet")
        matrices = self._as_tensors(features)
        k = min(int(k), self._n)
        if self._ivf is not None and self._ivf.trained and aligned_radius is None:
            found = self._search_ivf(matrices, k)
            if found is not None:
                return found
        lo, hi = self._span()
        dead = self._dead[lo:hi] if hi - lo > self._n else None
        num_patches = next(iter(matrices.values())).shape[0]
        far = None if aligned_radius is None else self._far_mask(num_patches, aligned_radius, lo, hi)
        pool = min(self._n, k + (_REFINE if self._dtype != torch.float32 else 0))
        out = {}
        for key, query in matrices.items():
            bank = self._bank[key][lo:hi]
            idx = knn.candidates(query, bank, self._sq[key][lo:hi], pool, dead=dead, far=far, backend=self._backend)
            out[key] = knn.distances(query, bank, idx, k).mean(1)  # (L,)
        return out

    def search(self, features: Features, k: int = 1, aligned_radius: int | None = None) -> dict[str, np.ndarray]:
        """search_tensors() as (L,) float32 numpy arrays per set."""
        return {key: d.cpu().numpy() for key, d in self.search_tensors(features, k, aligned_radius).items()}

    def score_map(self, features: Features, k: int = 1, aligned_radius: int | None = None) -> torch.Tensor:
        """Memory patch map as an (L,) fp32 tensor on the memory's device (no host copy): mean over
        sets of search distances, the MSM scale (§4.2)."""
        return torch.stack(list(self.search_tensors(features, k, aligned_radius).values())).mean(0)

    def score(self, features: Features, k: int = 1, aligned_radius: int | None = None) -> np.ndarray:
        """Memory patch map: (L,) float64 mean over sets of search() distances, the MSM scale (§4.2)."""
        distances = self.search(features, k, aligned_radius)
        return np.mean(np.stack(list(distances.values())), axis=0, dtype=np.float64)  # (L,)

    def _span(self) -> tuple[int, int]:
        """Smallest slot range [lo, hi) holding every live slot (it may hold dead ones too)."""
        if self._ordered:
            start = (self._write - self._n) % self.capacity
            if start + self._n <= self.capacity:
                return start, start + self._n
            return 0, self.capacity
        live = np.flatnonzero(self._live)
        return int(live[0]), int(live[-1]) + 1

    def _far_mask(self, num_patches: int, radius: int, lo: int, hi: int) -> torch.Tensor:
        """(L, hi-lo) True where stored patch m lies more than ``radius`` patches from query position l."""
        side = int(round(num_patches ** 0.5))
        if side * side != num_patches:
            raise ValueError(f"aligned search needs a square patch grid, got {num_patches} patches")
        q = torch.arange(num_patches, device=self._device)
        pos = self._pos_dev[lo:hi]
        dy = (q[:, None] // side - pos[None] // side).abs()
        dx = (q[:, None] % side - pos[None] % side).abs()
        return ((dy > radius) | (dx > radius)) & (pos >= 0)[None]

    def _search_ivf(self, matrices: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor] | None:
        """Approximate search; None (search exactly) when a probe found fewer than k live rows."""
        selector = self._live_selector()
        found = self._ivf.search({key: x.cpu().numpy() for key, x in matrices.items()}, k, selector[0])
        if any(not np.isfinite(d).all() for d in found.values()):
            return None
        return {key: torch.from_numpy(d.mean(1)).to(self._device) for key, d in found.items()}

    def _live_selector(self) -> tuple[faiss.IDSelector, Any]:
        """FAISS selector of the live row ids (and what it points into, to keep alive)."""
        if self._ordered:  # live ids are every indexed id from the oldest live one on
            first = int(self._seq[(self._write - self._n) % self.capacity])
            return faiss.IDSelectorRange(first, self._next_seq), None
        live = np.ascontiguousarray(self._seq[self._live])
        return faiss.IDSelectorBatch(live), live

    def _ivf_add(self, seqs: np.ndarray, picked: dict[str, torch.Tensor]) -> None:
        """Keep the approximate index in step (a host copy: the IVF lives on the CPU)."""
        if not self._ivf.trained:
            if self._n >= self._ivf.train_size:
                rows = self.export_rows()
                self._ivf.train(rows.seqs, rows.vectors)
            return
        self._ivf.add(seqs, {key: x.float().cpu().numpy() for key, x in picked.items()})
        if self._ivf.ntotal > 2 * self._n:  # tombstones outnumber live rows: purge them at once
            live, _keep = self._live_selector()
            self._ivf.purge(faiss.IDSelectorNot(live))

    def _as_tensors(self, features: Features) -> dict[str, torch.Tensor]:
        """Check set names and shapes; return fp32 (L, C) tensors on the memory's device."""
        if set(features) != set(self._dims):
            missing = sorted(set(self._dims) - set(features))
            extra = sorted(set(features) - set(self._dims))
            raise ValueError(
                f"feature sets differ from the memory's: missing {missing}, unexpected {extra}")
        if self._follow:
            first = next((x for x in features.values() if isinstance(x, torch.Tensor)), None)
            if first is not None:
                self._to_device(first.device)
        out = {}
        num_patches = None
        for key, dim in self._dims.items():
            x = features[key]
            if not isinstance(x, torch.Tensor):
                x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            x = x.detach().to(device=self._device, dtype=torch.float32)
            if x.ndim != 2 or x.shape[1] != dim:
                raise ValueError(f"set {key!r}: expected (L, {dim}) features, got {tuple(x.shape)}")
            if num_patches is None:
                num_patches = x.shape[0]
            elif x.shape[0] != num_patches:
                raise ValueError(f"set {key!r} has {x.shape[0]} patches, other sets {num_patches}")
            out[key] = x
        if num_patches == 0:
            raise ValueError("features hold no patches")
        return out

    def _to_device(self, device: torch.device) -> None:
        """Adopt the model's device once (a memory loaded from a snapshot starts on the CPU)."""
        self._follow = False
        if device == self._device:
            return
        self._device = device
        dtype = _resolve_dtype(self._dtype_setting, device)
        self._backend = knn.resolve_backend(self._backend_setting, device)
        if dtype != self._dtype:
            self._dtype = dtype
            self._bank = {key: b.to(device, dtype) for key, b in self._bank.items()}
            self._sq = {key: b.float().pow(2).sum(-1) for key, b in self._bank.items()}
        else:
            self._bank = {key: b.to(device) for key, b in self._bank.items()}
            self._sq = {key: s.to(device) for key, s in self._sq.items()}
        self._dead = self._dead.to(device)
        self._pos_dev = self._pos_dev.to(device)

    def _live_slots(self) -> np.ndarray:
        """Slots of the live patches in row-id (arrival) order."""
        if self._ordered:
            return (self._write - self._n + np.arange(self._n)) % self.capacity
        live = np.flatnonzero(self._live)
        return live[np.argsort(self._seq[live], kind="stable")]

    # -- persistence -------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """Changes with every add, drop and clear: equal versions mean the same patches."""
        return self._version

    @property
    def seqs(self) -> np.ndarray:
        """(n,) int64 row id of each live patch, ascending (a read-only copy)."""
        return _read_only(self._seq[self._live_slots()])

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def rng_state(self) -> dict[str, Any]:
        """State of the subsampling RNG (JSON-able), so a loaded memory picks the same positions."""
        return json.loads(json.dumps(self._rng.bit_generator.state))

    def export_rows(self, after_seq: int = -1) -> MemoryRows:
        """Copies (fp32, on the host) of the live patches whose row id is above ``after_seq``, in
        row-id order: the rows a snapshot has not written yet. One gather per set on the device."""
        slots = self._live_slots()
        slots = slots[self._seq[slots] > after_seq]
        index = torch.from_numpy(slots.astype(np.int64)).to(self._device)
        vectors = {key: self._bank[key].index_select(0, index).float().cpu().numpy() for key in self._dims}
        return MemoryRows(self._seq[slots].copy(), self._ts[slots].copy(), self._pos[slots].copy(), vectors)

    def _put_rows(self, seqs: np.ndarray, timestamps: np.ndarray, positions: np.ndarray,
                  vectors: Mapping[str, np.ndarray]) -> None:
        """Fill an empty memory with rows in row-id order; beyond capacity, the newest are kept."""
        n = int(seqs.shape[0])
        keep = np.arange(n)
        if n > self.capacity:  # oldest by (timestamp, row id) go, as the cap did
            keep = np.sort(np.lexsort((seqs, timestamps))[-self.capacity:])
            n = self.capacity
        ts = timestamps[keep]
        self._ts[:n], self._seq[:n], self._pos[:n], self._live[:n] = ts, seqs[keep], positions[keep], True
        self._n, self._write = n, n % self.capacity
        self._ordered = bool(np.all(np.diff(ts) >= 0))
        index = torch.from_numpy(keep.astype(np.int64))
        for key in self._dims:
            stored = torch.from_numpy(np.ascontiguousarray(vectors[key], dtype=np.float32))[index]
            stored = stored.to(self._device, self._dtype)
            self._bank[key][:n] = stored
            self._sq[key][:n] = stored.float().pow(2).sum(-1)
        self._dead[:n] = False
        self._pos_dev[:n] = torch.from_numpy(positions[keep].astype(np.int64)).to(self._device)
        self._version += 1
        if self._ivf is not None and n >= self._ivf.train_size:
            rows = self.export_rows()
            self._ivf.train(rows.seqs, rows.vectors)

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
        **options: Any,
    ) -> PatchMemory:
        """Rebuild a memory from rows read back from a snapshot: the same vectors, timestamps,
        positions and ids in the same order, hence the same search results. Capacity, subsampling,
        age, device and options (dtype, backend, index) come from the arguments (today's settings);
        a smaller capacity keeps the newest rows."""
        memory = cls(dims, max_patches=max_patches, patches_per_frame=patches_per_frame,
                     max_age_s=max_age_s, use_gpu=use_gpu, metadata=metadata, **options)
        if set(rows.vectors) != set(memory._dims):
            raise ValueError(f"rows hold sets {sorted(rows.vectors)}, the memory {sorted(memory._dims)}")
        n = len(rows)
        for key, dim in memory._dims.items():
            if np.shape(rows.vectors[key]) != (n, dim):
                raise ValueError(f"set {key!r}: rows of shape {np.shape(rows.vectors[key])}, expected {(n, dim)}")
        seqs = np.asarray(rows.seqs, dtype=np.int64)
        if n and (np.any(np.diff(seqs) <= 0) or int(seqs[-1]) >= next_seq):
            raise ValueError("row ids must ascend and stay below next_seq")
        memory._put_rows(seqs, np.asarray(rows.timestamps, dtype=np.float64),
                         np.asarray(rows.positions, dtype=np.int32), rows.vectors)
        memory._next_seq = int(next_seq)
        if rng_state is not None:
            memory._rng.bit_generator.state = dict(rng_state)
        return memory

    def save(self, path_dir: Path | str) -> None:
        """Write the memory to the folder path_dir, replacing what is there (the single-folder
        format of earlier releases; the service now writes musc_stream/state/store.py's segments,
        and still loads this format once, see Engine.load_state).

        Layout: memory.json (format, dims, metadata, file names, RNG state), one FAISS IndexFlatL2
        file per set (live rows in row-id order), timestamps.npy, positions.npy. No pickle anywhere.
        Written to `<name>.tmp`, fsynced, then renamed into place; the previous snapshot sits at
        `<name>.old` between the two renames, and load() falls back to it if a crash lands there.
        """
        path_dir = Path(path_dir)
        tmp = path_dir.with_name(path_dir.name + ".tmp")
        old = path_dir.with_name(path_dir.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash during an earlier save
        tmp.mkdir(parents=True)
        rows = self.export_rows()
        files = {}
        for i, (key, dim) in enumerate(self._dims.items()):
            files[key] = f"set{i:02d}.faiss"  # set names may hold characters unfit for file names
            index = faiss.IndexFlatL2(dim)
            if len(rows):
                index.add(rows.vectors[key])
            faiss.write_index(index, str(tmp / files[key]))
        with open(tmp / _TIMESTAMPS_FILE, "wb") as f:
            np.save(f, rows.timestamps, allow_pickle=False)
        with open(tmp / _POSITIONS_FILE, "wb") as f:
            np.save(f, rows.positions, allow_pickle=False)
        meta = {
            "format": FORMAT_VERSION,
            "dims": self._dims,
            "metadata": self._metadata,
            "files": files,
            "num_patches": len(rows),
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
            fsync_path(file)
        fsync_path(tmp)
        if path_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            path_dir.rename(old)
        tmp.rename(path_dir)
        fsync_path(path_dir.parent)
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
        **options: Any,
    ) -> PatchMemory:
        """Read a memory saved by save(), refusing one made for other features.

        dims and expected_metadata describe the features the caller will produce now; any
        difference from the snapshot (set names, widths, metadata keys or values, format version)
        raises MemoryMismatchError. A missing file raises FileNotFoundError, an inconsistent
        snapshot ValueError. Capacity, subsampling, age, device and options come from the arguments
        (today's settings): a smaller capacity keeps the newest patches. Ages are not applied here,
        since the clock is the caller's: call expire(now) after loading. The RNG continues where it
        stopped.
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
                     max_age_s=max_age_s, use_gpu=use_gpu, metadata=expected_metadata, **options)
        with open(path_dir / _TIMESTAMPS_FILE, "rb") as f:
            timestamps = np.load(f, allow_pickle=False)
        n = timestamps.shape[0]
        if timestamps.ndim != 1 or n != meta.get("num_patches"):
            raise ValueError(f"{path_dir}: timestamps {timestamps.shape} do not match "
                             f"num_patches {meta.get('num_patches')}")
        if set(meta.get("files", {})) != set(memory._dims):
            raise ValueError(
                f"{path_dir}: index files {sorted(meta.get('files', {}))} do not match dims")
        vectors = {}
        for key, name in meta["files"].items():
            index = faiss.read_index(str(path_dir / Path(name).name))
            if not isinstance(index, faiss.IndexFlatL2) or index.d != memory._dims[key] or index.ntotal != n:
                raise ValueError(f"{path_dir / name}: expected IndexFlatL2 of width "
                                 f"{memory._dims[key]} with {n} vectors")
            vectors[key] = index.reconstruct_n(0, n) if n else np.empty((0, index.d), np.float32)
        positions = np.full(n, -1, dtype=np.int32)  # older snapshots: unknown
        if (path_dir / _POSITIONS_FILE).exists():
            with open(path_dir / _POSITIONS_FILE, "rb") as f:
                positions = np.load(f, allow_pickle=False)
            if positions.shape != timestamps.shape:
                raise ValueError(f"{path_dir}: positions {positions.shape} do not match {timestamps.shape}")
        memory._put_rows(np.arange(n, dtype=np.int64), timestamps.astype(np.float64),
                         positions.astype(np.int32), vectors)
        memory._next_seq = int(n)
        memory._rng.bit_generator.state = meta["rng_state"]
        return memory


def _runs(slots: np.ndarray) -> list[tuple[int, int, int]] | None:
    """Ascending-by-one slots (possibly wrapping once at the end of the ring) as (start, end,
    offset) slices; None when they are scattered (then the caller indexes)."""
    if slots.size == 0:
        return []
    steps = np.diff(slots)
    breaks = np.flatnonzero(steps != 1)
    if breaks.size == 0:
        return [(int(slots[0]), int(slots[-1]) + 1, 0)]
    if breaks.size == 1 and slots[breaks[0] + 1] == 0:  # wrapped around the end of the ring
        cut = int(breaks[0]) + 1
        return [(int(slots[0]), int(slots[cut - 1]) + 1, 0), (0, int(slots[-1]) + 1, cut)]
    return None


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _resolve_device(device: str | torch.device | None, use_gpu: bool | None) -> torch.device:
    if device is not None:
        device = torch.device(device)
    elif use_gpu:
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the memory was asked to live on the GPU, but torch sees no CUDA GPU")
    return device


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return AUTO_DTYPE.get(device.type, torch.float32)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"memory dtype must be one of {sorted(DTYPES)}, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"memory dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _normalise_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """JSON round trip, so tuples compare equal to the lists they become on disk."""
    for key in metadata:
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be str, got {key!r}")
    return json.loads(json.dumps(dict(metadata), sort_keys=True))

