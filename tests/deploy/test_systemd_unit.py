"""deploy/systemd: the unit passes systemd-analyze, and its settings are ones the service accepts."""

import ipaddress
import shlex
import subprocess
import sys
from pathlib import Path

from musc_stream.service.config import MQTT_PASSWORD_CREDENTIAL, load_settings

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "musc-stream.service"
ENV_EXAMPLE = REPO / "deploy" / "systemd" / "musc-stream.env.example"
SHIPPED_EXEC = "/opt/musc-stream/.venv/bin/musc-stream"


def _unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order; repeated keys stay separate entries."""
    entries, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def _values(key: str) -> list[str]:
    return [v for _, k, v in _unit_entries(UNIT.read_text()) if k == key]


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify on a copy whose ExecStart is this checkout's console script.

    verify refuses an ExecStart that does not exist; the shipped path exists only on an installed box.
    """
    script = Path(sys.executable).parent / "musc-stream"
    assert script.exists(), f"{script} missing: pip install -e . creates it"
    assert SHIPPED_EXEC in unit_text
    unit = tmp_path / "musc-stream.service"
    unit.write_text(unit_text.replace(SHIPPED_EXEC, str(script)))
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=120)


def _our_diagnostics(result: subprocess.CompletedProcess) -> list[str]:
    # verify also reports on units ours names (network-online.target, ...) as installed on this
    # machine; only lines about our file count. DynamicUser= means no user lookup to warn about.
    return [line for line in (result.stdout + result.stderr).splitlines() if "musc-stream.service" in line]


def test_unit_passes_systemd_analyze_verify(tmp_path):
    result = _verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert _our_diagnostics(result) == []


def test_verify_check_catches_a_broken_unit(tmp_path):
    # verify exits 0 on unknown keys and bad values, only printing them: the check above must read
    # the output too, and this shows it would see a typo.
    broken = UNIT.read_text().replace("Type=notify", "Type=notfy\nWatchdogSecs=60")
    diagnostics = _our_diagnostics(_verify(broken, tmp_path))
    assert any("notfy" in line for line in diagnostics), diagnostics
    assert any("WatchdogSecs" in line for line in diagnostics), diagnostics


def test_unit_is_hardened(tmp_path):
    # systemd's own score: 0 (locked down) .. 10 (exposed); the unit is at 1.6, "OK" ends at 2.5.
    script = Path(sys.executable).parent / "musc-stream"
    unit = tmp_path / "musc-stream.service"
    unit.write_text(UNIT.read_text().replace(SHIPPED_EXEC, str(script)))
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=25", str(unit)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_hardening_leaves_the_gpu_reachable():
    assert "yes" not in [v.lower() for v in _values("PrivateDevices")]
    assert "pid" not in _values("ProcSubset")  # would hide /proc/driver/nvidia
    allowed = [v.split()[0] for v in _values("DeviceAllow")]
    assert {"char-nvidia*", "/dev/nvidiactl", "/dev/nvidia-uvm"} <= set(allowed)
    assert "video" in " ".join(_values("SupplementaryGroups")).split()


def test_unit_notifies_and_is_watched():
    assert _values("Type") == ["notify"]
    assert _values("NotifyAccess") == ["main"]
    assert _values("WatchdogSec") and int(_values("WatchdogSec")[0]) > 0
    assert _values("Restart") == ["on-failure"]


def _unit_environment() -> dict[str, str]:
    env: dict[str, str] = {}
    for value in _values("Environment"):
        for assignment in shlex.split(value):
            key, _, val = assignment.partition("=")
            env[key] = val
    return env


def _env_file_assignments(text: str) -> dict[str, str]:
    """Every KEY=value of the example, commented-out ones included (they are documentation too)."""
    env = {}
    for raw in text.splitlines():
        line = raw.strip().lstrip("#").strip()
        if "=" in line and line.split("=", 1)[0].isidentifier() and line.split("=", 1)[0].isupper():
            key, _, value = line.partition("=")
            env[key] = value
    return env


def test_unit_and_example_settings_load(tmp_path):
    # A misspelt MUSC_ name, or a value the service rejects, would stop the service at start on the
    # box; here it fails the build. The password arrives the way the unit delivers it.
    example = _env_file_assignments(ENV_EXAMPLE.read_text())
    assert "MUSC_MQTT__HOST" in example and "MUSC_MQTT__SHARED_GROUP" in example
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / MQTT_PASSWORD_CREDENTIAL).write_text("s3cret\n")
    env = {**_unit_environment(), **example, "CREDENTIALS_DIRECTORY": str(credentials)}
    env.pop("MUSC_CONFIG", None)  # names a file that exists only on the box
    settings = load_settings(env=env)
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "s3cret"
    assert settings.mqtt.tls.enabled
    assert settings.mqtt.port == 8883


def test_unit_and_example_keep_metrics_on_loopback():
    # /metrics has no authentication: what the box runs as shipped must not serve it to the network.
    active = {}
    for raw in ENV_EXAMPLE.read_text().splitlines():
        if raw.strip() and not raw.lstrip().startswith("#") and "=" in raw:
            key, _, value = raw.strip().partition("=")
            active[key] = value
    env = {**_unit_environment(), **{k: v for k, v in active.items() if k.startswith("MUSC_METRICS__")}}
    host = load_settings(env=env).metrics.host
    assert ipaddress.ip_address(host).is_loopback, host


def test_unit_directories_match_the_settings():
    # StateDirectory=x is /var/lib/x, LogsDirectory=x is /var/log/x: the only writable places.
    settings = load_settings(env=_unit_environment())
    assert settings.state.dir == Path("/var/lib") / _values("StateDirectory")[0]
    assert Path("/var/log") / _values("LogsDirectory")[0] in settings.audit.dir.parents
    name, _, source = _values("LoadCredential")[0].partition(":")
    assert name == MQTT_PASSWORD_CREDENTIAL
    assert source.startswith("/etc/musc-stream/")
