"""`musc-stream serve` as real processes: SIGKILL and restart, and two workers on a shared subscription."""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from musc_stream.devtools.broker import free_port
from musc_stream.devtools.replay import Camera

from .helpers import Collector, brick_frames, sample_value, scrape

pytestmark = pytest.mark.integration


class Worker:
    """One `musc-stream serve` process; READY is read from a real sd_notify socket."""

    def __init__(self, tmp_path: Path, port: int, instance: str, **env: str):
        self.dir = tmp_path / instance
        self.dir.mkdir(exist_ok=True)
        self.metrics_port = free_port()
        self.notify_path = str(self.dir / "notify.sock")
        if os.path.exists(self.notify_path):
            os.unlink(self.notify_path)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.messages: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read_notify, daemon=True).start()
        self.env = {
            "PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "NOTIFY_SOCKET": self.notify_path,
            "MUSC_MQTT__HOST": "127.0.0.1", "MUSC_MQTT__PORT": str(port), "MUSC_MQTT__INSTANCE": instance,
            "MUSC_MQTT__RECONNECT_MAX_S": "2",
            "MUSC_MODEL__NAME": "random-vit-tiny", "MUSC_MODEL__PRETRAINED": "null",
            "MUSC_MODEL__IMAGE_SIZE": "112", "MUSC_ENGINE__WINDOW_SIZE": "6",
            "MUSC_ENGINE__DRIFT_THRESHOLD": "null", "MUSC_THRESHOLD__WARMUP_FRAMES": "3",
            "MUSC_AUDIT__DIR": str(self.dir / "audit"), "MUSC_STATE__DIR": str(self.dir / "state"),
            "MUSC_STATE__SNAPSHOT_INTERVAL_S": "0.5", "MUSC_METRICS__HOST": "127.0.0.1",
            "MUSC_METRICS__PORT": str(self.metrics_port), **env,
        }
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> "Worker":
        log = open(self.dir / "service.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "musc_stream.cli", "serve"], env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if "READY=1" in self.messages.get(timeout=max(0.01, deadline - time.monotonic())):
                    return self
            except queue.Empty:
                raise TimeoutError(f"no READY from {self.dir.name} within {timeout_s} s") from None

    def _read_notify(self) -> None:
        """Read the notify socket for as long as the test runs, as systemd does: a socket nobody
        reads fills up (10 datagrams) and then blocks the sender."""
        while True:
            try:
                self.messages.put(self.notify.recv(4096).decode())
            except OSError:
                return

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)
        return self.process.returncode

    def audit_frame_ids(self) -> list[str]:
        table = ds.dataset(self.dir / "audit", format="parquet", partitioning="hive").to_table()
        return [r["frame_id"] for r in table.to_pylist() if r["error_reason"] is None]


def test_sigkill_and_restart_loses_no_acknowledged_frame_and_reloads_memory(broker, tmp_path):
    collector = Collector(broker.port)
    camera = Camera("127.0.0.1", broker.port, "5", client_id="kill-camera")
    # A budget far above the default, so the memory is snapshotted at the first tick (by default a
    # crash loses the memory learnt since the last one, up to ~2.8 h at ViT-S: README).
    worker = Worker(tmp_path, broker.port, "w1", MUSC_STATE__MAX_SNAPSHOT_BYTES_PER_DAY=str(10 ** 13)).start()
    frames = brick_frames(60, set(), seed=11, size=128)
    ids = [f"k{i:02d}" for i in range(60)]
    sender = threading.Thread(target=camera.replay_payloads, args=("k1", frames, ids, 15.0))
    sender.start()  # a camera at 15 frames/s; the kill lands while it is still sending
    def memory_saved() -> bool:  # the engine names a line's folder <id>-<hash>
        return any((worker.dir / "state").glob("k1*/manifest-*.json"))

    assert collector.wait_for(lambda c: len(c.results) >= 14 and memory_saved(), 180)
    worker.kill()  # no goodbye: no final flush, no final state save
    seen_before = set(collector.results)
    assert len(seen_before) < 60, "the kill should land mid-stream"

    worker.start()
    text = scrape(worker.metrics_port)
    assert sample_value(text, "musc_memory_patches", line="k1") > 0, "memory snapshot not reloaded"
    sender.join()
    assert collector.wait_for(lambda c: len(c.results) >= 60, 180), sorted(set(ids) - set(collector.results))
    assert worker.stop() == 0
    audited = worker.audit_frame_ids()
    assert set(audited) == set(ids)  # every frame decided and on disk, none lost to the kill
    statuses = [s["state"] for s in collector.statuses]
    assert "online" in statuses and statuses[-1] == "offline"
    camera.close()
    collector.close()


def test_two_workers_share_a_line_and_score_each_frame_once(broker, tmp_path):
    collector = Collector(broker.port)
    workers = [Worker(tmp_path, broker.port, name, MUSC_MQTT__SHARED_GROUP="inspect").start()
               for name in ("wa", "wb")]
    camera = Camera("127.0.0.1", broker.port, "5", client_id="share-camera")
    frames = brick_frames(40, set(), seed=13, size=128)
    for i, payload in enumerate(frames):
        camera.publish("s1", payload, frame_id=f"s{i:02d}")
    try:
        assert collector.wait_for(lambda c: len(c.results) >= 40, 240)
        time.sleep(1.0)  # a duplicate, if any, would arrive now
        assert all(len(v) == 1 for v in collector.results.values()), "a frame was scored twice"
        by_instance = {}
        for records in collector.results.values():
            by_instance.setdefault(records[0]["instance"], []).append(records[0]["frame_id"])
        assert set(by_instance) == {"wa", "wb"}
        assert all(len(ids) >= 10 for ids in by_instance.values()), {k: len(v) for k, v in by_instance.items()}
    finally:
        for w in workers:
            w.stop()
        camera.close()
        collector.close()
    audited = [fid for w in workers for fid in w.audit_frame_ids()]
    assert sorted(audited) == sorted(f"s{i:02d}" for i in range(40))
