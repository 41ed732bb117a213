"""The paho-mqtt 2.x client: protocol, credentials, TLS, last will, persistent session, topics."""

from __future__ import annotations

import json
import logging
import ssl

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from musc_stream.config import MqttSettings
from musc_stream.records import SCHEMA_VERSION

logger = logging.getLogger(__name__)


class Topics:
    """Every topic the service reads or writes; the names themselves come from MqttSettings."""

    def __init__(self, settings: MqttSettings):
        self._settings = settings
        self.prefix = settings.topic_prefix
        self.subscribe_frames = settings.frames_subscription
        # Reset commands are never shared: every worker holding the line's state must hear them.
        self.reset_filter = settings.reset_subscription
        self.status = settings.status_topic

    def result(self, line: str) -> str:
        return self._settings.line_topic(line, "result")

    def anomaly(self, line: str) -> str:
        return self._settings.line_topic(line, "anomaly")

    def heatmap(self, line: str) -> str:
        return self._settings.line_topic(line, "anomaly/heatmap")

    def error(self, line: str | None) -> str:
        return self._settings.line_topic(line or "_unknown", "error")

    def kind(self, topic: str) -> str:
        """'frames', 'reset' or 'other' for an incoming topic."""
        parts = topic.split("/")
        if len(parts) >= 3 and topic.startswith(self.prefix + "/"):
            return {"frames": "frames", "reset": "reset"}.get(parts[-1], "other")
        return "other"


def offline_payload(instance: str) -> bytes:
    """The retained last will: what subscribers see after the service dies without a goodbye."""
    return json.dumps({"schema": SCHEMA_VERSION, "state": "offline", "instance": instance}).encode()


def create_client(settings: MqttSettings) -> mqtt.Client:
    """A configured but unconnected client with manual acks (frames are acked once durable)."""
    v5 = settings.protocol == "5"
    client_id = settings.client_id or f"musc-stream-{settings.instance}"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else settings.clean_start,
        manual_ack=True,
    )
    if settings.username:
        password = settings.password.get_secret_value() if settings.password else None
        client.username_pw_set(settings.username, password)
    tls = settings.tls
    if tls.enabled or tls.ca_file or tls.cert_file:
        client.tls_set(
            ca_certs=str(tls.ca_file) if tls.ca_file else None,
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
            cert_reqs=ssl.CERT_NONE if tls.insecure else ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(bool(tls.insecure))
    client.will_set(settings.status_topic, offline_payload(settings.instance), qos=1, retain=True)
    client.reconnect_delay_set(min_delay=max(1, int(settings.reconnect_min_s)),
                               max_delay=max(1, int(settings.reconnect_max_s)))
    # Keep publishing while reconnecting: paho holds QoS>0 messages and sends them afterwards.
    client.max_queued_messages_set(0)
    return client


def connect_kwargs(settings: MqttSettings) -> dict:
    """Arguments for client.connect_async: a persistent session unless clean_start is asked for."""
    kwargs: dict = {"host": settings.host, "port": settings.port, "keepalive": settings.keepalive}
    if settings.protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = settings.session_expiry_s
        # Frames held for warm-up stay unacked; a large receive maximum keeps the broker sending.
        props.ReceiveMaximum = 65535
        kwargs.update(clean_start=settings.clean_start, properties=props)
    return kwargs
