"""The paho-mqtt 2.x client: protocol, credentials, TLS, last will, persistent session, topics."""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from musc_stream.service.config import MqttSettings
from musc_stream.stream.records import SCHEMA_VERSION

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

    def frame(self, line: str) -> str:
        """The clean frame of an alert (mqtt.publish_clean_frame)."""
        return self._settings.line_topic(line, "anomaly/frame")

    def error(self, line: str | None) -> str:
        return self._settings.line_topic(line or "_unknown", "error")

    def kind(self, topic: str) -> str:
        """'frames', 'reset' or 'other' for an incoming topic."""
        parts = topic.split("/")
        if len(parts) >= 3 and topic.startswith(self.prefix + "/"):
            return {"frames": "frames", "reset": "reset"}.get(parts[-1], "other")
        return "other"


# Bytes of a PUBLISH packet besides topic and payload that we allow for: fixed header (5), topic length
# (2), packet id (2), property length (4) and room for user properties (frame_id, line).
PACKET_OVERHEAD = 2048


class ServiceClient(mqtt.Client):
    """The paho client of the service: remembers what the broker allows, and no callback exception
    ever ends paho's network thread (a frame that trips a bug must not silence the whole line).

    ``broker_max_packet_size``: the MQTT 5 CONNACK Maximum Packet Size of the current connection
    (None when the broker sent none, and always with MQTT 3.1.1). ``max_publish_bytes``: the
    largest payload the service may publish (mqtt.max_publish_bytes); ``payload_limit(topic)``
    combines both.
    """

    _GUARDED = ("on_message", "on_subscribe", "on_disconnect", "on_publish", "on_connect_fail", "on_log")

    def __init__(self, *args: Any, max_publish_bytes: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_publish_bytes = max_publish_bytes
        self.broker_max_packet_size: int | None = None
        self._user_on_connect: Callable[..., Any] | None = None
        # Backstop for callbacks the guards below do not wrap (message_callback_add); paho logs them.
        self.suppress_exceptions = True
        self.enable_logger(logging.getLogger("paho.mqtt.client"))  # its INFO chatter is DEBUG in the CLI

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._GUARDED and value is not None:
            value = _guarded(name, value)
        super().__setattr__(name, value)

    @property
    def on_connect(self) -> Callable[..., Any] | None:
        # paho reads this property to call it: the hook notes the broker's limits, then calls ours.
        return self._connack_hook

    @on_connect.setter
    def on_connect(self, func: Callable[..., Any] | None) -> None:
        self._user_on_connect = func

    def _connack_hook(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                      properties: Any) -> None:
        size = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        self.broker_max_packet_size = int(size) if size else None
        if self.broker_max_packet_size:
            logger.info("broker accepts packets up to %d bytes", self.broker_max_packet_size)
        if self._user_on_connect is not None:
            _guarded("on_connect", self._user_on_connect)(client, userdata, flags, reason_code, properties)

    def payload_limit(self, topic: str) -> int | None:
        """Largest payload that may go to ``topic`` now; None when nothing limits it."""
        limits = [self.max_publish_bytes] if self.max_publish_bytes else []
        if self.broker_max_packet_size:
            limits.append(self.broker_max_packet_size - PACKET_OVERHEAD - len(topic.encode("utf-8", "replace")))
        return max(0, min(limits)) if limits else None


def _guarded(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(func, "_musc_guarded", False):
        return func

    def call(*args: Any) -> Any:
        try:
            return func(*args)
        except Exception:  # noqa: BLE001 - logged with its traceback; the network thread carries on
            logger.exception("MQTT %s callback failed; the connection carries on", name)
            return None

    call._musc_guarded = True  # type: ignore[attr-defined]
    return call


def offline_payload(instance: str) -> bytes:
    """The retained last will: what subscribers see after the service dies without a goodbye."""
    return json.dumps({"schema": SCHEMA_VERSION, "state": "offline", "instance": instance}).encode()


def create_client(settings: MqttSettings) -> ServiceClient:
    """A configured but unconnected client with manual acks (frames are acked once durable)."""
    v5 = settings.protocol == "5"
    client_id = settings.client_id or f"musc-stream-{settings.instance}"
    client = ServiceClient(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else settings.clean_start,
        manual_ack=True,
        max_publish_bytes=settings.max_publish_bytes,
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
