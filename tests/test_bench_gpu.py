"""benchmarks/bench_gpu.py is written for a CUDA box that is lent rarely; its --smoke mode runs the same
code on the CPU (random tiny ViT, a real local Mosquitto, real magnetic-tile frames) so the script is
known to work before the GPU is there."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def test_smoke_run_answers_every_frame_and_labels_random_weights(tmp_path):
    out = tmp_path / "gpu"
    run = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    (case,) = report["cases"]
    assert case["model"] == "random-vit-tiny" and "NOT pretrained" in case["weights"]
    assert [r["lines"] for r in case["service"]] == [1, 2]
    for row in case["service"]:
        assert row["frames"] == 12 * row["lines"] and row["fps"] > 0
        assert row["latency_p99_ms"] >= row["latency_p50_ms"] > 0
    assert case["batch"]["n"] == 6 and case["batch"]["score_ms_per_image"] > 0
    text = out.with_suffix(".md").read_text()
    assert "speed only, scores mean nothing" in text and "| 2 | 24 |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a box without a GPU")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH), "--device", "cuda", "--out", str(tmp_path / "gpu")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["bench_gpu: no CUDA device here; run it on a GPU box, or use --smoke on the CPU"]
