"""Delivery semantics against Mosquitto with its DEFAULT limits (20 in-flight QoS 1 messages):
warm-up never stalls the broker, (line, frame_id) is decided at most once, duplicates and
resets are answered, and failures answer every frame. Random tiny backbone: weights do not
matter to delivery."""

import logging
import time

import pytest

from musc_stream.service.wiring import Service

from .helpers import AckedCamera, Collector, audit_rows, brick_frames, sample_value, scrape, tiny_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def payloads():
    return brick_frames(8, set(), seed=21, size=128)


def _start(tmp_path, port, protocol="5", **areas):
    service = Service(tiny_settings(tmp_path, port, protocol, **areas))
    service.start(ready_timeout_s=30)
    return service


def _decided(rows):
    return sorted(f"{r['line']}/{r['frame_id']}" for r in rows if r["error_reason"] is None)


def _wait(predicate, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)
    return predicate()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_eight_lines_warming_up_together_never_stall_a_stock_broker(stock_broker, tmp_path, payloads, protocol):
    """8 lines x 4 frames are all held (32 > the broker's 20 in-flight): held frames are spooled
    and acked, so the 5th frame of every line still arrives and all 40 are decided once."""
    service = _start(tmp_path, stock_broker.port, protocol)
    collector = Collector(stock_broker.port)
    camera = AckedCamera(stock_broker.port, protocol)
    lines = [f"w{i}" for i in range(8)]
    try:
        for n in range(4):
            for line in lines:
                camera.publish(line, payloads[n], f"f{n}")
        deadline = time.monotonic() + 60
        while len(service.spool) < 32 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(service._held) == 32, "every warm-up frame should be held"
        assert len(service.spool) == 32, "and spooled"
        for line in lines:
            camera.publish(line, payloads[4], "f4")
        assert collector.wait_for(lambda c: len(c.results) >= 5, 120), "no result: warm-up stalled the broker"
        want = sorted(f"{line}/f{n}" for line in lines for n in range(5))
        deadline = time.monotonic() + 120
        while len(_decided(audit_rows(tmp_path / "audit"))) < 40 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _decided(audit_rows(tmp_path / "audit")) == want
        assert _wait(lambda: len(service.spool) == 0), "spool files must go once their decision is durable"
        assert sample_value(scrape(service.metrics_port), "musc_frames_held") == 0
    finally:
        camera.close()
        collector.close()
        service.stop()
    assert camera.acked == set(want)


def test_held_frames_survive_a_restart_and_ids_are_never_decided_twice(stock_broker, tmp_path, payloads, caplog):
    service = _start(tmp_path, stock_broker.port)
    collector = Collector(stock_broker.port)
    camera = AckedCamera(stock_broker.port)
    try:
        for n in range(6):
            camera.publish("d1", payloads[n], f"f{n}")
        for n in range(3):
            camera.publish("h1", payloads[n], f"g{n}")
        camera.publish("h1", payloads[0], "g0")  # a repeated id while g0 is held
        assert collector.wait_for(lambda c: len(c.results) >= 6 and len(c.errors) >= 1, 120)
        camera.publish("d1", payloads[7], "f2")  # a camera whose counter restarted
        assert collector.wait_for(lambda c: len(c.errors) >= 2, 60)
        deadline = time.monotonic() + 30
        while len(service.spool) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(service.spool) == 3
        service.stop()  # g0..g2 are held: spooled and acked, so the broker will not resend them
        service = _start(tmp_path, stock_broker.port)
        camera.publish("d1", payloads[6], "f3")  # decided before the restart: known from the audit
        camera.publish("h1", payloads[3], "g3")
        camera.publish("h1", payloads[4], "g4")  # g0..g2 come back from the spool: 5 references
        assert collector.wait_for(lambda c: len(c.results) >= 11 and len(c.errors) >= 3, 120)
        assert _wait(lambda: len(service.spool) == 0)
        text = scrape(service.metrics_port)
    finally:
        camera.close()
        collector.close()
        service.stop()
    rows = audit_rows(tmp_path / "audit")
    decided = _decided(rows)
    assert decided == sorted([f"d1/f{n}" for n in range(6)] + [f"h1/g{n}" for n in range(5)])
    assert all(len(v) == 1 for v in collector.results.values())
    duplicates = sorted(f"{r['line']}/{r['frame_id']}" for r in rows if r["error_reason"] == "duplicate")
    assert duplicates == ["d1/f2", "d1/f3", "h1/g0"]
    assert {e["reason"] for e in collector.errors} == {"duplicate"}
    assert sample_value(text, "musc_frames_dropped_total", line="d1", reason="duplicate") == 1


def test_reset_answers_held_frames_and_never_overtakes_them(stock_broker, tmp_path, payloads, caplog):
    caplog.set_level(logging.WARNING, logger="musc_stream.service.ingest")
    service = _start(tmp_path, stock_broker.port)
    collector = Collector(stock_broker.port)
    camera = AckedCamera(stock_broker.port)
    try:
        for n in range(3):
            camera.publish("r1", payloads[n], f"a{n}")
        camera.camera.client.publish("line/r1/reset", b"{}", qos=1)  # right behind the frames
        camera.camera.client.publish("line/bad id!/reset", b"{}", qos=1)
        for n in range(5):
            camera.publish("r1", payloads[n + 3], f"b{n}")
        assert collector.wait_for(lambda c: len(c.results) >= 5 and len(c.errors) >= 3, 120)
        assert {e["frame_id"] for e in collector.errors} == {"a0", "a1", "a2"}
        assert {e["reason"] for e in collector.errors} == {"reset_in_warmup"}
        assert set(collector.results) == {f"b{n}" for n in range(5)}
        assert collector.results["b0"][0]["changeover"] is True
        # A retained reset is acted on once, live; the copy the broker hands out again at every
        # (re)subscription would wipe the line at each reconnect: it is ignored.
        camera.camera.client.publish("line/r1/reset", b"{}", qos=1, retain=True).wait_for_publish(5)
        time.sleep(1.0)
        service.stop()
        service = _start(tmp_path, stock_broker.port)
        for n in range(5):  # the window is not kept across restarts: a new warm-up
            camera.publish("r1", payloads[n], f"c{n}")
        assert collector.wait_for(lambda c: "c0" in c.results, 60)
        assert collector.results["c0"][0]["changeover"] is False
        assert any("ignoring retained reset" in r.message for r in caplog.records)
        assert any("ignoring reset command on 'line/bad id!/reset'" in r.message for r in caplog.records)
        camera.camera.client.publish("line/r1/reset", b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        camera.close()
        collector.close()
        service.stop()
    rows = audit_rows(tmp_path / "audit")
    assert sorted(r["frame_id"] for r in rows if r["error_reason"] == "reset_in_warmup") == ["a0", "a1", "a2"]


class _FlakyBackbone:
    """Fault injection around the real (random tiny) backbone. ``broken="embed"``: the forward pass
    raises (before the engine touches any line). ``broken="late"``: the pass works but reading
    the weights label, which the engine does only while writing decisions, raises: the failure
    comes after the engine released a line's held frames from warm-up."""

    def __init__(self, backbone):
        self._backbone = backbone
        self.broken: str | None = None

    def __getattr__(self, name):
        return getattr(self._backbone, name)

    @property
    def weights_label(self):
        if self.broken == "late":
            raise RuntimeError("injected failure while deciding")
        return self._backbone.weights_label

    def embed(self, images, batch_size):
        if self.broken == "embed":
            raise RuntimeError("injected backbone failure")
        return self._backbone.embed(images, batch_size=batch_size)


def test_a_failed_batch_answers_every_frame_and_a_broken_model_stops_with_a_reason(stock_broker, tmp_path,
                                                                                 payloads):
    from musc_stream.service.wiring import backbone_from_settings

    settings = tiny_settings(tmp_path, stock_broker.port, engine={"max_scoring_failures": 3})
    flaky = _FlakyBackbone(backbone_from_settings(settings))
    service = Service(settings, backbone=flaky)
    service.start(ready_timeout_s=30)
    collector = Collector(stock_broker.port)
    camera = AckedCamera(stock_broker.port)
    try:
        for n in range(3):
            camera.publish("s1", payloads[n], f"s{n}")
        assert _wait(lambda: len(service._held) == 3)
        flaky.broken = "embed"  # s3's batch fails before the engine saw it: s0..s2 stay held
        camera.publish("s1", payloads[3], "s3")
        assert collector.wait_for(lambda c: len(c.errors) >= 1, 60)
        assert len(service._held) == 3 and _wait(lambda: len(service.spool) == 3)
        flaky.broken = None
        camera.publish("s1", payloads[4], "s4")
        assert _wait(lambda: len(service._held) == 4)
        flaky.broken = "late"  # s5 releases s0..s2, s4 from warm-up, then deciding fails
        camera.publish("s1", payloads[5], "s5")
        assert collector.wait_for(lambda c: len(c.errors) >= 6, 60)
        assert sorted(e["frame_id"] for e in collector.errors) == ["s0", "s1", "s2", "s3", "s4", "s5"]
        assert {e["reason"] for e in collector.errors} == {"scoring_failed"}
        assert len(service._held) == 0
        assert _wait(lambda: len(service.spool) == 0)  # deleted by the sink right after the acks
        flaky.broken = None
        for n in range(5):
            camera.publish("s1", payloads[n], f"t{n}")
        assert collector.wait_for(lambda c: len(c.results) >= 5, 60)
        assert not collector.results.keys() & {f"s{n}" for n in range(6)}
        flaky.broken = "embed"  # now every batch fails: the model is broken, the service says so
        for n in range(3):
            camera.publish("s1", payloads[n], f"u{n}")
            time.sleep(0.3)
        service._thread.join(30)
        assert not service._thread.is_alive()
        assert service.fatal.startswith("model broken: 3 batches in a row failed to score")
        assert "injected backbone failure" in service.fatal
    finally:
        camera.close()
        collector.close()
        service.stop()
    rows = audit_rows(tmp_path / "audit")
    answered = sorted(r["frame_id"] for r in rows)
    assert answered == sorted([f"s{n}" for n in range(6)] + [f"t{n}" for n in range(5)] + ["u0", "u1", "u2"])


def test_housekeeping_errors_are_counted_and_survived(stock_broker, tmp_path, payloads):
    service = _start(tmp_path, stock_broker.port, state={"snapshot_interval_s": 0.2})

    def broken_snapshot(directory, **_):
        raise KeyError("injected snapshot failure")

    service.engine.save_state = broken_snapshot  # any exception type, not only OSError
    collector = Collector(stock_broker.port)
    camera = AckedCamera(stock_broker.port)
    try:
        for n in range(6):
            camera.publish("k1", payloads[n], f"k{n}")
        assert collector.wait_for(lambda c: len(c.results) >= 6, 120), sorted(collector.results)
        assert service._thread.is_alive() and service._sink_thread.is_alive()
        # The snapshot timer runs on its own beat: wait for its first (failing) attempt rather than
        # racing it with the scrape.
        deadline = time.monotonic() + 30
        while True:
            errors = sample_value(scrape(service.metrics_port), "musc_housekeeping_errors_total", task="snapshot")
            if errors >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert errors >= 1
        assert service._thread.is_alive() and service._sink_thread.is_alive()
    finally:
        camera.close()
        collector.close()
        service.stop()


def test_unreachable_broker_is_reported_at_once_and_on_every_retry(tmp_path, caplog):
    from musc_stream.devtools.broker import free_port

    port = free_port()  # nothing listens here
    service = Service(tiny_settings(tmp_path, port, mqtt={"reconnect_min_s": 0.5, "reconnect_max_s": 1.0}))
    with caplog.at_level(logging.ERROR, logger="musc_stream.service.wiring"):
        with pytest.raises(TimeoutError) as excinfo:
            service.start(ready_timeout_s=4)
    message = str(excinfo.value)
    assert f"127.0.0.1:{port}" in message and "Connection refused" in message
    lines = [r.message for r in caplog.records if "cannot reach broker" in r.message]
    assert len(lines) >= 2, lines  # the first try and every retry say so
    assert "attempt 1" in lines[0] and "attempt 2" in lines[1]


def test_serve_ready_timeout_fails_with_one_line_saying_why(tmp_path):
    import os
    import subprocess
    import sys

    from musc_stream.devtools.broker import free_port

    port = free_port()  # nothing listens here
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MUSC_MQTT__HOST": "127.0.0.1", "MUSC_MQTT__PORT": str(port), "MUSC_MQTT__RECONNECT_MAX_S": "1",
           "MUSC_MODEL__NAME": "random-vit-tiny", "MUSC_MODEL__PRETRAINED": "null", "MUSC_MODEL__IMAGE_SIZE": "64",
           "MUSC_AUDIT__DIR": str(tmp_path / "audit"), "MUSC_STATE__DIR": str(tmp_path / "state"),
           "MUSC_METRICS__ENABLED": "false"}
    done = subprocess.run([sys.executable, "-m", "musc_stream.cli", "serve", "--ready-timeout", "3"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"musc-stream: error: no subscription to broker 127.0.0.1:{port} within 3 s")
    assert "Connection refused" in last and "Traceback" not in done.stderr
    assert done.stderr.count("cannot reach broker") >= 2  # logged at once and on the retries
