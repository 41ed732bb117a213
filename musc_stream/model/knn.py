"""Exact k-nearest-neighbour search of patch queries in a bank of stored patches, on tensors.

Pure math on the bank's device, no I/O. Two backends pick the candidates; the distances to them are
always recomputed directly (‖q − b‖ in fp32), so every backend and storage dtype reports distances
without the cancellation of the expanded form ‖q‖² − 2qb + ‖b‖² (identical vectors give 0):

- ``torch``: one fused matmul ‖b‖² − 2q·b per query row (‖q‖² is constant along a row, so it does
  not change the ranking), invalid slots masked, ``topk``. Runs in the bank's dtype.
- ``faiss``: ``faiss.knn`` on the CPU (zero-copy numpy views) or ``faiss.knn_gpu`` on CUDA tensors
  (needs a FAISS GPU build; never run by the test suite). Cannot mask, so a masked search falls
  back to ``torch``.

On this project's 2-core CPU the torch backend is 2-3x faster than faiss.knn
(benchmarks/results/memory.md), so ``auto`` means torch.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch

Backend = Literal["auto", "torch", "faiss"]
# Ranking value of a slot that may serve only when nothing else is left (aligned search: a stored
# patch far from the query's position); dead slots rank +inf and are never chosen while live ones remain.
_FAR = 1e30


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``torch``; ``faiss`` on CUDA requires a FAISS build that sees the GPU."""
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"kNN backend must be auto, torch or faiss, got {backend!r}")
    if backend == "faiss" and device.type == "cuda" and _faiss_gpus() == 0:
        raise RuntimeError("memory search backend 'faiss' on a CUDA memory needs faiss with GPU support "
                           "(faiss-gpu); this FAISS sees no GPU")
    return "torch" if backend == "auto" else backend


def candidates(query: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, k: int, *,
               dead: torch.Tensor | None = None, far: torch.Tensor | None = None,
               backend: str = "torch") -> torch.Tensor:
    """Indices (L, k) into ``bank`` of the k nearest rows of each query row, by squared L2.

    query: (L, C) fp32; bank: (M, C) in its storage dtype; bank_sq: (M,) fp32 squared norms of the
    stored rows. dead: (M,) bool, rows never to return while k live ones exist; far: (L, M) bool,
    rows to return only after every allowed one. k must not exceed the live rows."""
    if backend == "faiss" and dead is None and far is None and bank.dtype == torch.float32:
        return _faiss_candidates(query, bank, k)
    if bank.dtype == torch.float32:
        ranking = torch.addmm(bank_sq[None, :], query, bank.T, alpha=-2.0)  # (L, M)
    else:  # half precision: matmul in the bank's dtype (fp32 accumulation on GPUs), rank in fp32
        ranking = (query.to(bank.dtype) @ bank.T).float().mul_(-2.0).add_(bank_sq)
    if far is not None:
        ranking.masked_fill_(far, _FAR)
    if dead is not None:
        ranking.masked_fill_(dead[None, :], float("inf"))
    return torch.topk(ranking, k, dim=1, largest=False, sorted=False).indices


def distances(query: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """(L, k) fp32 Euclidean distances, ascending, from each query row to the k nearest of its
    candidates idx (L, k' >= k), computed directly on the gathered rows (no expansion, no
    cancellation). Sorted, so a mean over them does not depend on where the rows sit in the bank."""
    picked = bank[idx].float()  # (L, k', C)
    dist = (query[:, None, :] - picked).norm(dim=-1)  # (L, k')
    return dist.sort(dim=1).values[:, :k]


def _faiss_candidates(query: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    import faiss

    if bank.device.type == "cuda":
        import faiss.contrib.torch_utils  # noqa: F401  (lets faiss.knn_gpu take torch tensors)

        _, idx = faiss.knn_gpu(_gpu_resources(), query.contiguous(), bank, k)
        return idx.to(torch.int64)
    _, idx = faiss.knn(query.contiguous().numpy(), bank.numpy(), k)  # zero-copy views of CPU tensors
    return torch.from_numpy(idx)


def _faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@functools.cache
def _gpu_resources() -> Any:
    """One StandardGpuResources for all memories (each holds a scratch pool on the device)."""
    import faiss

    return faiss.StandardGpuResources()
