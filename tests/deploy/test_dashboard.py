"""deploy/grafana: the dashboard and the alert rules query only metrics the service really exports, and
every dashboard query runs in a real Prometheus against the service's /metrics (Grafana itself cannot
be installed here, so the JSON is checked as Grafana would read it)."""

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "musc-stream.json"
DATASOURCE_YML = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER_YML = DEPLOY / "grafana" / "provisioning" / "dashboards" / "musc-stream.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules" / "musc-stream.rules.yml"

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
# Series Prometheus makes itself for every target; the service cannot export them.
PROMETHEUS_SYNTHETIC = {"up"}

# -- metric names out of PromQL ------------------------------------------------------------------

_KEYWORDS = {
    # aggregation operators and their modifiers
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "by", "without",
    # binary operators and vector matching
    "and", "or", "unless", "atan2", "on", "ignoring", "group_left", "group_right", "bool",
    # modifiers and literals
    "offset", "inf", "nan",
    # functions (a name directly followed by "(" is skipped anyway; these cover "fn (x)")
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor",
    "histogram_quantile", "histogram_count", "histogram_sum", "histogram_fraction", "holt_winters",
    "hour", "idelta", "increase", "irate", "label_join", "label_replace", "ln", "log2", "log10",
    "minute", "month", "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort",
    "sort_desc", "sqrt", "time", "timestamp", "vector", "year", "avg_over_time", "min_over_time",
    "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time", "stddev_over_time",
    "stdvar_over_time", "last_over_time", "present_over_time", "acos", "acosh", "asin", "asinh",
    "atan", "atanh", "cos", "cosh", "sin", "sinh", "tan", "tanh", "deg", "pi", "rad",
    # Grafana's query helpers
    "label_values", "label_names", "query_result",
}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# A whole identifier ((?![\w:]) stops backtracking into "rat" of "rate(") not followed by "(".
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL (or Grafana label_values) expression selects.

    Strings, label matchers {...}, ranges [...] and label lists of by/on/... are blanked first, so
    what is left of each identifier is a function (followed by "("), a keyword, or a metric name.
    label_values(metric, label) names the metric first and a label second; the label is dropped.
    """
    expr = _STRING.sub('""', expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)
    expr = _LABEL_LIST.sub(r"\1", expr)
    expr = re.sub(r"\blabel_values\s*\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)", r"\1", expr)
    return {name for name in _IDENTIFIER.findall(expr) if name.lower() not in _KEYWORDS}


@pytest.mark.parametrize("expr, names", [
    ('sum by (line, le) (rate(musc_x_bucket{line=~"$line", le!="a b"}[$__rate_interval]))', {"musc_x_bucket"}),
    ("a / on (job) group_left (model) b offset 5m > 0.9", {"a", "b"}),
    ('label_replace(max by (job) (up{job="musc-stream"}) == 0, "cause", "x", "", "")', {"up"}),
    ("sum without (instance) (x) unless y", {"x", "y"}),
    ("label_values(musc_frames_scored_total, line)", {"musc_frames_scored_total"}),
    ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m]))) > 2.5e0", {"h_bucket"}),
    ("max_over_time(c[1d] offset 1h)", {"c"}),
])
def test_promql_metric_names(expr, names):
    # The name check below is only as good as this parser: neither labels nor functions are metrics.
    assert promql_metric_names(expr) == names


# -- the dashboard as Grafana reads it -------------------------------------------------------------


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, template variable query and annotation."""
    out = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", query))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            out.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    return out


def _rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(r.get("alert") or r["record"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def test_dashboard_identity_and_variables():
    dashboard = _dashboard()
    assert dashboard["uid"] == "musc-stream"  # links and provisioning updates rely on it
    assert dashboard.get("id") is None  # an id from an export would clash with the target Grafana's
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    line = variables["line"]
    assert line["datasource"] == DATASOURCE_REF
    assert line["query"]["query"] == "label_values(musc_frames_scored_total, line)"
    assert line["multi"] and line["includeAll"]


def test_every_panel_uses_the_datasource_variable():
    # A panel bound to a datasource uid from the author's Grafana shows "datasource not found" elsewhere.
    panels = _panels(_dashboard())
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE_REF, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE_REF, (panel["title"], target["refId"])
    for annotation in _dashboard()["annotations"]["list"]:
        if "expr" in annotation:
            assert annotation["datasource"] == DATASOURCE_REF


def test_panels_have_unique_ids_and_do_not_overlap():
    panels = _panels(_dashboard())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = {}
    for panel in panels:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


# -- names against a real /metrics scrape -----------------------------------------------------------


@pytest.fixture(scope="module")
def scraped(live_metrics) -> tuple[set[str], set[str]]:
    """(sample names, family names) of a real HTTP scrape of the service's metrics."""
    families = list(text_string_to_metric_families(live_metrics.scrape()))
    return {s.name for f in families for s in f.samples}, {f.name for f in families}


def test_dashboard_queries_only_exported_metrics(scraped):
    samples, _ = scraped
    unknown = {where: sorted(promql_metric_names(expr) - samples - PROMETHEUS_SYNTHETIC)
               for where, expr in _queries(_dashboard())}
    assert {k: v for k, v in unknown.items() if v} == {}


def test_alert_rules_query_only_exported_metrics(scraped):
    samples, _ = scraped
    unknown = {name: sorted(promql_metric_names(expr) - samples - PROMETHEUS_SYNTHETIC)
               for name, expr in _rule_exprs()}
    assert {k: v for k, v in unknown.items() if v} == {}


def test_dashboard_shows_every_exported_metric(scraped):
    # A metric the service exports but no panel shows is a metric nobody will look at.
    _, families = scraped
    families = {f for f in families if not f.endswith("_created")}  # creation timestamps
    used = set().union(*(promql_metric_names(expr) for _, expr in _queries(_dashboard())))
    shown = {f for f in families if any(name == f or name.startswith(f + "_") for name in used)}
    assert families - shown == set()


def _as_prometheus_query(expr: str) -> str:
    """Grafana's variables as Grafana would expand them with "All" lines selected."""
    return (expr.replace("${line}", ".*").replace("$line", ".*")
            .replace("$__rate_interval", "10s").replace("$__interval", "5s"))


def test_every_dashboard_query_runs_and_has_data(prometheus):
    # Catches what a name check cannot: a PromQL syntax error, a label the service does not export
    # (line vs line_id), a many-to-many match. Prometheus scrapes every second; 10s windows hold data.
    dashboard = _dashboard()
    empty = []
    for where, expr in _queries(dashboard):
        if where.startswith("variable"):
            continue  # label_values() is Grafana's, not PromQL; its metric is checked above
        result = prometheus.query(_as_prometheus_query(expr))
        if not result and not where.startswith("annotation"):  # no changeover right now is fine
            empty.append(where)
    assert empty == []


ZERO_WHEN_QUIET = ("Drops and errors /s", "Housekeeping errors /s", "Acks dropped after a reconnect /s")


@pytest.mark.parametrize("line", ["quiet", "absent"])
def test_drop_and_error_panels_read_zero_when_nothing_went_wrong(prometheus, live_metrics, line):
    # "No data" on a drops panel reads as a broken dashboard (or a dead service); a quiet line shows 0.
    # quiet: a line that is scored but never dropped a frame; absent: a line no worker knows.
    from musc_stream.service.sinks.prometheus import DROP_REASONS

    name = next(n for n in live_metrics.lines if n != live_metrics.dropped[0]) if line == "quiet" else "no-such-line"
    panels = {p["title"]: p for p in _panels(_dashboard())}
    for title in ZERO_WHEN_QUIET:
        for target in panels[title]["targets"]:
            expr = target["expr"].replace("$line", name).replace("$__rate_interval", "10s")
            result = prometheus.query(expr)
            assert result, f"panel {title!r} {target['refId']} shows No data for line {name}"
            assert [float(s["value"][1]) for s in result] == [0.0] * len(result), (title, result)
    if line == "quiet":  # the service starts each line's drop counters at 0: every reason has a series
        result = prometheus.query(f'musc_frames_dropped_total{{line="{name}"}}')
        assert {s["metric"]["reason"] for s in result} >= set(DROP_REASONS)


def test_line_variable_lists_the_lines(prometheus, live_metrics):
    # label_values(musc_frames_scored_total, line) is Grafana's call of this API.
    lines = prometheus.api("label/line/values", **{"match[]": "musc_frames_scored_total"})
    assert set(live_metrics.lines) <= set(lines)


# -- provisioning ---------------------------------------------------------------------------------


def test_datasource_provisioning():
    config = yaml.safe_load(DATASOURCE_YML.read_text())
    assert config["apiVersion"] == 1
    (datasource,) = config["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"].startswith("http")
    # $__rate_interval is 4x this; it must not be shorter than Prometheus's scrape interval.
    scrape = yaml.safe_load(PROMETHEUS_YML.read_text())["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape


def test_dashboard_provider_points_at_the_dashboard_folder():
    config = yaml.safe_load(PROVIDER_YML.read_text())
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/musc-stream"
