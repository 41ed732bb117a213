"""`musc-stream demo`: a local broker, the service, and a camera replaying real frames.

Leaves in the output folder: alerts/*.json and heatmaps/*.png (from the anomaly topic), results.jsonl
(every result message), errors.jsonl, audit/ (the Parquet audit), state/ (memory snapshot) and
summary.md (a table of what happened, with the ground truth the demo knows).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from PIL import Image

from musc_stream.devtools.broker import LocalBroker, free_port
from musc_stream.devtools.replay import Camera
from musc_stream.service.config import Settings, load_settings

logger = logging.getLogger(__name__)


@dataclass
class DemoFrame:
    frame_id: str
    payload: bytes
    label: int  # 1 = known defect (from the data set), 0 = normal, -1 = deliberately broken payload
    note: str
    line: str = "tile-a"


@dataclass
class Collected:
    results: dict[str, dict] = field(default_factory=dict)
    alerts: dict[str, dict] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


def magnetic_tile_frames(root: Path, n_frames: int, defect_rate: float, seed: int,
                         group: str = "exp1", head: int = 8) -> list[DemoFrame]:
    """Real frames of one capture set-up (``group``, e.g. exp1: one camera and lighting, as on a
    line): MT_Free with defects mixed in after the first ``head`` frames (the line's warm-up), seeded."""
    rng = random.Random(seed)
    free = sorted((root / "MT_Free" / "Imgs").glob(f"{group}_*.jpg"))
    defects = sorted(p for d in ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
                     for p in (root / d / "Imgs").glob(f"{group}_*.jpg"))
    n_def = max(1, round(n_frames * defect_rate))
    normals = rng.sample(free, n_frames - n_def)
    chosen = rng.sample(defects, n_def)
    tail = [(p, 0) for p in normals[head:]] + [(p, 1) for p in chosen]
    rng.shuffle(tail)
    ordered = [(p, 0) for p in normals[:head]] + tail
    return [DemoFrame(f"{p.parent.parent.name.removeprefix('MT_')}-{p.stem}", p.read_bytes(), label,
                      p.parent.parent.name.removeprefix("MT_")) for p, label in ordered]


def texture_frames(n_frames: int, defect_rate: float, seed: int) -> list[DemoFrame]:
    """Fallback without ../shared/data: scikit-image's brick photo, crops, painted-on defects."""
    from skimage import data

    rng = np.random.default_rng(seed)
    brick = data.brick()
    frames = []
    for i in range(n_frames):
        y, x = rng.integers(0, brick.shape[0] - 256, 2)
        img = np.stack([brick[y:y + 256, x:x + 256]] * 3, -1).copy()
        label = int(i >= 8 and rng.random() < defect_rate)
        if label:
            cy, cx = rng.integers(40, 216, 2)
            img[cy - 15:cy + 15, cx - 15:cx + 15] = rng.integers(0, 255, 3)
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=92)
        frames.append(DemoFrame(f"brick-{i:03d}", buffer.getvalue(), label, "painted" if label else "Free"))
    return frames


def _subscribe_results(host: str, port: int, protocol: str, expected: int, out: Collected) -> mqtt.Client:
    v5 = protocol == "5"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"musc-demo-viewer-{port}",
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    subscribed = threading.Event()

    def on_message(c, u, m):
        record = json.loads(m.payload)
        if m.topic.endswith("/result"):
            out.results[record["frame_id"]] = record
            _print_progress(record, len(out.results), expected)
        elif m.topic.endswith("/anomaly"):
            out.alerts[record["frame_id"]] = record
        elif m.topic.endswith("/error"):
            out.errors.append(record)
            print(f"  error    {record.get('frame_id') or '-':<28} {record['reason']}: {record['detail'][:60]}",
                  flush=True)
        if len(out.results) + len(out.errors) >= expected:
            out.done.set()

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_connect = lambda c, *a: c.subscribe([("line/+/result", 1), ("line/+/anomaly", 1), ("line/+/error", 1)])
    client.connect(host, port)
    client.loop_start()
    subscribed.wait(10)
    return client


def _print_progress(record: dict, done: int, expected: int) -> None:
    flag = "ANOMALY" if record["is_anomaly"] else ("warm-up" if record["warmup"] else "ok")
    threshold = "-" if record["threshold"] is None else f"{record['threshold']:.3f}"
    print(f"  [{done:3d}/{expected}] {record['line']:<7} {record['frame_id']:<24} score {record['score']:.3f}  "
          f"threshold {threshold:>6}  {flag}", flush=True)


def run_demo(out_dir: Path, data_root: Path | None, n_frames: int = 120, defect_rate: float = 0.15,
             seed: int = 7, settings: Settings | None = None) -> dict:
    """Run the whole demo; returns the summary dict (also written to summary.md/json)."""
    from musc_stream.service.wiring import Service

    out_dir.mkdir(parents=True, exist_ok=True)
    per_line = max(10, n_frames // 2)
    base = settings or load_settings(None, env={})
    # A line alerts once its window is full and its threshold has min_history steady scores; the
    # demo's defects come after that, so each one is decided at the line's own threshold.
    warmup = base.engine.window_size + base.threshold.min_history
    if data_root is not None and (data_root / "MT_Free").is_dir():
        # Two lines, each one capture set-up of the data set, interleaved as two cameras would be.
        head = min(warmup, per_line - 1)
        line_a = magnetic_tile_frames(data_root, per_line, defect_rate, seed, group="exp1", head=head)
        line_b = magnetic_tile_frames(data_root, per_line, defect_rate, seed + 1, group="exp4", head=head)
        source = f"real magnetic-tile frames from {data_root} (line tile-a: set-up exp1, tile-b: exp4)"
    else:
        line_a = texture_frames(per_line, defect_rate, seed)
        line_b = texture_frames(per_line, defect_rate, seed + 1)
        for i, f in enumerate(line_b):
            f.frame_id = f"b-{f.frame_id}"
        source = "scikit-image brick texture with painted defects (magnetic-tile data not found)"
    for f in line_b:
        f.line = "tile-b"
    frames = [f for pair in zip(line_a, line_b) for f in pair]
    # Two broken payloads show the error path: the stream keeps flowing around them.
    frames.insert(24, DemoFrame("corrupt-jpeg", frames[0].payload[:200], -1, "truncated JPEG"))
    frames.insert(30, DemoFrame("not-an-image", b"hello, this is not an image", -1, "text", "tile-b"))
    with LocalBroker() as broker:
        print(f"broker: {broker.kind} on {broker.host}:{broker.port} (MQTT {broker.protocol})", flush=True)
        s = base.model_copy(update={
            "mqtt": base.mqtt.model_copy(update={"host": broker.host, "port": broker.port,
                                                  "protocol": broker.protocol, "instance": "demo",
                                                  "client_id": "musc-stream-demo"}),
            "audit": base.audit.model_copy(update={"dir": out_dir / "audit"}),
            "state": base.state.model_copy(update={"dir": out_dir / "state"}),
            "metrics": base.metrics.model_copy(update={"port": free_port(), "host": "127.0.0.1"}),
        })
        service = Service(s)
        print("service: loading model and connecting ...", flush=True)
        service.start(ready_timeout_s=30)
        collected = Collected()
        viewer = _subscribe_results(broker.host, broker.port, broker.protocol, len(frames), collected)
        camera = Camera(broker.host, broker.port, broker.protocol, client_id="musc-demo-camera")
        print(f"cameras: replaying {len(frames)} frames on line/tile-a/frames and line/tile-b/frames ({source})",
              flush=True)
        started = time.monotonic()
        for f in frames:
            camera.publish(f.line, f.payload, frame_id=f.frame_id, camera=f"cam-{f.line}")
        finished = collected.done.wait(timeout=60 + 5 * len(frames))
        elapsed = time.monotonic() - started
        metrics_text = _scrape(service.metrics_port)
        camera.close()
        viewer.loop_stop()
        viewer.disconnect()
        service.stop()
    summary = _write_outputs(out_dir, frames, collected, source, elapsed, finished, metrics_text)
    return summary


def _scrape(port: int | None) -> str:
    import urllib.request

    if port is None:
        return ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _write_outputs(out_dir: Path, frames: list[DemoFrame], got: Collected, source: str,
                   elapsed: float, finished: bool, metrics_text: str) -> dict:
    (out_dir / "alerts").mkdir(exist_ok=True)
    (out_dir / "heatmaps").mkdir(exist_ok=True)
    for frame_id, alert in got.alerts.items():
        png = alert.pop("heatmap_png_b64", None)
        if png:
            (out_dir / "heatmaps" / f"{frame_id}.png").write_bytes(base64.b64decode(png))
        (out_dir / "alerts" / f"{frame_id}.json").write_text(json.dumps(alert, indent=2))
    with open(out_dir / "results.jsonl", "w") as fh:
        for record in got.results.values():
            fh.write(json.dumps(record) + "\n")
    with open(out_dir / "errors.jsonl", "w") as fh:
        for record in got.errors:
            fh.write(json.dumps(record) + "\n")
    (out_dir / "metrics.txt").write_text(metrics_text)
    scored = [f for f in frames if f.label >= 0 and f.frame_id in got.results]
    decided = [f for f in scored if not got.results[f.frame_id]["warmup"]]
    hits = sum(1 for f in decided if f.label == 1 and got.results[f.frame_id]["is_anomaly"])
    false_alarms = sum(1 for f in decided if f.label == 0 and got.results[f.frame_id]["is_anomaly"])
    summary = {
        "source": source, "frames_sent": len(frames), "results": len(got.results), "alerts": len(got.alerts),
        "errors": len(got.errors), "defects_after_warmup": sum(1 for f in decided if f.label == 1),
        "defects_alerted": hits, "normal_after_warmup": sum(1 for f in decided if f.label == 0),
        "false_alarms": false_alarms, "seconds": round(elapsed, 1), "complete": finished,
        "audit_files": len(list((out_dir / "audit").rglob("*.parquet"))),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = ["| line | frame | truth | score | threshold | decision |", "|---|---|---|---|---|---|"]
    for f in frames:
        r = got.results.get(f.frame_id)
        if r is None:
            rows.append(f"| {f.line} | {f.frame_id} | {f.note} | – | – | error |")
            continue
        decision = "ANOMALY" if r["is_anomaly"] else ("warm-up" if r["warmup"] else "ok")
        threshold = "–" if r["threshold"] is None else f"{r['threshold']:.3f}"
        rows.append(f"| {f.line} | {f.frame_id} | {f.note} | {r['score']:.3f} | {threshold} | {decision} |")
    text = "\n".join([
        "# musc-stream demo", "", f"Source: {source}.", "",
        *(f"- {k.replace('_', ' ')}: {v}" for k, v in summary.items() if k != "source"), "",
        "Look at: `alerts/*.json`, `heatmaps/*.png`, `audit/` (Parquet, Hive-partitioned), `results.jsonl`, "
        "`errors.jsonl`, `metrics.txt` (a /metrics scrape).", "", *rows, "",
    ])
    (out_dir / "summary.md").write_text(text)
    print(text if len(frames) <= 80 else "\n".join(text.splitlines()[:12]), flush=True)
    print(f"demo output in {out_dir.resolve()}", file=sys.stderr)
    return summary
