"""Optional approximate search for a patch memory too large for exact search: FAISS IndexIVFFlat.

Off by default (``memory.index = "exact"``). The index is keyed by the memory's row ids (seqs), on
the CPU, in fp32. Rows that died in the ring buffer (age-out, overwrite) stay in the index as
tombstones, excluded at search time by an ID selector, and are purged in one ``remove_ids`` once
they outnumber the live rows: amortised O(1) per row, never a compaction per frame. It trains on the
memory's live rows once it holds ``40 × nlist`` of them; until then the memory searches exactly.
Recall@1 against exact search: benchmarks/results/memory.md.
"""

from __future__ import annotations

import faiss
import numpy as np

TRAIN_PER_LIST = 40  # faiss warns below 39 training points per list


class IvfIndex:
    """One IndexIVFFlat per feature set, all holding the same row ids."""

    def __init__(self, dims: dict[str, int], nlist: int = 256, nprobe: int = 16) -> None:
        if nlist < 1 or nprobe < 1:
            raise ValueError(f"ivf nlist and nprobe must be >= 1, got {nlist}, {nprobe}")
        self.nlist, self.nprobe = int(nlist), int(nprobe)
        self._quantizers = {key: faiss.IndexFlatL2(dim) for key, dim in dims.items()}  # kept alive here
        self._indexes = {key: faiss.IndexIVFFlat(self._quantizers[key], dim, self.nlist)
                         for key, dim in dims.items()}

    @property
    def trained(self) -> bool:
        return all(index.is_trained for index in self._indexes.values())

    @property
    def train_size(self) -> int:
        return TRAIN_PER_LIST * self.nlist

    @property
    def ntotal(self) -> int:
        return int(next(iter(self._indexes.values())).ntotal)

    def train(self, seqs: np.ndarray, vectors: dict[str, np.ndarray]) -> None:
        """Learn the coarse lists from these rows and add them."""
        for key, index in self._indexes.items():
            index.train(np.ascontiguousarray(vectors[key], dtype=np.float32))
        self.add(seqs, vectors)

    def add(self, seqs: np.ndarray, vectors: dict[str, np.ndarray]) -> None:
        ids = np.ascontiguousarray(seqs, dtype=np.int64)
        for key, index in self._indexes.items():
            index.add_with_ids(np.ascontiguousarray(vectors[key], dtype=np.float32), ids)

    def search(self, queries: dict[str, np.ndarray], k: int, live: faiss.IDSelector) -> dict[str, np.ndarray]:
        """Per set, (L, k) Euclidean distances to the approximate k nearest live rows (inf where
        the probed lists held fewer than k live rows)."""
        params = faiss.SearchParametersIVF(sel=live, nprobe=self.nprobe)
        out = {}
        for key, index in self._indexes.items():
            squared, labels = index.search(np.ascontiguousarray(queries[key], dtype=np.float32), k, params=params)
            squared = np.where(labels < 0, np.inf, np.maximum(squared, 0.0))
            out[key] = np.sqrt(squared, dtype=np.float32)
        return out

    def purge(self, dead: faiss.IDSelector) -> None:
        for index in self._indexes.values():
            index.remove_ids(dead)
