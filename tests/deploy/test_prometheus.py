"""deploy/prometheus: promtool accepts config and rules, the rule unit tests pass, and a real Prometheus
scraping the service's /metrics evaluates every rule and fires on real counters."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMETHEUS_YML = PROMETHEUS / "prometheus.yml"
RULES = PROMETHEUS / "rules" / "musc-stream.rules.yml"
RULES_TEST = PROMETHEUS / "tests" / "musc-stream.rules.test.yml"

ALERTS = {"MuscServiceDown", "MuscLineSilent", "MuscAnomalyRateHigh", "MuscFramesDropped",
          "MuscQueueSaturated", "MuscLatencyHigh", "MuscBrokerDisconnected", "MuscHousekeepingErrors",
          "MuscPublishFailures"}


def _promtool(*args: str) -> subprocess.CompletedProcess:
    assert shutil.which("promtool"), "promtool missing: scripts/setup.sh installs the prometheus package"
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=300)


def test_promtool_check_config():
    # Also loads and checks the rule files the config names (resolved beside the config).
    result = _promtool("check", "config", str(PROMETHEUS_YML))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_rules():
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_test_rules():
    result = _promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == ALERTS
    firing, quiet = set(), set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == ALERTS, f"no firing case for {ALERTS - firing}"
    assert quiet == ALERTS, f"no quiet case for {ALERTS - quiet}"


def test_every_alert_says_what_and_how_bad():
    rules = yaml.safe_load(RULES.read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


# -- a real Prometheus against the service's /metrics --------------------------------------------


def test_prometheus_reads_the_frame_rate_of_each_line(prometheus, live_metrics):
    result = prometheus.query('sum by (line) (rate(musc_frames_scored_total{job="musc-stream"}[10s]))')
    rates = {series["metric"]["line"]: float(series["value"][1]) for series in result}
    assert set(rates) == set(live_metrics.lines)
    assert all(rate > 0 for rate in rates.values()), rates


def test_every_rule_evaluates_without_error(prometheus):
    # promtool's unit tests use made-up series; here the rules meet the real label sets (a
    # many-to-many match or a label the service does not export would show up as health "err").
    rules = prometheus.evaluated_rules()
    assert {r["name"] for r in rules} == ALERTS
    errors = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert errors == {}


def test_a_real_drop_fires_the_drop_alert(prometheus, live_metrics):
    # The service creates a drop counter with its first drop, so increase() alone would never see it.
    line, reason = live_metrics.dropped
    firing = prometheus.wait_for(
        lambda: [a for a in prometheus.alerts("MuscFramesDropped") if a["state"] == "firing"],
        "MuscFramesDropped to fire")
    assert [(a["labels"]["line"], a["labels"]["reason"]) for a in firing] == [(line, reason)]


def test_a_real_disconnect_starts_the_broker_alert(prometheus):
    # `for: 1m` keeps it pending this early; pending means the expression matched the real gauge.
    alerts = prometheus.wait_for(lambda: prometheus.alerts("MuscBrokerDisconnected"),
                                 "MuscBrokerDisconnected")
    assert alerts[0]["state"] in ("pending", "firing")
    assert alerts[0]["labels"]["job"] == "musc-stream"


@pytest.mark.parametrize("alert", sorted(ALERTS - {"MuscFramesDropped", "MuscBrokerDisconnected"}))
def test_a_healthy_service_raises_no_other_alert(prometheus, alert):
    prometheus.evaluated_rules()  # an empty alert list before the first evaluation would prove nothing
    assert prometheus.alerts(alert) == []
