"""Milliseconds per alert picture (sinks/alert_picture.py), the work the sink stage does per alert.

A real magnetic-tile photo (../shared/data/magnetic_tile, read in place) at its tile size
(494×361) and upscaled to camera sizes, with a smooth one-spot heatmap at frame size and its
regions; the picture at its natural scale (tiles upscaled to 512 px on the short side, big frames
capped at 1600 px on the long side), PNG encoded; and the clean frame PNG (mqtt.publish_clean_frame)
at full size. Median of repeated runs, one thread. Writes benchmarks/results/alert_picture.{md,json}.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_alert_picture.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, environment, environment_lines  # noqa: E402

from musc_stream.service.sinks.alert_picture import alert_png, frame_png, natural_scale  # noqa: E402
from musc_stream.stream.records import Decision  # noqa: E402
from musc_stream.stream.regions import find_regions  # noqa: E402

SIZES = {"tile 494×361": (494, 361), "2 MP": (1600, 1200), "12 MP": (4000, 3000)}
REPEATS = {"tile 494×361": 15, "2 MP": 5, "12 MP": 3}


def _ms(fn, repeats: int) -> tuple[float, int]:
    fn()  # warm caches (fonts, colour table)
    times, size = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        size = len(fn())
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times), size


def main() -> None:
    path = sorted((DATA / "MT_Blowhole" / "Imgs").glob("*.jpg"))[0]
    rows = []
    for name, size in SIZES.items():
        image = np.asarray(Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC))
        yy, xx = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
        heat = (0.2 + 0.6 * np.exp(-((xx - size[0] * 0.6) ** 2 + (yy - size[1] * 0.4) ** 2)
                                   / (2 * (size[0] / 12) ** 2))).astype(np.float32)
        d = Decision(line="l1", frame_id="f1", ts=time.time(), score=float(heat.max()), threshold=0.5,
                     is_anomaly=True, warmup=False, heatmap=heat, image=image, regions=find_regions(heat, 0.5))
        picture_ms, picture_bytes = _ms(lambda: alert_png(d, image), REPEATS[name])
        frame_ms, frame_bytes = _ms(lambda: frame_png(image), REPEATS[name])
        picture = Image.open(__import__("io").BytesIO(alert_png(d, image)))
        rows.append({"frame": name, "scale": round(natural_scale(size[1], size[0]), 4),
                     "picture_px": list(picture.size), "picture_ms": round(picture_ms, 1),
                     "picture_bytes": picture_bytes, "clean_frame_ms": round(frame_ms, 1),
                     "clean_frame_bytes": frame_bytes})
        print(rows[-1], flush=True)
    env = environment()
    lines = ["# Alert picture cost per alert", "", *environment_lines(env), "",
             "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_alert_picture.py`", "",
             "| frame | picture scale | picture (px) | picture (ms) | picture PNG | clean frame PNG (ms) | clean frame PNG |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['frame']} | {r['scale']} | {r['picture_px'][0]}×{r['picture_px'][1]} | {r['picture_ms']} | "
              f"{r['picture_bytes']:,} B | {r['clean_frame_ms']} | {r['clean_frame_bytes']:,} B |" for r in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "alert_picture.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "alert_picture.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
