"""How big an alert for a big frame gets, and what fitting it under the publish limit costs.

A real magnetic-tile photo upscaled to camera sizes with a smooth one-spot heatmap, the alert JSON
built as the MQTT sink builds it (heatmap inline, base64), under three limits: the default
mqtt.max_publish_bytes (8 MiB), the shipped broker's max_packet_size (9 MiB) and a small broker
(128 KiB). Before this change a 12 MP alert was a 13.7 MB message the shipped broker refused with a
disconnect. Writes benchmarks/results/alert_size.{md,json}.

    .venv/bin/python benchmarks/bench_alert_size.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, environment, environment_lines  # noqa: E402

from musc_stream.service.config import DEFAULT_MAX_PUBLISH_BYTES  # noqa: E402
from musc_stream.service.sinks.mqtt_publish import MqttPublisher  # noqa: E402
from musc_stream.stream.records import Decision  # noqa: E402

SIZES = {"2 MP": (1600, 1200), "5 MP": (2592, 1944), "12 MP": (4000, 3000)}
LIMITS = {"mqtt.max_publish_bytes (8 MiB)": DEFAULT_MAX_PUBLISH_BYTES,
          "deploy/mosquitto max_packet_size (9 MiB)": 9_437_184 - 2048, "small broker (128 KiB)": 131_072 - 2048}


class _Recorder:
    """Stands in for paho's client: keeps what would be published (the sink is measured, not MQTT)."""

    def __init__(self) -> None:
        self.sent: dict[str, bytes] = {}

    def publish(self, topic, payload, qos=0, retain=False):
        self.sent[topic] = payload

        class Info:
            rc = 0
        return Info()


class _Topics:
    def result(self, line): return f"line/{line}/result"
    def anomaly(self, line): return f"line/{line}/anomaly"
    def heatmap(self, line): return f"line/{line}/anomaly/heatmap"


def main() -> None:
    path = sorted((DATA / "MT_Blowhole" / "Imgs").glob("*.jpg"))[0]
    rows = []
    for size_name, size in SIZES.items():
        image = np.asarray(Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC))
        yy, xx = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
        heat = (0.2 + 0.6 * np.exp(-((xx - size[0] * 0.6) ** 2 + (yy - size[1] * 0.4) ** 2)
                                   / (2 * 150.0 ** 2))).astype(np.float32)
        for limit_name, limit in LIMITS.items():
            recorder = _Recorder()
            publisher = MqttPublisher(recorder, _Topics(), "bench", max_publish_bytes=limit)
            d = Decision(line="l1", frame_id="f1", ts=time.time(), score=0.8, threshold=0.5, is_anomaly=True,
                         warmup=False, heatmap=heat, image=image)
            started = time.perf_counter()
            publisher.publish_decision(d, image)
            seconds = time.perf_counter() - started
            alert = json.loads(recorder.sent["line/l1/anomaly"])
            rows.append({"frame": size_name, "limit": limit_name, "limit_bytes": limit,
                         "alert_bytes": len(recorder.sent["line/l1/anomaly"]),
                         "heatmap_scale": alert.get("heatmap_scale"), "seconds": round(seconds, 2)})
            print(rows[-1], flush=True)
    env = environment()
    lines = ["# Alert size for big frames", "", *environment_lines(env), "",
             "Command: `.venv/bin/python benchmarks/bench_alert_size.py`", "",
             "| frame | limit | alert message | heatmap scale | time to build (s) |", "|---|---|---|---|---|"]
    lines += [f"| {r['frame']} | {r['limit']} | {r['alert_bytes']:,} B | {r['heatmap_scale']} | {r['seconds']} |"
              for r in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "alert_size.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "alert_size.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
