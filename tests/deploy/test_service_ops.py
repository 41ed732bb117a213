"""The running service against the shipped operations setup: the TLS broker with passwords and ACLs
(deploy/mosquitto), and a real Prometheus scraping its /metrics (deploy/prometheus).

The other deploy tests check the configs with stand-in clients; these check that the service itself
fits them: that its settings for TLS and credentials reach paho, that the ACL grants the service user
everything the service does (subscribe frames and resets, publish results and its retained status),
and that what Prometheus stores from the live endpoint is what the service counted.

The backbone is the seeded random tiny ViT: the wiring is under test here, not the scores, and it
keeps each test to seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from musc_stream.devtools.broker import LocalBroker
from musc_stream.devtools.replay import Camera
from musc_stream.service.config import Settings, load_settings
from musc_stream.service.wiring import Service

# tests/conftest.py has no package beside it, so pytest puts tests/ on sys.path; this is the same
# module the integration tests import as .helpers.
from integration.helpers import brick_frames, sample_value, scrape

from conftest import TlsBroker, running_prometheus, wait_for  # tests/deploy/conftest.py

EVENT_TIMEOUT_S = 10.0  # a broker answer that must come; a bound on failure, never a speed claim
SCORING_TIMEOUT_S = 120.0  # frames scored on a loaded 2-core box; a bound on failure
IMAGE_SIZE = 112


def ops_settings(tmp_path: Path, host: str, port: int, instance: str, **mqtt_settings) -> Settings:
    """Service settings as the integration tests use them, with the random tiny ViT (seconds to load,
    no weights needed) and a unique instance, so status topics and client ids never collide."""
    return load_settings(None, env={}, overrides={
        "mqtt": {"host": host, "port": port, "instance": instance, "reconnect_max_s": 2.0, **mqtt_settings},
        "model": {"name": "random-vit-tiny", "pretrained": None, "image_size": IMAGE_SIZE, "batch_size": 4},
        "engine": {"window_size": 8, "min_references": 5, "drift_threshold": None},
        "threshold": {"warmup_frames": 5},
        "audit": {"dir": str(tmp_path / instance / "audit")},
        "state": {"dir": str(tmp_path / instance / "state")},
        "metrics": {"host": "127.0.0.1", "port": 0},
    })


class TlsSubscriber:
    """A paho 2.x client over TLS with a user's password whose messages land in a queue."""

    def __init__(self, broker: TlsBroker, user: str) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._connacks: queue.Queue = queue.Queue()
        self._subacks: queue.Queue = queue.Queue()
        self.paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ops-{user}-{uuid.uuid4().hex[:8]}",
                                protocol=mqtt.MQTTv5)
        self.paho.username_pw_set(user, broker.users[user])
        self.paho.tls_set(ca_certs=str(broker.ca_file))
        self.paho.on_connect = lambda c, u, flags, rc, props: self._connacks.put(rc)
        self.paho.on_subscribe = lambda c, u, mid, rcs, props: self._subacks.put(rcs)
        self.paho.on_message = lambda c, u, msg: self.messages.put(msg)
        self.paho.connect(broker.host, broker.port, keepalive=30)
        self.paho.loop_start()
        rc = self._connacks.get(timeout=EVENT_TIMEOUT_S)
        assert not rc.is_failure, f"{user} refused: {rc}\n{broker.log()[-2000:]}"

    def subscribe(self, topic: str) -> None:
        self.paho.subscribe(topic, qos=1)
        codes = self._subacks.get(timeout=EVENT_TIMEOUT_S)
        assert not any(rc.is_failure for rc in codes), f"subscription to {topic} refused: {codes}"

    def next_message(self, timeout_s: float = EVENT_TIMEOUT_S) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout_s)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


def paho_threads(client_id: str) -> list[str]:
    """Names of live paho network threads of that client (paho names them after the client id)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("paho-mqtt-client-") and client_id in t.name]


# ------------------------------------------------------------------------------------------- TLS


def test_service_works_over_tls_with_its_credentials(tls_broker: TlsBroker, tmp_path):
    instance = f"ops-tls-{uuid.uuid4().hex[:6]}"
    settings = ops_settings(tmp_path, tls_broker.host, tls_broker.port, instance,
                            username=tls_broker.service_user,
                            password=tls_broker.users[tls_broker.service_user],
                            tls={"ca_file": str(tls_broker.ca_file)})
    assert settings.mqtt.tls.enabled  # implied by ca_file: the only listener speaks TLS
    consumer = TlsSubscriber(tls_broker, tls_broker.consumer_user)
    consumer.subscribe("line/+/result")
    service = Service(settings)
    camera = None
    try:
        service.start(ready_timeout_s=30)
        camera = Camera(tls_broker.host, tls_broker.port, "5", client_id=f"ops-cam-{instance}",
                        username="line1", password=tls_broker.users["line1"], ca_file=str(tls_broker.ca_file))
        ids = [f"tls-{i:02d}" for i in range(8)]
        camera.replay_payloads("line1", brick_frames(len(ids), set()), ids)

        results: dict[str, list[dict]] = {}
        deadline = time.monotonic() + SCORING_TIMEOUT_S
        while sum(map(len, results.values())) < len(ids) and time.monotonic() < deadline:
            try:
                msg = consumer.next_message(timeout_s=1.0)
            except queue.Empty:
                continue
            assert msg.topic == "line/line1/result", msg.topic
            record = json.loads(msg.payload)
            results.setdefault(record["frame_id"], []).append(record)
        assert sorted(results) == ids, (f"results for {sorted(results)}; broker log:\n"
                                        f"{tls_broker.log()[-3000:]}")
        assert all(len(r) == 1 for r in results.values()), "a frame was scored twice"
        record = results[ids[-1]][0]
        assert (record["line"], record["instance"]) == ("line1", instance)
        assert record["score"] == record["score"]  # not NaN

        # Subscribing now (long after the service's birth was routed) must hand over the stored
        # retained status: consumers that start later still learn the service is up.
        status_topic = f"musc/{instance}/status"
        consumer.subscribe(status_topic)
        status = consumer.next_message()
        assert (status.topic, status.retain) == (status_topic, True)
        body = json.loads(status.payload)
        assert (body["state"], body["instance"]) == ("online", instance)
        assert body["model"] == f"random-vit-tiny@{IMAGE_SIZE}"
        assert sample_value(scrape(service.metrics_port), "musc_mqtt_connected") == 1
    finally:
        if camera is not None:
            camera.close()
        service.stop()

    # A clean stop replaces the retained birth with "offline" (the ACL must let it write the status).
    status = consumer.next_message()
    assert json.loads(status.payload)["state"] == "offline"
    consumer.close()


def test_service_without_credentials_is_refused_and_stops_cleanly(tls_broker: TlsBroker, tmp_path,
                                                                   caplog):
    instance = f"ops-anon-{uuid.uuid4().hex[:6]}"
    settings = ops_settings(tmp_path, tls_broker.host, tls_broker.port, instance,
                            tls={"ca_file": str(tls_broker.ca_file)})
    assert settings.mqtt.username is None
    service = Service(settings)
    # A refusal no retry can cure ends start-up at once with the broker's reason, instead of
    # waiting for the ready timeout; start() then stops what it had started itself.
    with pytest.raises(ConnectionRefusedError, match="Not authorized"):
        service.start(ready_timeout_s=60)
    # It got through the TLS handshake and the broker turned it away with CONNACK "Not
    # authorized" (not, say, a certificate error), and the service logged why.
    where = f"broker {tls_broker.host}:{tls_broker.port}"
    refusals = [r.getMessage() for r in caplog.records if r.name == "musc_stream.service.wiring"
                and r.getMessage().startswith(f"{where} refused")]
    assert refusals, [r.getMessage() for r in caplog.records]
    assert all(m.startswith(f"{where} refused the connection: Not authorized") for m in refusals), refusals
    service.stop()  # a second stop is harmless
    # The failed start left no reconnect loop behind and freed the metrics port (a supervisor that
    # retries start() must not leak either).
    assert not paho_threads(settings.mqtt.client_id)
    with pytest.raises(OSError):
        scrape(service.metrics_port)


# ------------------------------------------------------------------------------------ Prometheus


def test_prometheus_scrapes_the_running_service(tmp_path):
    frames = 20
    with LocalBroker() as broker:
        assert broker.kind == "mosquitto"
        service = Service(ops_settings(tmp_path, broker.host, broker.port, "ops-prom"))
        camera = None
        try:
            service.start(ready_timeout_s=30)
            prom_dir = tmp_path / "prometheus"
            prom_dir.mkdir()
            # Prometheus first (it returns after two scrapes), then frames: a counter that moves
            # only between scrapes is what rate() needs; frames sent before the first scrape would
            # leave it flat.
            with running_prometheus(f"127.0.0.1:{service.metrics_port}", prom_dir) as prom:
                camera = Camera(broker.host, broker.port, broker.protocol, client_id="ops-prom-cam")
                camera.replay_payloads("l1", brick_frames(frames, set()), [f"p{i:02d}" for i in range(frames)],
                                       fps=4.0)  # ~5 s: several 1 s scrapes see the count rise
                wait_for(lambda: sample_value(scrape(service.metrics_port), "musc_frames_scored_total",
                                              line="l1") == frames,
                         f"{frames} frames scored", timeout_s=SCORING_TIMEOUT_S)

                # Prometheus has stored the service's own count, not just some samples.
                selector = 'musc_frames_scored_total{job="musc-stream",line="l1"}'
                stored = prom.wait_for(
                    lambda: [s for s in prom.query(selector) if float(s["value"][1]) == frames],
                    f"a scrape with {frames} frames scored")
                assert len(stored) == 1

                rate = prom.query(f"rate({selector}[30s])")
                assert len(rate) == 1 and float(rate[0]["value"][1]) > 0, rate
                increase = prom.query(f"increase({selector}[1m])")
                assert len(increase) == 1 and float(increase[0]["value"][1]) > 0, increase

                up = prom.query('up{job="musc-stream"}')
                assert [float(s["value"][1]) for s in up] == [1.0]
                info = prom.query('musc_info{job="musc-stream"}')
                assert len(info) == 1, info
                assert info[0]["metric"]["model"] == f"random-vit-tiny@{IMAGE_SIZE}"
                assert "NOT pretrained" in info[0]["metric"]["weights"]
                connected = prom.query('musc_mqtt_connected{job="musc-stream"}')
                assert [float(s["value"][1]) for s in connected] == [1.0]
        finally:
            if camera is not None:
                camera.close()
            service.stop()
