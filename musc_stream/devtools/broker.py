"""A local MQTT broker for the demo, tests and benchmarks: Mosquitto when installed, else amqtt.

Mosquitto speaks MQTT 5 and 3.1.1; the embedded amqtt fallback speaks 3.1.1 only, so callers read
``LocalBroker.protocol`` to configure their clients.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s} s")


class LocalBroker:
    """Start/stop a loopback broker on a free (or given) port; a context manager."""

    def __init__(self, port: int | None = None, persistence_dir: Path | None = None,
                 prefer: str = "mosquitto"):
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.persistence_dir = persistence_dir
        self.kind = "mosquitto" if prefer == "mosquitto" and shutil.which("mosquitto") else "amqtt"
        self.protocol = "5" if self.kind == "mosquitto" else "3.1.1"
        self._process: subprocess.Popen | None = None
        self._amqtt_thread: threading.Thread | None = None
        self._amqtt_loop: asyncio.AbstractEventLoop | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="musc-broker-")

    def config_text(self) -> str:
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "max_queued_messages 100000",
                 "max_inflight_messages 0", "log_type error", "log_type warning"]
        if os.geteuid() == 0:
            lines.append("user root")  # as root mosquitto would switch to user "mosquitto" and lose write access
        if self.persistence_dir is not None:
            self.persistence_dir.mkdir(parents=True, exist_ok=True)
            lines += ["persistence true", f"persistence_location {self.persistence_dir}/", "autosave_interval 1"]
        return "\n".join(lines) + "\n"

    def start(self) -> "LocalBroker":
        if self.kind == "mosquitto":
            conf = Path(self._tmp.name) / "mosquitto.conf"
            conf.write_text(self.config_text())
            self._process = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE)
        else:
            self._start_amqtt()
        wait_for_port(self.port)
        logger.info("%s broker on %s:%d (MQTT %s)", self.kind, self.host, self.port, self.protocol)
        return self

    def _start_amqtt(self) -> None:
        from amqtt.broker import Broker

        config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                  "auth": {"allow-anonymous": True}, "topic-check": {"enabled": False}}
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._amqtt_loop = loop
            asyncio.set_event_loop(loop)
            broker = Broker(config, loop=loop)
            loop.run_until_complete(broker.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(broker.shutdown())

        self._amqtt_thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._amqtt_thread.start()
        ready.wait(10)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()  # SIGTERM: mosquitto saves its persistence file first
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._process = None
        if self._amqtt_loop is not None:
            self._amqtt_loop.call_soon_threadsafe(self._amqtt_loop.stop)
            self._amqtt_thread.join(timeout=10)
            self._amqtt_loop = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._tmp.cleanup()
