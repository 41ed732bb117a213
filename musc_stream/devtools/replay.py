"""A camera stand-in: publish image files to `<prefix>/<line>/frames` as a camera would."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from musc_stream.service.frames import encode_envelope, frame_user_properties

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_files(folder: Path) -> list[Path]:
    """Images directly in ``folder`` (or, for magnetic-tile class folders, in its Imgs/), sorted."""
    root = folder / "Imgs" if (folder / "Imgs").is_dir() else folder
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in (".jpg", ".jpeg") or
                   (p.suffix.lower() == ".png" and not (root / f"{p.stem}.jpg").exists()))
    return files


class Camera:
    """An MQTT publisher with a persistent session, QoS 1, MQTT 5 user properties or the 3.1.1
    JSON envelope. Publishing while the broker is away queues frames and sends them on reconnect."""

    def __init__(self, host: str, port: int, protocol: str = "5", client_id: str = "musc-camera",
                 prefix: str = "line", username: str | None = None, password: str | None = None,
                 ca_file: str | None = None):
        self.prefix = prefix
        self.v5 = protocol == "5"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
                                  clean_session=None if self.v5 else False)
        if username:
            self.client.username_pw_set(username, password)
        if ca_file:  # TLS, trusting only this CA (the broker's certificate must name the host)
            self.client.tls_set(ca_certs=str(ca_file))
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        self.connected = threading.Event()
        self._unacked: set[int] = set()  # mids of QoS 1 frames the broker has not acknowledged
        self._acked_early: set[int] = set()  # acknowledged before publish() recorded the mid
        self._lock = threading.Lock()
        self.client.on_publish = self._on_publish
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.set() if not rc.is_failure else None
        kwargs: dict = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            kwargs = {"clean_start": False, "properties": props}
        self.client.connect_async(host, port, keepalive=30, **kwargs)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise TimeoutError(f"camera could not connect to {host}:{port}")

    def publish(self, line: str, payload: bytes, frame_id: str | None = None, ts: float | None = None,
                camera: str | None = None, raw_topic: str | None = None) -> mqtt.MQTTMessageInfo:
        """Publish one frame (image bytes) of ``line``; QoS 1."""
        topic = raw_topic or f"{self.prefix}/{line}/frames"
        ts = time.time() if ts is None else ts
        # Never hold self._lock while calling paho: its network thread calls on_publish with its
        # own message lock held, which publish() also takes (a lock-order deadlock).
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = frame_user_properties(frame_id, ts, camera)
            info = self.client.publish(topic, payload, qos=1, properties=props)
        else:
            info = self.client.publish(topic, encode_envelope(payload, frame_id, ts, camera), qos=1)
        with self._lock:
            if info.mid in self._acked_early:  # the PUBACK beat us here
                self._acked_early.discard(info.mid)
            else:
                self._unacked.add(info.mid)
        return info

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            if mid in self._unacked:
                self._unacked.discard(mid)
            else:
                self._acked_early.add(mid)

    def replay(self, line: str, files: Sequence[Path], fps: float = 0.0, camera: str | None = None,
               loop: int = 0) -> int:
        """Publish image ``files`` in order at ``fps`` (0: as fast as possible), ids from file names.

        Loop n > 0 suffixes every id with ``~n``: the service answers a repeated (line, frame_id) as
        a duplicate, so a second pass with the same ids would not be scored at all."""
        suffix = f"~{loop}" if loop else ""
        ids = [f"{p.stem[:128 - len(suffix)]}{suffix}" for p in files]  # ids are capped at 128 characters
        return self.replay_payloads(line, [p.read_bytes() for p in files], ids, fps, camera)

    def replay_payloads(self, line: str, payloads: Sequence[bytes], ids: Iterable[str], fps: float = 0.0,
                        camera: str | None = None) -> int:
        """Publish encoded frames in order at ``fps`` (0: as fast as possible); returns frames sent."""
        period = 1.0 / fps if fps > 0 else 0.0
        start = time.monotonic()
        for i, (payload, frame_id) in enumerate(zip(payloads, ids)):
            if period:
                time.sleep(max(0.0, start + i * period - time.monotonic()))
            self.publish(line, payload, frame_id=frame_id, camera=camera)
        return len(payloads)

    def close(self, timeout_s: float = 30.0) -> None:
        """Disconnect once the broker has acknowledged every frame published (QoS 1, counted by
        on_publish, which also covers frames queued while disconnected and sent on reconnect), so
        a replay that ends right after its last publish loses nothing."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._unacked:
                    break
            time.sleep(0.02)
        else:
            logger.warning("closing with %d frame(s) not yet acknowledged", len(self._unacked))
        self.client.disconnect()
        self.client.loop_stop()
