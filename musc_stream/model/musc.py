"""MuSc math: LNAMD, MSM (interval average), RsCIN and batch MuSc. Pure tensors in, tensors out.

Every function follows the reference code (xrli-U/MuSc, see docs in ../shared/docs/musc-method.md):
section numbers below refer to that document. Nothing here reads files, logs or picks a device: the
tensors decide where the work runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# Byte budget for one block of the MSM distance matrix. 256 MiB keeps the CPU cache-friendly and a
# GPU far from its limit at N=200, L=1369 (the full matrix there would be ~1.4 TiB·fp32 per layer).
_MSM_BLOCK_BYTES = 256 * 2**20
RSCIN_FEATURES = ("normalised", "raw")


@dataclass(frozen=True)
class MuscSettings:
    """Knobs of batch MuSc; defaults are the reference's MVTec settings (§1, §4, §6.2), except that
    RsCIN compares L2-normalised image features for every backbone (``rscin_features``)."""

    r_list: tuple[int, ...] = (1, 3, 5)
    topmin_max: float = 0.3
    rscin_windows: tuple[int, ...] = (1, 2, 3)
    # Image features RsCIN compares: "normalised" (cosine similarity, our default for every backbone)
    # or "raw" (the reference's plain dot product, which it uses for DINO CLS features; kept for
    # parity). See `rscin` for why the default deviates for DINO.
    rscin_features: str = "normalised"
    # dtype of the MSM distance matmul; None keeps the features' dtype. torch.float16/bfloat16 on a
    # GPU halves memory traffic and accumulates in fp32 (measured in benchmarks/).
    distance_dtype: torch.dtype | None = None
    block_bytes: int = _MSM_BLOCK_BYTES

    def __post_init__(self) -> None:
        if self.rscin_features not in RSCIN_FEATURES:
            raise ValueError(f"rscin_features must be one of {RSCIN_FEATURES}, got {self.rscin_features!r}")


@dataclass
class MuscResult:
    """Output of batch MuSc for N images on an h×w patch grid."""

    patch_maps: torch.Tensor  # (N, h, w) fused patch scores, float64 like the reference
    raw_scores: torch.Tensor  # (N,) max of the upsampled map (§6.1)
    scores: torch.Tensor  # (N,) after RsCIN (§6.2)
    timings: dict[str, float] = field(default_factory=dict)


def grid_side(num_patches: int) -> int:
    """Side of the square patch grid; the reference assumes square grids (§2.4)."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid")
    return side


def lnamd(tokens: torch.Tensor, r: int) -> torch.Tensor:
    """LNAMD (§3): scalar standardisation per image, r×r mean pool (zero pad counted), L2 norm.

    tokens: (N, L, C) patch tokens without CLS, row-major on a square grid. Returns (N, L, C) fp32
    unit vectors. The "LayerNorm" is over the whole (C, h, w) map without affine parameters, so each
    image is shifted by one scalar mean; padded zeros then equal that image's mean.
    """
    if r < 1 or r % 2 == 0:
        raise ValueError(f"aggregation degree r must be odd and >= 1, got {r}")
    n, num_patches, channels = tokens.shape
    side = grid_side(num_patches)
    x = tokens.float().reshape(n, side, side, channels).permute(0, 3, 1, 2)  # (N, C, h, w)
    x = F.layer_norm(x, x.shape[1:], eps=1e-5)
    if r > 1:
        x = F.avg_pool2d(x, kernel_size=r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
    x = x.permute(0, 2, 3, 1).reshape(n, num_patches, channels)  # (N, L, C)
    return x / x.norm(dim=-1, keepdim=True)


def interval_count(num_references: int, topmin_max: float) -> int:
    """How many of the smallest per-reference distances are averaged (§4.1).

    The reference floors 0.3·(N−1) and gives NaN below 5 images (issue #41); we keep at least one.
    Values ≥ 1 are absolute counts, as in the reference.
    """
    k = int(topmin_max) if topmin_max >= 1 else int(num_references * topmin_max)
    return min(max(1, k), num_references)


def nearest_distances(
    queries: torch.Tensor,
    references: torch.Tensor,
    *,
    distance_dtype: torch.dtype | None = None,
    block_bytes: int = _MSM_BLOCK_BYTES,
) -> torch.Tensor:
    """For every query patch, the Euclidean distance to the nearest patch of each reference image.

    queries: (Q, L, C); references: (R, M, C). Returns (Q, L, R) fp32. Distances use the matmul
    expansion ‖a‖²+‖b‖²−2ab clamped at 0, like torch.cdist on large inputs. Work is cut into blocks
    of whole reference images so no block exceeds ``block_bytes``.
    """
    q, num_q, channels = queries.shape
    r, num_r, _ = references.shape
    mm_dtype = distance_dtype or queries.dtype
    a = queries.reshape(q * num_q, channels)
    a_sq = a.float().pow(2).sum(-1, keepdim=True)  # (Q·L, 1)
    a_mm = a.to(mm_dtype)
    refs_per_block = max(1, block_bytes // max(1, 4 * q * num_q * num_r))
    out = torch.empty(q, num_q, r, dtype=torch.float32, device=queries.device)
    for start in range(0, r, refs_per_block):
        block = references[start : start + refs_per_block]
        b = block.reshape(-1, channels)
        b_sq = b.float().pow(2).sum(-1)  # (B·M,)
        # min_b ‖a−b‖² = ‖a‖² + min_b (‖b‖² − 2ab): one fused matmul pass over the big block,
        # the ‖a‖² term and the clamp only on the reduced (Q·L, B) result.
        if mm_dtype == torch.float32:
            partial = torch.addmm(b_sq[None, :], a_mm, b.T, alpha=-2.0)  # (Q·L, B·M)
        else:  # half-precision matmul (fp32 accumulation on GPUs), sum in fp32
            partial = (a_mm @ b.to(mm_dtype).T).float().mul_(-2.0).add_(b_sq)
        nearest = partial.reshape(q * num_q, block.shape[0], num_r).amin(dim=-1)  # (Q·L, B)
        dist = (nearest + a_sq).clamp_min_(0.0).sqrt_()
        out[:, :, start : start + block.shape[0]] = dist.reshape(q, num_q, block.shape[0])
    return out


def aligned_nearest_distances(
    queries: torch.Tensor, references: torch.Tensor, radius: int = 1
) -> torch.Tensor:
    """Nearest distance restricted to the same neighbourhood in each reference image.

    For registered parts (MuSc issue #52): patch (y, x) of a query is compared only with patches
    (y+dy, x+dx), |dy|, |dx| ≤ radius, of each reference. queries: (Q, L, C); references: (R, L, C)
    on the same square grid. Returns (Q, L, R) fp32. Cost is (2·radius+1)² · L per pair instead of L².
    """
    q, num_patches, channels = queries.shape
    r = references.shape[0]
    side = grid_side(num_patches)
    qg = queries.float().reshape(q, side, side, channels)
    rg = references.float().reshape(r, side, side, channels)
    q_sq = qg.pow(2).sum(-1)  # (Q, h, w)
    r_sq = rg.pow(2).sum(-1)  # (R, h, w)
    best = torch.full((q, side, side, r), float("inf"), device=queries.device)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            # query rows/cols [ys, ye) meet reference rows/cols shifted by (dy, dx)
            ys, ye = max(0, -dy), min(side, side - dy)
            xs, xe = max(0, -dx), min(side, side - dx)
            if ys >= ye or xs >= xe:
                continue
            qa = qg[:, ys:ye, xs:xe]  # (Q, h', w', C)
            ra = rg[:, ys + dy : ye + dy, xs + dx : xe + dx]  # (R, h', w', C)
            dots = torch.einsum("qyxc,ryxc->qyxr", qa, ra)
            d_sq = q_sq[:, ys:ye, xs:xe, None] + r_sq[:, ys + dy : ye + dy, xs + dx : xe + dx].permute(1, 2, 0)[None] - 2 * dots
            view = best[:, ys:ye, xs:xe]
            torch.minimum(view, d_sq.clamp_min(0.0), out=view)
    return best.reshape(q, num_patches, r).sqrt()


def interval_average(distances: torch.Tensor, topmin_max: float = 0.3) -> torch.Tensor:
    """Mean of the smallest k per-reference distances along the last axis (§4.1, k_min = 0).

    distances: (..., R) with R references. The streaming engine uses this on window distances.
    """
    k = interval_count(distances.shape[-1], topmin_max)
    return torch.topk(distances, k, dim=-1, largest=False).values.mean(dim=-1)


def mutual_scores(
    features: torch.Tensor,
    topmin_max: float = 0.3,
    *,
    distance_dtype: torch.dtype | None = None,
    block_bytes: int = _MSM_BLOCK_BYTES,
) -> torch.Tensor:
    """MSM (§4): score every patch of every image against all *other* images of the set.

    features: (N, L, C) unit-norm features of one (layer, r) set, N ≥ 2. Returns (N, L) fp32: per
    other image the nearest-patch distance, then the mean of the smallest ``interval_count`` of those
    N−1 values. Queries are taken a few images at a time so memory stays bounded for any N.
    """
    n, num_patches, _ = features.shape
    if n < 2:
        raise ValueError("mutual scoring needs at least 2 images")
    # Query images per step: enough rows to keep the matmul efficient, and (Q, L, N) small.
    queries_per_step = max(1, min(n, block_bytes // max(1, 4 * num_patches * num_patches * 8)))
    scores = torch.empty(n, num_patches, dtype=torch.float32, device=features.device)
    for start in range(0, n, queries_per_step):
        stop = min(n, start + queries_per_step)
        dist = nearest_distances(
            features[start:stop], features, distance_dtype=distance_dtype, block_bytes=block_bytes
        )  # (Q, L, N)
        idx = torch.arange(start, stop, device=features.device)
        dist[torch.arange(stop - start), :, idx] = float("inf")  # an image never references itself
        # Self sits at +inf, so the k smallest of N columns are the k smallest of the N−1 others.
        k = interval_count(n - 1, topmin_max)
        scores[start:stop] = torch.topk(dist, k, dim=-1, largest=False).values.mean(dim=-1)
    return scores


def rscin(
    scores: torch.Tensor,
    image_features: torch.Tensor,
    windows: Sequence[int] = (1, 2, 3),
    features: str = "normalised",
) -> torch.Tensor:
    """RsCIN (§6.2): re-score each image with its k most similar images, averaged over windows.

    scores: (N,) raw image scores; image_features: (N, D). Returns (N,) fp32. Scores are min-max
    normalised first (all-equal scores become 0); for each window k the row of similarities keeps its
    k largest entries, is divided by its sum and applied to the scores. A window list containing 0
    returns the raw scores (RsCIN off).

    ``features="normalised"`` L2-normalises the features first, so similarities are cosines and an
    image is always its own nearest neighbour. The reference does this for CLIP only; for DINO it
    takes raw dot products of CLS features (``features="raw"``, kept for parity), where a few
    large-norm CLS vectors top every row, so they become everyone's neighbours and an image's own
    score may drop out of its window (measured in benchmarks/results/rscin_magnetic_tile.md).
    For CLIP, whose features arrive L2-normalised, both modes give the same result.
    """
    if features not in RSCIN_FEATURES:
        raise ValueError(f"features must be one of {RSCIN_FEATURES}, got {features!r}")
    if 0 in windows:
        return scores
    c = scores.double()
    span = c.max() - c.min()
    c_hat = (c - c.min()) / span if span > 0 else torch.zeros_like(c)
    g = image_features.double()
    if features == "normalised":
        g = F.normalize(g, dim=-1)
    similarity = (g @ g.T).float()  # (N, N)
    c_hat = c_hat.float()
    n = similarity.shape[0]
    per_window = []
    for k in windows:
        keep = min(k, n)
        top = torch.topk(similarity, keep, dim=1).indices
        mask = torch.zeros_like(similarity).scatter_(1, top, 1.0)
        masked = similarity * mask
        transition = masked / masked.sum(dim=1, keepdim=True)  # D⁻¹ M^k
        per_window.append(transition @ c_hat)
    return torch.stack(per_window, dim=-1).mean(dim=-1)


def fuse_patch_scores(
    layer_tokens: Sequence[torch.Tensor],
    settings: MuscSettings = MuscSettings(),
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """LNAMD + MSM for every (r, layer) pair, averaged over layers then r (§4.2).

    layer_tokens: per tapped layer (N, L, C). Returns (N, L) float64. ``on_step(done, total)`` is
    called after each of the len(r_list)·layers MSM runs (progress for long batches).
    """
    total = len(settings.r_list) * len(layer_tokens)
    per_r = []
    for r in settings.r_list:
        per_layer = []
        for tokens in layer_tokens:
            per_layer.append(mutual_scores(
                lnamd(tokens, r),
                settings.topmin_max,
                distance_dtype=settings.distance_dtype,
                block_bytes=settings.block_bytes,
            ).double())
            if on_step is not None:
                on_step(len(per_r) * len(layer_tokens) + len(per_layer), total)
        per_r.append(torch.stack(per_layer).mean(dim=0))
    return torch.stack(per_r).mean(dim=0)


def upsample_maps(patch_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling with align_corners=True, as the reference (§5). (N, h, w) → (N, H, W)."""
    return F.interpolate(patch_maps.unsqueeze(1), size=size, mode="bilinear", align_corners=True)[:, 0]


def image_scores_from_maps(patch_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Raw classification score: max of the upsampled map (§6.1). (N, h, w) → (N,)."""
    return upsample_maps(patch_maps, size).flatten(1).amax(dim=1)


def musc_from_tokens(
    layer_tokens: Sequence[torch.Tensor],
    image_features: torch.Tensor,
    settings: MuscSettings = MuscSettings(),
    score_size: tuple[int, int] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> MuscResult:
    """Batch MuSc on extracted tokens: fused patch maps, raw max scores and RsCIN scores.

    layer_tokens: per tapped layer (N, L, C) without CLS; image_features: (N, D). ``score_size`` is
    the map size whose maximum is the raw score (the reference uses the input size S×S).
    """
    n, num_patches, _ = layer_tokens[0].shape
    side = grid_side(num_patches)
    maps = fuse_patch_scores(layer_tokens, settings, on_step).reshape(n, side, side)  # (N, h, w)
    raw = image_scores_from_maps(maps, score_size or (side, side))
    final = rscin(raw, image_features.to(raw.device), settings.rscin_windows, settings.rscin_features)
    return MuscResult(patch_maps=maps, raw_scores=raw, scores=final)
