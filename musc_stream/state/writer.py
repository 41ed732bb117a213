"""The background snapshot writer: one thread that writes snapshot jobs in order, so the scoring
thread only plans and copies (state/plan.py) and never waits on disk or fsync.

A failed job is reported through ``guard`` (the service's housekeeping guard: logged, counted in
musc_housekeeping_errors_total{task="snapshot"}, survived) and tells its line's plan to rewrite the
memory in full next time. At most one job per line is queued (the engine skips a busy line).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from typing import Callable

from musc_stream.state.store import SnapshotJob, SnapshotStore

logger = logging.getLogger(__name__)

THREAD_NAME = "musc-snapshot"


def _log_errors(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        logger.error("snapshot failed (%s: %s); carrying on", type(exc).__name__, exc)


class SnapshotWriter:
    def __init__(self, store: SnapshotStore, guard: Callable[[Callable[[], None]], None] = _log_errors,
                 on_written: Callable[[SnapshotJob, int], None] | None = None) -> None:
        self.store = store
        self._guard = guard
        self._on_written = on_written
        self._jobs: deque[SnapshotJob | None] = deque()
        self._pending: Counter[str] = Counter()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)

    def start(self) -> SnapshotWriter:
        self._thread.start()
        return self

    def submit(self, job: SnapshotJob) -> None:
        with self._cond:
            self._jobs.append(job)
            self._pending[job.line] += 1
            self._cond.notify_all()

    def busy(self, line: str) -> bool:
        with self._cond:
            return self._pending[line] > 0

    def wait_line(self, line: str, timeout_s: float | None = 120.0) -> bool:
        """Block until no job of ``line`` is queued or being written (reset, reload of an evicted line)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending[line] == 0 or not self._thread.is_alive(), timeout_s)

    def flush(self, timeout_s: float | None = 300.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and sum(self._pending.values()) == 0
                                       or not self._thread.is_alive(), timeout_s)

    def stop(self, timeout_s: float = 300.0) -> None:
        """Write what is queued, then end the thread."""
        if not self._thread.is_alive():
            return
        with self._cond:
            self._jobs.append(None)
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._jobs))
                job = self._jobs.popleft()
            if job is None:
                return
            try:
                self._guard(lambda: self._write(job))
            finally:
                with self._cond:
                    self._pending[job.line] -= 1
                    if self._pending[job.line] <= 0:
                        del self._pending[job.line]
                    self._cond.notify_all()

    def _write(self, job: SnapshotJob) -> None:
        try:
            written = self.store.write(job)
        except BaseException:
            if job.on_failure is not None:
                job.on_failure()
            raise
        if job.memory is not None:
            logger.info("snapshot of line %s: memory of %d live patches, %d bytes written",
                        job.line, sum(b - a for a, b in job.memory.live), written)
        if self._on_written is not None:
            self._on_written(job, written)
