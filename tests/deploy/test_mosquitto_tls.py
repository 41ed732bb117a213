"""deploy/mosquitto on a real broker: TLS only, no anonymous clients, and the ACL's roles (service,
consumer, camera per line), with paho-mqtt 2.x clients as the service and cameras use them."""

from __future__ import annotations

import queue
import socket
import ssl
import subprocess
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from conftest import MOSQUITTO_CONF  # tests/deploy/conftest.py

EVENT_TIMEOUT_S = 10.0  # bounds a wait for something that must happen; never a speed claim
# After the broker has provably routed a message (another subscriber got it), how long a client that
# must NOT get it keeps listening. Only used where no later message can serve as a sentinel.
QUIET_S = 1.0


class Client:
    """A paho 2.x client whose callbacks feed queues, so a test can wait on broker answers."""

    def __init__(self, broker, user: str | None, *, protocol=mqtt.MQTTv5, ca_file=None) -> None:
        self.broker = broker
        self.paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:12]}",
                                protocol=protocol)
        if user is not None:
            self.paho.username_pw_set(user, broker.users[user])
        self.paho.tls_set(ca_certs=str(ca_file or broker.ca_file))
        self.connacks: queue.Queue[ReasonCode] = queue.Queue()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.pubacks: dict[int, queue.Queue[ReasonCode]] = {}
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.paho.on_connect = lambda c, u, flags, rc, props: self.connacks.put(rc)
        self.paho.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(rcs)
        self.paho.on_publish = lambda c, u, mid, rc, props: self.pubacks.setdefault(mid, queue.Queue()).put(rc)
        self.paho.on_message = lambda c, u, msg: self.messages.put(msg)

    def connect(self, will: tuple[str, bytes] | None = None) -> ReasonCode:
        """Connect and return the broker's CONNACK reason code; a refused client is stopped."""
        if will is not None:
            self.paho.will_set(will[0], will[1], qos=1, retain=True)
        self.paho.connect(self.broker.host, self.broker.port, keepalive=30)
        self.paho.loop_start()
        rc = self.connacks.get(timeout=EVENT_TIMEOUT_S)
        if rc.is_failure:
            self.close()
        return rc

    def subscribe(self, topic: str) -> list[ReasonCode]:
        self.paho.subscribe(topic, qos=1)
        return self.subacks.get(timeout=EVENT_TIMEOUT_S)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK reason code (MQTT 5 says "Not authorized")."""
        info = self.paho.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        return self.pubacks.setdefault(info.mid, queue.Queue()).get(timeout=EVENT_TIMEOUT_S)

    def next_message(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=EVENT_TIMEOUT_S)

    def assert_quiet(self) -> None:
        with pytest.raises(queue.Empty):
            msg = self.messages.get(timeout=QUIET_S)
            pytest.fail(f"unexpected message on {msg.topic}: {msg.payload!r}")

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def connect(tls_broker):
    """connect(user) → a connected Client; all are closed after the test."""
    clients: list[Client] = []

    def _connect(user: str | None, **kwargs) -> Client:
        client = Client(tls_broker, user, **kwargs)
        clients.append(client)
        rc = client.connect()
        assert not rc.is_failure, f"{user} refused: {rc}\n{tls_broker.log()[-2000:]}"
        return client

    yield _connect
    for client in clients:
        client.close()


def _payload() -> bytes:
    return uuid.uuid4().bytes


# -- who may connect ---------------------------------------------------------------------------


def test_anonymous_client_is_refused(tls_broker):
    rc = Client(tls_broker, None).connect()
    assert rc.is_failure
    assert rc == ReasonCode(mqtt.PacketTypes.CONNACK, "Not authorized")


def test_wrong_password_is_refused(tls_broker):
    client = Client(tls_broker, None)
    client.paho.username_pw_set("musc-stream", "not-the-password")
    assert client.connect().is_failure


def test_known_users_connect_over_tls(tls_broker, connect):
    for user in tls_broker.users:
        client = connect(user)
        assert client.paho.socket().version() in ("TLSv1.2", "TLSv1.3")


def test_a_client_that_does_not_trust_the_ca_is_stopped(tls_broker, tmp_path):
    # The broker presents the certificate of its config; a client trusting another CA refuses it.
    unrelated = tmp_path / "unrelated-ca.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-noenc", "-keyout", str(tmp_path / "unrelated.key"), "-out", str(unrelated), "-days", "1",
                    "-subj", "/CN=unrelated CA"], check=True, capture_output=True, timeout=60)
    client = Client(tls_broker, "musc-stream", ca_file=unrelated)
    with pytest.raises(ssl.SSLCertVerificationError):
        client.paho.connect(tls_broker.host, tls_broker.port)


def test_plain_mqtt_gets_no_answer(tls_broker):
    # An MQTT 3.1.1 CONNECT in clear text: the TLS listener hangs up instead of answering CONNACK.
    connect_packet = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"
    with socket.create_connection((tls_broker.host, tls_broker.port), timeout=EVENT_TIMEOUT_S) as s:
        s.sendall(connect_packet)
        try:
            answer = s.recv(16)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"\x20"), "the broker answered CONNACK on a plaintext connection"


# -- what each may do ----------------------------------------------------------------------------


def test_camera_publishes_its_own_frames_to_the_service(connect, tls_broker):
    service = connect(tls_broker.service_user)
    assert not service.subscribe("line/+/frames")[0].is_failure
    camera = connect("line1")
    frame = _payload()
    assert not camera.publish("line/line1/frames", frame).is_failure
    msg = service.next_message()
    assert (msg.topic, msg.payload) == ("line/line1/frames", frame)


def test_shared_subscription_of_the_service_gets_frames(connect, tls_broker):
    # docs/scaling.md: workers subscribe $share/<group>/line/+/frames; the ACL's "read line/+/frames"
    # must cover it.
    service = connect(tls_broker.service_user)
    assert not service.subscribe("$share/musc/line/+/frames")[0].is_failure
    camera = connect("line2")
    frame = _payload()
    assert not camera.publish("line/line2/frames", frame).is_failure
    msg = service.next_message()
    assert (msg.topic, msg.payload) == ("line/line2/frames", frame)


def test_camera_cannot_publish_another_lines_frames(connect, tls_broker):
    service = connect(tls_broker.service_user)
    service.subscribe("line/+/frames")
    camera = connect("line1")
    forged = _payload()
    assert camera.publish("line/line2/frames", forged) == ReasonCode(mqtt.PacketTypes.PUBACK, "Not authorized")
    # Sentinel: a later allowed frame from the same client arrives; the forged one would have come first.
    sentinel = _payload()
    assert not camera.publish("line/line1/frames", sentinel).is_failure
    msg = service.next_message()
    assert (msg.topic, msg.payload) == ("line/line1/frames", sentinel)
    assert "Denied PUBLISH" in tls_broker.log()


def test_camera_cannot_pose_as_the_service(connect, tls_broker):
    consumer = connect(tls_broker.consumer_user)
    consumer.subscribe("line/+/result")
    camera = connect("line1")
    assert camera.publish("line/line1/result", b'{"is_anomaly": false}').is_failure
    assert camera.publish("line/line1/reset", b"{}").is_failure
    assert camera.publish("musc/edge-1/status", b"online").is_failure
    # Sentinel: the service's real result is the first thing the consumer sees.
    real = _payload()
    assert not connect(tls_broker.service_user).publish("line/line1/result", real).is_failure
    assert consumer.next_message().payload == real


def test_service_results_reach_consumers_but_not_cameras(connect, tls_broker):
    consumer = connect(tls_broker.consumer_user)
    consumer.subscribe("line/+/result")
    camera = connect("line1")
    camera.subscribe("line/line1/result")  # granted by mosquitto 2.0, but nothing is delivered
    service = connect(tls_broker.service_user)
    result = _payload()
    assert not service.publish("line/line1/result", result).is_failure
    msg = consumer.next_message()
    assert (msg.topic, msg.payload) == ("line/line1/result", result)
    camera.assert_quiet()


def test_cameras_cannot_read_frames(connect, tls_broker):
    service = connect(tls_broker.service_user)
    service.subscribe("line/+/frames")
    spy = connect("line2")
    spy.subscribe("line/+/frames")
    frame = _payload()
    connect("line1").publish("line/line1/frames", frame)
    assert service.next_message().payload == frame
    spy.assert_quiet()


@pytest.mark.parametrize("topic", ["line/line1/anomaly", "line/line1/anomaly/heatmap", "line/line1/error"])
def test_service_publishes_alerts_and_errors(connect, tls_broker, topic):
    consumer = connect(tls_broker.consumer_user)
    consumer.subscribe("line/#")
    payload = _payload()
    assert not connect(tls_broker.service_user).publish(topic, payload).is_failure
    msg = consumer.next_message()
    assert (msg.topic, msg.payload) == (topic, payload)


def test_only_the_operator_resets_a_line_for_every_worker(connect, tls_broker):
    # A reset wipes a line's window, memory and threshold on every worker: a camera (even of that
    # line) or a consumer must not be able to send one. One user per worker: the broker makes the
    # user name the client id (use_username_as_clientid).
    workers = [connect(tls_broker.service_user), connect(tls_broker.second_worker_user)]
    for worker in workers:
        assert not worker.subscribe("line/+/reset")[0].is_failure
    not_authorized = ReasonCode(mqtt.PacketTypes.PUBACK, "Not authorized")
    for user in ("line1", tls_broker.consumer_user):
        assert connect(user).publish("line/line1/reset", b"{}") == not_authorized, user
    # Sentinel: the operator's reset, published after the refused ones were answered, is the first
    # message each worker gets; a refused reset that got through would have come before it.
    command = _payload()
    assert not connect(tls_broker.operator_user).publish("line/line1/reset", command).is_failure
    for worker in workers:
        msg = worker.next_message()
        assert (msg.topic, msg.payload) == ("line/line1/reset", command)


def test_only_the_operator_sends_feedback(connect, tls_broker):
    # A "not_defect" verdict teaches a line's memory and threshold: like a reset, only the operator
    # may send one (deploy/mosquitto/acl), and every worker may read it.
    workers = [connect(tls_broker.service_user), connect(tls_broker.second_worker_user)]
    for worker in workers:
        assert not worker.subscribe("line/+/feedback")[0].is_failure
    not_authorized = ReasonCode(mqtt.PacketTypes.PUBACK, "Not authorized")
    verdict = b'{"frame_id": "f1", "verdict": "not_defect"}'
    for user in ("line1", tls_broker.consumer_user):
        assert connect(user).publish("line/line1/feedback", verdict) == not_authorized, user
    command = _payload()  # the sentinel: a refused verdict that got through would come before it
    assert not connect(tls_broker.operator_user).publish("line/line1/feedback", command).is_failure
    for worker in workers:
        msg = worker.next_message()
        assert (msg.topic, msg.payload) == ("line/line1/feedback", command)


def test_service_status_birth_and_last_will(tls_broker, connect):
    topic = f"musc/test-{uuid.uuid4().hex[:8]}/status"
    service = Client(tls_broker, tls_broker.service_user)
    assert not service.connect(will=(topic, b"offline")).is_failure
    assert not service.publish(topic, b"online", retain=True).is_failure
    consumer = connect(tls_broker.consumer_user)
    consumer.subscribe(topic)
    assert consumer.next_message().payload == b"online"  # retained birth
    service.paho.loop_stop()  # first, so paho does not reconnect
    service.paho.socket().close()  # a crash: no DISCONNECT, so the broker sends the will
    assert consumer.next_message().payload == b"offline"


# -- sessions: bound to users, and deep enough for an outage --------------------------------------


class Session:
    """A paho client with a chosen client id and session handling, as the service and an attacker use."""

    def __init__(self, broker, user: str, client_id: str, clean_start: bool) -> None:
        self.paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.paho.username_pw_set(user, broker.users[user])
        self.paho.tls_set(ca_certs=str(broker.ca_file))
        self.connacks: queue.Queue = queue.Queue()
        self.disconnects: queue.Queue = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.paho.on_connect = lambda c, u, flags, rc, props: self.connacks.put((flags.session_present, rc))
        self.paho.on_disconnect = lambda c, u, flags, rc, props: self.disconnects.put(rc)
        self.paho.on_message = lambda c, u, msg: self.messages.put(msg)
        self.paho.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(rcs)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.paho.connect(broker.host, broker.port, keepalive=30, clean_start=clean_start, properties=props)
        self.paho.loop_start()
        self.session_present, rc = self.connacks.get(timeout=EVENT_TIMEOUT_S)
        assert not rc.is_failure, rc

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


def _frames_for_offline_service(tls_broker, n: int) -> list[bytes]:
    """The service subscribes with a persistent session and goes away; line1 then sends n frames."""
    service = Session(tls_broker, tls_broker.service_user, "musc-stream-default", clean_start=True)
    service.paho.subscribe("line/+/frames", qos=1)
    service.subacks.get(timeout=EVENT_TIMEOUT_S)
    service.close()
    camera = Client(tls_broker, "line1")
    camera.connect()
    frames = [f"frame-{i:05d}".encode() for i in range(n)]
    try:
        for frame in frames:
            assert not camera.publish("line/line1/frames", frame).is_failure
    finally:
        camera.close()
    return frames


def _drain(session: Session, n: int) -> list[bytes]:
    got = []
    while len(got) < n:
        got.append(session.messages.get(timeout=EVENT_TIMEOUT_S).payload)
    return got


def test_camera_credentials_cannot_take_the_service_session(tls_broker):
    """Issue 10: a camera's login with the service's predictable client id and a clean start used to
    wipe the service's queued frames and kick it off. The broker now makes every client id the user
    name, so the camera gets a session of its own."""
    frames = _frames_for_offline_service(tls_broker, 10)
    for client_id in ("musc-stream-default", tls_broker.service_user):  # the setting's default, the user
        attacker = Session(tls_broker, "line2", client_id, clean_start=True)
        attacker.close()
    service = Session(tls_broker, tls_broker.service_user, "musc-stream-default", clean_start=False)
    try:
        assert service.session_present
        assert _drain(service, 10) == frames  # none of the 10 queued frames was lost
        # While the service is connected, a login with its client id does not kick it off.
        attacker = Session(tls_broker, "line2", "musc-stream-default", clean_start=True)
        sentinel = uuid.uuid4().bytes
        camera = Client(tls_broker, "line1")
        camera.connect()
        assert not camera.publish("line/line1/frames", sentinel).is_failure
        assert service.messages.get(timeout=EVENT_TIMEOUT_S).payload == sentinel
        assert service.disconnects.empty() and service.paho.is_connected()
        attacker.close()
        camera.close()
    finally:
        service.close()
    assert "as line2" in tls_broker.log()  # the broker logs the id it gave the camera


def test_offline_service_keeps_more_than_a_thousand_frames(tls_broker):
    """The shipped limits used to drop frames beyond 1,000 queued for a stopped service."""
    frames = _frames_for_offline_service(tls_broker, 1500)
    service = Session(tls_broker, tls_broker.service_user, "musc-stream-default", clean_start=False)
    try:
        assert service.session_present
        assert _drain(service, 1500) == frames
    finally:
        service.close()


def _conf_value(name: str) -> int:
    values = [line.split()[1] for line in MOSQUITTO_CONF.read_text().splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{MOSQUITTO_CONF} needs exactly one {name}"
    return int(values[0])


def test_queue_limits_cover_the_documented_outage():
    """mosquitto.conf promises a 30-minute outage at 10 frames/s of frames up to 100 kB on average."""
    frames = 30 * 60 * 10
    assert _conf_value("max_queued_messages") >= frames
    queued_bytes = _conf_value("max_queued_bytes")
    assert queued_bytes >= frames * 100_000
    assert queued_bytes < 2**31  # mosquitto 2.0.11 reads it as 32 bits: 4294967297 would mean 1 byte
    assert "30-minute outage" in MOSQUITTO_CONF.read_text()


def test_broker_tells_the_service_its_packet_limit(tls_broker):
    """The service reads the CONNACK Maximum Packet Size and keeps every payload under it."""
    from musc_stream.service.config import MqttSettings
    from musc_stream.service.mqtt_client import connect_kwargs, create_client

    settings = MqttSettings(host=tls_broker.host, port=tls_broker.port, instance="limit-check",
                            username=tls_broker.service_user, password=tls_broker.users[tls_broker.service_user],
                            tls={"ca_file": str(tls_broker.ca_file)})
    client = create_client(settings)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect(**connect_kwargs(settings))
    client.loop_start()
    try:
        assert connected.wait(EVENT_TIMEOUT_S)
        assert client.broker_max_packet_size == _conf_value("max_packet_size")
        topic = "line/line1/anomaly"
        assert client.payload_limit(topic) == min(settings.max_publish_bytes,
                                                  client.broker_max_packet_size - 2048 - len(topic))
        assert client.payload_limit(topic) < _conf_value("max_packet_size")
    finally:
        client.loop_stop()
        client.disconnect()
