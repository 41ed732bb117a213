"""Pieces of the fault suite: a stock Mosquitto, the service as a real process, a camera fleet that
records what the broker acknowledged, and the ledger that compares it with the audit.

Everything is real: Mosquitto with its default limits (20 in-flight QoS 1 messages, 1000 queued),
`musc-stream serve` as a subprocess with a real sd_notify socket, Parquet read back with pyarrow.
The backbone is the seeded random tiny ViT: delivery does not depend on the weights.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

from musc_stream.devtools.broker import LocalBroker, free_port
from musc_stream.service.frames import encode_envelope, frame_user_properties

LINES = tuple(f"line{i}" for i in range(8))  # 8 lines starting together


class StockBroker(LocalBroker):
    """Mosquitto with its default limits; persistence on, so a restart keeps sessions."""

    def config_text(self) -> str:
        relaxed = ("max_queued_messages", "max_inflight_messages")
        return "".join(line + "\n" for line in super().config_text().splitlines() if not line.startswith(relaxed))


def frame_payloads(n: int, size: int = 96, seed: int = 0) -> list[bytes]:
    """Small JPEGs of scikit-image's real brick photo (random crops)."""
    from skimage import data

    rng = np.random.default_rng(seed)
    brick = data.brick()
    out = []
    for _ in range(n):
        y, x = rng.integers(0, brick.shape[0] - size, 2)
        img = np.stack([brick[y:y + size, x:x + size]] * 3, -1)
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


class Fleet:
    """One MQTT client publishing for all lines (QoS 1, persistent session); ``acked`` holds the
    "line/frame_id" of every frame the broker acknowledged, which the service owes an answer."""

    def __init__(self, port: int, protocol: str, client_id: str = "fault-cameras"):
        self.v5 = protocol == "5"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
                                  clean_session=None if self.v5 else False)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        self.acked: set[str] = set()
        self.published: list[str] = []
        self._mids: dict[int, str] = {}
        self._early: set[int] = set()
        self._lock = threading.Lock()
        self.client.on_publish = self._on_publish
        connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: connected.set()
        kwargs: dict = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            kwargs = {"clean_start": False, "properties": props}
        self.client.connect_async("127.0.0.1", port, keepalive=30, **kwargs)
        self.client.loop_start()
        assert connected.wait(10), "camera fleet could not connect"

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            name = self._mids.pop(mid, None)
            if name is None:
                self._early.add(mid)
            else:
                self.acked.add(name)

    def publish(self, line: str, payload: bytes, frame_id: str) -> None:
        topic = f"line/{line}/frames"
        ts = time.time()
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = frame_user_properties(frame_id, ts)
            info = self.client.publish(topic, payload, qos=1, properties=props)
        else:
            info = self.client.publish(topic, encode_envelope(payload, frame_id, ts), qos=1)
        name = f"{line}/{frame_id}"
        with self._lock:
            self.published.append(name)
            if info.mid in self._early:
                self._early.discard(info.mid)
                self.acked.add(name)
            else:
                self._mids[info.mid] = name

    def round(self, payloads: list[bytes], start: int, count: int, prefix: str = "f") -> None:
        """``count`` frames on every line, interleaved (all lines start together)."""
        for n in range(start, start + count):
            for line in LINES:
                self.publish(line, payloads[n % len(payloads)], f"{prefix}{n:04d}")

    def burst(self, payloads: list[bytes], start: int, count: int, fps: float, prefix: str = "f") -> threading.Thread:
        """Publish ``count`` frames per line at ``fps`` frames/s in total, in a thread."""
        def run() -> None:
            period = 1.0 / fps
            t0 = time.monotonic()
            k = 0
            for n in range(start, start + count):
                for line in LINES:
                    time.sleep(max(0.0, t0 + k * period - time.monotonic()))
                    self.publish(line, payloads[n % len(payloads)], f"{prefix}{n:04d}")
                    k += 1
        thread = threading.Thread(target=run, name="fleet-burst", daemon=True)
        thread.start()
        return thread

    def wait_acked(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._mids:
                    return
            time.sleep(0.05)

    def close(self) -> None:
        self.wait_acked(30)
        self.client.disconnect()
        self.client.loop_stop()


class Results:
    """Collects result and error messages (persistent session, QoS 1)."""

    def __init__(self, port: int, client_id: str = "fault-results"):
        import json

        self._json = json
        self.results: dict[str, int] = {}
        self.errors: list[dict] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([("line/+/result", 1), ("line/+/error", 1)])
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        assert subscribed.wait(10), "results collector could not subscribe"

    def _on_message(self, client, userdata, message) -> None:
        record = self._json.loads(message.payload)
        with self._lock:
            if message.topic.endswith("/result"):
                name = f"{record['line']}/{record['frame_id']}"
                self.results[name] = self.results.get(name, 0) + 1
            else:
                self.errors.append(record)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class ServiceProcess:
    """`musc-stream serve` as a subprocess; READY comes from a real sd_notify socket."""

    def __init__(self, workdir: Path, port: int, protocol: str, audit_dir: Path | None = None, **env: str):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.audit_dir = audit_dir or self.dir / "audit"
        self.log_path = self.dir / "service.log"
        self.notify_path = str(self.dir / "notify.sock")
        self.env = {
            "PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "MUSC_MQTT__HOST": "127.0.0.1", "MUSC_MQTT__PORT": str(port), "MUSC_MQTT__PROTOCOL": protocol,
            "MUSC_MQTT__INSTANCE": "faults", "MUSC_MQTT__RECONNECT_MIN_S": "0.5", "MUSC_MQTT__RECONNECT_MAX_S": "1",
            "MUSC_MODEL__NAME": "random-vit-tiny", "MUSC_MODEL__PRETRAINED": "null", "MUSC_MODEL__DEVICE": "cpu",
            "MUSC_MODEL__IMAGE_SIZE": "64", "MUSC_MODEL__BATCH_SIZE": "8",
            "MUSC_ENGINE__WINDOW_SIZE": "6", "MUSC_ENGINE__MIN_REFERENCES": "5",
            "MUSC_ENGINE__DRIFT_THRESHOLD": "null", "MUSC_ENGINE__HEARTBEAT_S": "2",
            "MUSC_THRESHOLD__WARMUP_FRAMES": "3", "MUSC_MEMORY__ENABLED": "false", "MUSC_ENGINE__SCORE_MODE": "window",
            "MUSC_AUDIT__DIR": str(self.audit_dir), "MUSC_STATE__DIR": str(self.dir / "state"),
            "MUSC_METRICS__ENABLED": "false", "NOTIFY_SOCKET": self.notify_path, **env,
        }
        self.process: subprocess.Popen | None = None
        self.statuses: list[str] = []  # every STATUS= the service sent to its notify socket
        self._notify: socket.socket | None = None
        self._ready = threading.Event()

    def start(self, timeout_s: float = 120) -> "ServiceProcess":
        if self._notify is None:
            if os.path.exists(self.notify_path):
                os.unlink(self.notify_path)
            self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify.bind(self.notify_path)
            threading.Thread(target=self._read_notify, daemon=True).start()
        self._ready.clear()
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "musc_stream.cli", "serve"], env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.5):
            assert self.process.poll() is None, f"service exited ({self.process.returncode}):\n{self.log()[-2000:]}"
            assert time.monotonic() < deadline, f"no READY within {timeout_s} s:\n{self.log()[-2000:]}"
        return self

    def _read_notify(self) -> None:
        """Read sd_notify datagrams as systemd does (an unread socket fills and blocks the sender)."""
        while True:
            try:
                message = self._notify.recv(4096).decode()
            except OSError:
                return
            for field_ in message.splitlines():
                if field_.startswith("STATUS="):
                    self.statuses.append(field_[len("STATUS="):])
                elif field_ == "READY=1":
                    self._ready.set()

    def signal(self, sig: int) -> int:
        self.process.send_signal(sig)
        return self.process.wait(60)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def stop(self) -> int:
        if self.process is not None and self.process.poll() is None:
            return self.signal(signal.SIGTERM)
        return self.process.returncode if self.process else 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Ledger:
    """What the broker acknowledged vs what the audit and the result topic say."""

    published: int
    acked: int
    decided: int  # acked frames with exactly one decision row
    answered_other: int  # acked frames answered only by a failure/drop row (reason in notes)
    lost: list[str]  # acked frames with no audit row at all
    twice: list[str]  # frames with more than one decision row
    no_result: int  # decided frames whose result message did not arrive
    results_repeated: int  # frames whose result came twice (results are at least once: README)
    reasons: dict[str, int] = field(default_factory=dict)


def audit_table(directory: Path) -> list[dict]:
    """(line, frame_id, error_reason) of every row in the closed ``*.parquet`` files, read while
    the service may be rewriting them (a file replaced under us is read again)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for _ in range(20):
        try:
            rows: list[dict] = []
            for path in sorted(Path(directory).rglob("*.parquet")):
                rows += pq.read_table(pa.BufferReader(path.read_bytes()),  # one open: a replace cannot tear it
                                      columns=["line", "frame_id", "error_reason"]).to_pylist()
            return rows
        except FileNotFoundError:
            time.sleep(0.05)
    raise RuntimeError(f"audit files under {directory} kept changing while read")


def ledger(fleet: Fleet, audit_dir: Path, results: Results) -> Ledger:
    rows = audit_table(audit_dir)
    decisions: dict[str, int] = {}
    others: dict[str, list[str]] = {}
    for r in rows:
        name = f"{r['line']}/{r['frame_id']}"
        if r["error_reason"] is None:
            decisions[name] = decisions.get(name, 0) + 1
        else:
            others.setdefault(name, []).append(r["error_reason"])
    acked = fleet.acked
    reasons: dict[str, int] = {}
    for name in acked:
        if name not in decisions:
            for reason in others.get(name, []):
                reasons[reason] = reasons.get(reason, 0) + 1
    twice = sorted(n for n, c in decisions.items() if c > 1)
    return Ledger(
        published=len(fleet.published), acked=len(acked),
        decided=sum(1 for n in acked if decisions.get(n) == 1),
        answered_other=sum(1 for n in acked if n not in decisions and n in others),
        lost=sorted(n for n in acked if n not in decisions and n not in others),
        twice=twice,
        no_result=sum(1 for n in decisions if n not in results.results),
        results_repeated=sum(1 for c in results.results.values() if c > 1),
        reasons=reasons,
    )


def wait_until(predicate, timeout_s: float, step_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


def answered(fleet: Fleet, audit_dir: Path) -> int:
    """How many acked frames have an audit row of any kind."""
    names = {f"{r['line']}/{r['frame_id']}" for r in audit_table(audit_dir)}
    return len(fleet.acked & names)


def free_tcp_port() -> int:
    return free_port()
