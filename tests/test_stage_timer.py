"""Stage timings: the timer on the CPU, and every stage histogram in seconds per frame."""

import time

import numpy as np
import pytest
import torch

from musc_stream.service.config import settings_with
from musc_stream.stream.engine import Engine
from musc_stream.model.backbone import BackboneSpec, load_backbone
from musc_stream.stream.records import Frame
from musc_stream.service.sinks.prometheus import Metrics
from musc_stream.stream.stage_timer import StageTimer


def test_cpu_timer_measures_the_stage_between_start_and_stop():
    timer = StageTimer("cpu")
    assert not timer.cuda
    outer = time.perf_counter()
    timer.start()
    time.sleep(0.02)
    seconds = timer.stop()
    assert 0.02 <= seconds <= time.perf_counter() - outer


def test_cuda_timer_without_a_gpu_falls_back_to_the_host_clock():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the event path runs instead")
    timer = StageTimer("cuda")
    assert not timer.cuda
    assert timer.start().stop() >= 0.0


def test_engine_stage_times_are_per_frame_of_the_batch():
    backbone = load_backbone(BackboneSpec(name="random-vit-tiny", pretrained=None, image_size=112))
    engine = Engine(backbone, settings_with(engine={"window_size": 4, "min_references": 2}))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(6)]
    frames = [Frame(line=f"l{i % 2}", frame_id=str(i), ts=float(i), image=img, received_at=time.time())
              for i, img in enumerate(images)]
    engine.process(frames[:4])
    started = time.perf_counter()
    decisions = engine.process(frames[4:])
    wall = time.perf_counter() - started
    assert len(decisions) == 2
    for stage in ("backbone", "scoring"):
        per_frame = {d.latency_s[stage] for d in decisions}
        assert len(per_frame) == 1  # the batch's time shared equally
        assert 0 < per_frame.pop() * len(decisions) <= wall


def test_a_batch_stage_counts_once_per_frame():
    m = Metrics()
    m.observe_stage("audit", 0.008, frames=4)
    m.observe_stage("audit", 0.5, frames=0)  # nothing written: nothing observed
    count = m.registry.get_sample_value("musc_stage_latency_seconds_count", {"stage": "audit"})
    total = m.registry.get_sample_value("musc_stage_latency_seconds_sum", {"stage": "audit"})
    assert count == 4 and total == pytest.approx(0.008)
