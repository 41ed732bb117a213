"""Anomalous regions of a heatmap as boxes in the frame's own pixel coordinates."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from musc_stream.stream.records import Region


def find_regions(heatmap: np.ndarray, threshold: float | None, max_regions: int = 5) -> list[Region]:
    """Connected regions (8-connected) of ``heatmap > threshold``, strongest first.

    heatmap: (H, W) anomaly map at frame size. Without a threshold (warm-up) the map's own top 1 %
    is used, so an operator still sees where the frame differs most.
    """
    if heatmap.size == 0:
        return []
    level = threshold if threshold is not None else float(np.quantile(heatmap, 0.99))
    labels, count = ndimage.label(heatmap > level, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    peaks = ndimage.maximum(heatmap, labels, index)
    areas = ndimage.sum_labels(np.ones_like(heatmap), labels, index)
    boxes = ndimage.find_objects(labels)
    order = np.argsort(-np.asarray(peaks))[:max_regions]
    return [
        Region(x0=int(boxes[i][1].start), y0=int(boxes[i][0].start),
               x1=int(boxes[i][1].stop), y1=int(boxes[i][0].stop),
               score=float(peaks[i]), area_px=int(areas[i]))
        for i in order
    ]
