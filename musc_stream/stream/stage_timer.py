"""Stage timer: seconds of a pipeline stage, right on a GPU too.

On CUDA, kernels are queued and the host clock returns before they run, so a stage timed with
perf_counter shows up in whichever later op waits first. There the timer records CUDA events at
start and stop and synchronises once, on the stop event (once per micro-batch); on the CPU it reads
perf_counter. The engine divides a batch's stage time by its frames: every stage histogram is
seconds per frame.
"""

from __future__ import annotations

import time

import torch


class StageTimer:
    """``start()`` … ``stop()`` → seconds; on a CUDA device measured between two CUDA events."""

    def __init__(self, device: torch.device | str | None = None):
        self.cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
        self._t0 = 0.0
        self._event = None

    def start(self) -> "StageTimer":
        if self.cuda:
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def stop(self) -> float:
        """Seconds since ``start``; on CUDA waits for the stage's kernels (one sync)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self._event.elapsed_time(end) / 1000.0
        return time.perf_counter() - self._t0
