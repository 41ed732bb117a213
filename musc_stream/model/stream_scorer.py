"""Streaming scorer: the tensor steps that score a micro-batch of frames against line windows.

Pure tensors in, tensors out (no I/O, no line state, no host syncs): the engine decides which
references each frame sees and calls these once per micro-batch instead of once per frame.

- ``pool_distances``: for every frame of every line in the batch, the nearest-patch distance of
  each of its patches to each entry of its line's *pool* (the line's window before the batch,
  then the batch's own frames of that line), for every feature set. Lines are padded to the same
  number of frames and pool entries and go through one batched matmul per set.
- ``window_maps``: MSM on those distances with a reference list per frame (the window that frame
  would see when frames are scored one at a time: a causal mask over the pool), grouped by the
  number of references so each group is one gather and one top-k.
- ``combine`` and ``image_scores``: the memory fusion and the image score for many frames at once.
The arithmetic is the one of ``musc.nearest_distances`` / ``interval_average`` and the engine's
serial steps, so batched scores equal serial ones up to float rounding (tests/test_batched_scoring.py).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from musc_stream.model.musc import aligned_nearest_distances, interval_count, upsample_maps

_BLOCK_BYTES = 256 * 2**20  # bound on one block of the (lines, frames·L, pool·L) distance matrix
TOPK_FRACTION = 0.01  # "topk" image score: mean of the top 1 % of pixels of the upsampled map


def pool_distances(
    queries: Sequence[torch.Tensor],
    pools: Sequence[torch.Tensor],
    *,
    distance_dtype: torch.dtype | None = None,
    aligned_radius: int | None = None,
    block_bytes: int = _BLOCK_BYTES,
    causal: bool = False,
) -> torch.Tensor:
    """Nearest-patch distances of each line's frames to each entry of that line's pool, one set.

    queries[g]: (B_g, L, C) fp32 frames of line g; pools[g]: (P_g, L, C) its pool (any float
    dtype: a reduced-precision window is upcast here, block by block). Returns (G, B, L, P) fp32
    with B = max B_g, P = max P_g; padded rows/columns hold garbage and must not be referenced.
    ``aligned_radius`` restricts each patch to its neighbourhood (``aligned_nearest_distances``).
    ``causal``: the pools are the queries themselves (a batch's own frames) and frame b may only
    see frames before it, so entries ≥ b of row b are left uncomputed (about half the work).
    """
    g_count = len(queries)
    b_max = max(q.shape[0] for q in queries)
    p_max = max(p.shape[0] for p in pools)
    num_patches, channels = queries[0].shape[1:]
    device = queries[0].device
    out = torch.zeros(g_count, b_max, num_patches, p_max, dtype=torch.float32, device=device)
    if p_max == 0:
        return out
    if aligned_radius is not None:  # neighbourhood search has no large matmul to share
        for g, (q, p) in enumerate(zip(queries, pools)):
            if p.shape[0]:
                out[g, : q.shape[0], :, : p.shape[0]] = aligned_nearest_distances(q, p.float(), aligned_radius)
        return out
    mm_dtype = distance_dtype or torch.float32
    a = _pad_stack(queries, b_max).reshape(g_count, b_max * num_patches, channels)
    a_sq = a.float().pow(2).sum(-1, keepdim=True)  # (G, B·L, 1)
    a_mm = a.to(mm_dtype)
    per_block = max(1, block_bytes // max(1, 4 * g_count * b_max * num_patches * num_patches))
    if causal:  # two or more blocks, so later blocks skip the early rows that never see them
        per_block = min(per_block, max(1, (p_max + 1) // 2))
    for start in range(0, p_max, per_block):
        stop = min(p_max, start + per_block)
        first = start + 1 if causal else 0  # the first query row that sees this block
        if first >= b_max:
            break
        rows = slice(first * num_patches, None)
        b = _pad_stack([p[start:stop] for p in pools], stop - start).reshape(g_count, -1, channels)
        b32 = b.float()
        b_sq = b32.pow(2).sum(-1)  # (G, n·L)
        # min_b ‖a−b‖² = ‖a‖² + min_b (‖b‖² − 2ab), as musc.nearest_distances
        if mm_dtype == torch.float32:
            partial = torch.baddbmm(b_sq[:, None, :], a_mm[:, rows], b32.transpose(1, 2), alpha=-2.0)
        else:
            partial = torch.bmm(a_mm[:, rows], b.to(mm_dtype).transpose(1, 2)).float().mul_(-2.0).add_(b_sq[:, None, :])
        nearest = partial.reshape(g_count, (b_max - first) * num_patches, stop - start, num_patches).amin(dim=-1)
        dist = (nearest + a_sq[:, rows]).clamp_min_(0.0).sqrt_()
        out[:, first:, :, start:stop] = dist.reshape(g_count, b_max - first, num_patches, stop - start)
    return out


def _pad_stack(tensors: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Stack (n_i, ...) tensors into (len, length, ...), zero rows where n_i < length (no copy
    when there is one tensor of the full length)."""
    if len(tensors) == 1 and tensors[0].shape[0] == length:
        return tensors[0][None]
    out = tensors[0].new_zeros((len(tensors), length, *tensors[0].shape[1:]))
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def window_maps(
    distances: torch.Tensor,
    rows: Sequence[tuple[int, int]],
    references: Sequence[Sequence[int]],
    topmin_max: float,
) -> torch.Tensor:
    """MSM window maps of many frames: (S, G, B, L, P) distances of S sets, frame n at
    ``rows[n] = (g, b)`` seeing pool entries ``references[n]`` (at least one). Returns (N, L):
    per set the mean of the smallest ``interval_count`` per-reference distances, then the mean
    over sets (the engine's serial ``_window_map``)."""
    n_sets, _, _, num_patches, _ = distances.shape
    out = distances.new_empty(len(rows), num_patches)
    by_count: dict[int, list[int]] = {}
    for n, refs in enumerate(references):
        by_count.setdefault(len(refs), []).append(n)
    device = distances.device
    for count, members in by_count.items():
        g = torch.tensor([rows[n][0] for n in members], device=device)
        b = torch.tensor([rows[n][1] for n in members], device=device)
        idx = torch.tensor([list(references[n]) for n in members], device=device)  # (M, R)
        picked = distances[:, g, b]  # (S, M, L, P)
        idx = idx[None, :, None, :].expand(n_sets, -1, num_patches, -1)
        refs = torch.gather(picked, -1, idx)  # (S, M, L, R)
        k = interval_count(count, topmin_max)
        per_set = torch.topk(refs, k, dim=-1, largest=False).values.mean(dim=-1)  # (S, M, L)
        out[torch.tensor(members, device=device)] = per_set.mean(0)
    return out


def combine(
    window: torch.Tensor,
    memory: torch.Tensor | None,
    has_memory: torch.Tensor | None,
    *,
    mode: str,
    fusion: str,
    memory_weight: float,
) -> torch.Tensor:
    """Patch maps (N, L) from window maps and memory maps (N, L; rows where ``has_memory`` is
    False are ignored): the memory map is put on the window's scale by the ratio of the two maps'
    patch medians, then fused (see engine.py). Frames without a memory map keep their window map."""
    if memory is None or mode == "window":
        return window
    scale = window.median(dim=-1, keepdim=True).values / memory.median(dim=-1, keepdim=True).values.clamp_min(1e-6)
    on_window_scale = memory * scale
    if mode == "memory":
        fused = on_window_scale
    elif fusion == "max":
        fused = torch.maximum(window, memory_weight * on_window_scale)
    else:
        fused = 0.5 * (window + on_window_scale)
    return torch.where(has_memory[:, None], fused, window)


def image_scores(patch_maps: torch.Tensor, image_size: int, how: str) -> torch.Tensor:
    """Image scores (N,) from patch maps (N, L) on a square grid, in float64: the max of the map
    upsampled to image_size² ("max"), the mean of its top 1 % pixels ("topk"), or the max after a
    3×3 patch smoothing ("smooth")."""
    n, num_patches = patch_maps.shape
    side = int(round(num_patches ** 0.5))
    grid = patch_maps.reshape(n, side, side).double()
    if how == "smooth":
        grid = F.avg_pool2d(grid[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]
    up = upsample_maps(grid, (image_size, image_size)).flatten(1)
    if how == "topk":
        k = max(1, int(TOPK_FRACTION * up.shape[1]))
        return torch.topk(up, k, dim=1).values.mean(dim=1)
    return up.amax(dim=1)
