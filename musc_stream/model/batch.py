"""Batch MuSc on a list of images of any sizes: backbone features, then the reference method."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from musc_stream.model.backbone import Backbone
from musc_stream.model.musc import MuscSettings, musc_from_tokens, upsample_maps


@dataclass
class BatchResult:
    """Per image: final (RsCIN) score, raw max score and an anomaly map at the image's own size."""

    scores: np.ndarray  # (N,) float64
    raw_scores: np.ndarray  # (N,) float64
    maps: list[np.ndarray]  # N × (H_i, W_i) float32
    patch_maps: np.ndarray  # (N, h, w) float64 on the backbone's patch grid
    extract_s: float  # wall seconds spent in the backbone
    score_s: float  # wall seconds spent in LNAMD + MSM + RsCIN + upsampling


def _size_hw(image: Image.Image | np.ndarray) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[0]), int(image.shape[1])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score_batch(
    images: Sequence[Image.Image | np.ndarray],
    backbone: Backbone,
    settings: MuscSettings = MuscSettings(),
    batch_size: int = 8,
    map_size: tuple[int, int] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> BatchResult:
    """Run batch MuSc on ``images`` (N ≥ 2, one product) and return scores and maps.

    Maps come back at each image's original size unless ``map_size`` (H, W) asks for one common size
    (the reference evaluates at S×S). The raw score is the max of the map upsampled to S×S, as in the
    reference, so it does not depend on the original image size.
    """
    if len(images) < 2:
        raise ValueError("batch MuSc needs at least 2 images of the same product")
    start = time.perf_counter()
    features = backbone.embed(images, batch_size=batch_size)
    _synchronize(backbone.device)
    extracted = time.perf_counter()
    side = backbone.image_size
    result = musc_from_tokens(features.patch_tokens, features.image_features, settings, (side, side), on_step)
    maps = []
    for i, image in enumerate(images):
        size = map_size or _size_hw(image)
        maps.append(upsample_maps(result.patch_maps[i : i + 1], size)[0].float().cpu().numpy())
    _synchronize(backbone.device)
    scored = time.perf_counter()
    return BatchResult(
        scores=result.scores.double().cpu().numpy(),
        raw_scores=result.raw_scores.double().cpu().numpy(),
        maps=maps,
        patch_maps=result.patch_maps.cpu().numpy(),
        extract_s=extracted - start,
        score_s=scored - extracted,
    )
