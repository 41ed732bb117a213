"""Soak: does the service's memory stay flat over an hour of steady traffic, and is every frame
answered exactly once?

Everything is real: Mosquitto with its default limits, `musc-stream serve` as a subprocess (the
process systemd runs), one paced MQTT 5 camera per line publishing real magnetic-tile JPEGs
(../shared/data/magnetic_tile/MT_Free, read by path) with unique frame ids, the Parquet audit read
back with pyarrow. The service's RSS is read from /proc/<pid>/status every ``--sample-s`` seconds.
The backbone is the seeded random tiny ViT ("random weights, speed/memory only"): the soak is
about memory and delivery, and a light model leaves the shared CPU to others. Memory, window and
threshold run at their defaults, so the patch memory fills to its cap during the warm-up and the
rest of the run is steady state. Writes benchmarks/results/soak.{md,json,png}.

    .venv/bin/python benchmarks/bench_soak.py --minutes 60 [--lines 4 --fps 1 --warmup-minutes 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, environment, environment_lines  # noqa: E402

from musc_stream.devtools.broker import LocalBroker  # noqa: E402
from musc_stream.devtools.replay import image_files  # noqa: E402
from musc_stream.service.frames import frame_user_properties  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = {"name": "random-vit-tiny", "image_size": 112}


class StockBroker(LocalBroker):
    """Mosquitto with its default limits (20 in flight, 1000 queued per client)."""

    def config_text(self) -> str:
        relaxed = ("max_queued_messages", "max_inflight_messages")
        return "".join(line + "\n" for line in super().config_text().splitlines() if not line.startswith(relaxed))


class PacedCamera:
    """One MQTT 5 client per line, QoS 1; ``acked`` holds the ids the broker acknowledged."""

    def __init__(self, port: int, line: str):
        self.line = line
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-{line}", protocol=mqtt.MQTTv5)
        self.client.max_queued_messages_set(0)
        self.acked: set[str] = set()
        self.published = 0
        self._mids: dict[int, str] = {}
        self._early: set[int] = set()
        self._lock = threading.Lock()
        connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: connected.set()
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert connected.wait(10), f"camera of {line} could not connect"

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            name = self._mids.pop(mid, None)
            if name is None:
                self._early.add(mid)
            else:
                self.acked.add(name)

    def publish(self, payload: bytes, frame_id: str) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = frame_user_properties(frame_id, time.time())
        info = self.client.publish(f"line/{self.line}/frames", payload, qos=1, properties=props)
        with self._lock:
            self.published += 1
            if info.mid in self._early:
                self._early.discard(info.mid)
                self.acked.add(frame_id)
            else:
                self._mids[info.mid] = frame_id

    def run(self, payloads: list[bytes], fps: float, until: float, offset: float) -> None:
        period, n = 1.0 / fps, 0
        start = time.monotonic() + offset
        while True:
            due = start + n * period
            if due >= until:
                return
            time.sleep(max(0.0, due - time.monotonic()))
            self.publish(payloads[n % len(payloads)], f"soak{n:06d}")
            n += 1

    def close(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._mids:
            time.sleep(0.05)
        self.client.disconnect()
        self.client.loop_stop()


class ResultCounter:
    """Counts result messages per (line, frame_id) (QoS 1)."""

    def __init__(self, port: int):
        self.results: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-results", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([("line/+/result", 1)])
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10), "result counter could not subscribe"

    def _on_message(self, client, userdata, message) -> None:
        record = json.loads(message.payload)
        key = (record["line"], record["frame_id"])
        with self._lock:
            self.results[key] = self.results.get(key, 0) + 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def read_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads of a process, from /proc/<pid>/status."""
    values = {}
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = row.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            values[key] = int(rest.split()[0])
    return values


def audit_rows(directory: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for _ in range(20):
        try:
            return [row for path in sorted(directory.rglob("*.parquet"))
                    for row in pq.read_table(pa.BufferReader(path.read_bytes()),
                                             columns=["line", "frame_id", "error_reason"]).to_pylist()]
        except FileNotFoundError:
            time.sleep(0.05)
    raise RuntimeError(f"audit files under {directory} kept changing while read")


def service_env(port: int, work: Path) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
        "MUSC_MQTT__HOST": "127.0.0.1", "MUSC_MQTT__PORT": str(port), "MUSC_MQTT__INSTANCE": "soak",
        "MUSC_MODEL__NAME": MODEL["name"], "MUSC_MODEL__PRETRAINED": "null", "MUSC_MODEL__DEVICE": "cpu",
        "MUSC_MODEL__IMAGE_SIZE": str(MODEL["image_size"]),
        "MUSC_AUDIT__DIR": str(work / "audit"), "MUSC_STATE__DIR": str(work / "state"),
        "MUSC_METRICS__ENABLED": "false",
        # random weights see every frame as a product changeover; a reset would empty the memory
        "MUSC_ENGINE__DRIFT_THRESHOLD": "null", "MUSC_ENGINE__DRIFT_RATIO": "null",
    }


def slope_mib_per_hour(samples: list[dict], since_s: float) -> float | None:
    """Least-squares slope of RSS over time after the warm-up."""
    pts = [(s["t_s"], s["rss_mib"]) for s in samples if s["t_s"] >= since_s]
    if len(pts) < 3:
        return None
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    mr = sum(r for _, r in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    return sum((t - mt) * (r - mr) for t, r in pts) / var * 3600.0 if var else None


def plot(samples: list[dict], warmup_s: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    ax.plot([s["t_s"] / 60 for s in samples], [s["rss_mib"] for s in samples], lw=1.4, label="RSS")
    ax.axvspan(0, warmup_s / 60, color="0.9", label="warm-up (excluded)")
    ax.set_xlabel("minutes since READY")
    ax.set_ylabel("RSS, MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def wait_ready(process: subprocess.Popen, log: Path, port: int, timeout_s: float = 180) -> None:
    """READY once the service's retained status says online (it publishes it on connect)."""
    online = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-status", protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("musc/soak/status", 1)

    def on_message(c, u, message):
        try:
            if json.loads(message.payload).get("state") == "online":
                online.set()
        except ValueError:
            pass

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    deadline = time.monotonic() + timeout_s
    try:
        while not online.wait(0.5):
            if process.poll() is not None:
                raise RuntimeError(f"service exited ({process.returncode}):\n{log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"service not online within {timeout_s} s:\n{log.read_text()[-2000:]}")
    finally:
        client.loop_stop()
        client.disconnect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="traffic duration")
    parser.add_argument("--lines", type=int, default=4)
    parser.add_argument("--fps", type=float, default=1.0, help="frames/s per line (paced)")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--warmup-minutes", type=float, default=None,
                        help="excluded from the slope (default: min(10, minutes / 3))")
    parser.add_argument("--out", default="soak", help="results file stem under benchmarks/results/")
    args = parser.parse_args()
    warmup_s = 60 * (args.warmup_minutes if args.warmup_minutes is not None else min(10.0, args.minutes / 3))
    env_info = environment()
    payloads = [p.read_bytes() for p in image_files(DATA / "MT_Free")[:64]]
    assert payloads, f"no MT_Free images under {DATA}"
    lines = [f"soak{i}" for i in range(args.lines)]

    with tempfile.TemporaryDirectory(prefix="musc-soak-") as tmp, StockBroker(persistence_dir=Path(tmp) / "mq") as broker:
        work = Path(tmp)
        log = work / "service.log"
        with open(log, "ab") as log_file:
            process = subprocess.Popen([sys.executable, "-m", "musc_stream.cli", "serve"],
                                       env=service_env(broker.port, work), stdout=log_file, stderr=subprocess.STDOUT,
                                       cwd=REPO)
        try:
            wait_ready(process, log, broker.port)
            counter = ResultCounter(broker.port)
            cameras = [PacedCamera(broker.port, line) for line in lines]
            t0 = time.monotonic()
            until = t0 + 60 * args.minutes
            threads = [threading.Thread(target=c.run, args=(payloads, args.fps, until, i / (args.fps * len(lines))),
                                        daemon=True) for i, c in enumerate(cameras)]
            for t in threads:
                t.start()
            samples: list[dict] = []
            progress = work / "samples.json"
            while True:
                now = time.monotonic()
                status = read_status(process.pid)
                samples.append({"t_s": round(now - t0, 1), "rss_mib": round(status["VmRSS"] / 1024, 1),
                                "hwm_mib": round(status["VmHWM"] / 1024, 1), "threads": status["Threads"],
                                "published": sum(c.published for c in cameras)})
                progress.write_text(json.dumps(samples))
                if now >= until or process.poll() is not None:
                    break
                time.sleep(max(0.0, min(args.sample_s, until - time.monotonic())))
            for t in threads:
                t.join()
            for c in cameras:
                c.close()
            acked = {(c.line, fid) for c in cameras for fid in c.acked}
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # the tail of the stream is still being scored
                answered = {(r["line"], r["frame_id"]) for r in audit_rows(work / "audit")}
                if acked <= answered:
                    break
                time.sleep(2)
            time.sleep(3)  # a second decision or result, if any, would come now
            final = read_status(process.pid)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(120)
        counter.close()
        rows = audit_rows(work / "audit")
        service_log = log.read_text(errors="replace")

    decisions: dict[tuple[str, str], int] = {}
    others: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        key = (r["line"], r["frame_id"])
        if r["error_reason"] is None:
            decisions[key] = decisions.get(key, 0) + 1
        else:
            others.setdefault(key, []).append(r["error_reason"])
    reasons: dict[str, int] = {}
    for key in acked:
        if key not in decisions:
            for reason in others.get(key, []):
                reasons[reason] = reasons.get(reason, 0) + 1
    lost = sorted(k for k in acked if k not in decisions and k not in others)
    twice = sorted(k for k, c in decisions.items() if c > 1)
    steady = [s for s in samples if s["t_s"] >= warmup_s] or samples
    slope = slope_mib_per_hour(samples, warmup_s)
    summary = {
        "minutes": args.minutes, "lines": args.lines, "fps_per_line": args.fps, "warmup_minutes": warmup_s / 60,
        "model": f"{MODEL['name']} at {MODEL['image_size']} px, random weights, speed/memory only",
        "published": sum(c.published for c in cameras), "acked": len(acked),
        "decided_once": sum(1 for k in acked if decisions.get(k) == 1), "answered_other": reasons,
        "lost": len(lost), "twice": len(twice), "results": sum(counter.results.values()),
        "results_repeated": sum(1 for v in counter.results.values() if v > 1),
        "rss_start_mib": steady[0]["rss_mib"], "rss_end_mib": steady[-1]["rss_mib"],
        "rss_max_mib": max(s["rss_mib"] for s in steady), "rss_min_mib": min(s["rss_mib"] for s in steady),
        "rss_at_ready_mib": samples[0]["rss_mib"], "hwm_mib": final["VmHWM"] / 1024,
        "slope_mib_per_hour": None if slope is None else round(slope, 2),
        "threads_start": steady[0]["threads"], "threads_end": steady[-1]["threads"],
        "service_exit": process.returncode, "tracebacks_in_log": service_log.count("Traceback"),
        "load_average": os.getloadavg(),
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / args.out
    (stem.with_suffix(".json")).write_text(json.dumps({"environment": env_info, "summary": summary,
                                                       "samples": samples, "lost": lost[:50], "twice": twice[:50]},
                                                      indent=1, default=list))
    title = (f"musc-stream serve, {args.lines} lines x {args.fps:g} fps, {summary['model']} "
             f"(commit {env_info['commit']})")
    plot(samples, warmup_s, stem.with_suffix(".png"), title)
    s = summary
    md = [
        "# Soak: RSS and delivery over a long steady run", "",
        *environment_lines(env_info),
        f"- model: {s['model']}; changeover detection off (random features look like a new product); defaults otherwise (window 16, memory on with its cap of 20,000 patches "
        "per line, combined scoring, audit on)",
        f"- traffic: {args.lines} lines, one MQTT 5 camera each at {args.fps:g} frames/s, unique ids, real "
        "MT_Free JPEGs; stock Mosquitto (default limits); `musc-stream serve` as a subprocess",
        f"- RSS from /proc/<pid>/status every {args.sample_s:g} s; the first {warmup_s / 60:g} min are "
        "warm-up (memory filling to its cap) and excluded from start/end/max and the slope",
        f"- load average at the end (1/5/15 min): {' / '.join(f'{x:.2f}' for x in s['load_average'])} "
        "(the 2 cores are shared with other jobs)",
        f"- command: `.venv/bin/python benchmarks/bench_soak.py --minutes {args.minutes:g} --lines {args.lines} "
        f"--fps {args.fps:g}`", "",
        "| minutes | lines | frames in (acked) | decided once | lost | twice | other answers | RSS at READY MiB "
        "| RSS start MiB | RSS end MiB | RSS max MiB | slope MiB/h | threads start/end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {args.minutes:g} | {args.lines} | {s['acked']} | {s['decided_once']} | {s['lost']} | {s['twice']} | "
        f"{', '.join(f'{k}: {v}' for k, v in reasons.items()) or 'none'} | {s['rss_at_ready_mib']:.0f} | "
        f"{s['rss_start_mib']:.0f} | {s['rss_end_mib']:.0f} | {s['rss_max_mib']:.0f} | "
        f"{'n/a' if slope is None else f'{slope:+.1f}'} | {s['threads_start']}/{s['threads_end']} |", "",
        f"Results received: {s['results']} ({s['results_repeated']} repeated; results are at least once). "
        f"Service exit code after SIGTERM: {s['service_exit']}; tracebacks in its log: {s['tracebacks_in_log']}.",
        "", f"![RSS over time]({stem.with_suffix('.png').name})", "",
    ]
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
