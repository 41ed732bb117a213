"""Faults a line really sees, against stock Mosquitto, 8 lines starting together: for each, every
frame the broker acknowledged to a camera has an audit row (0 lost), none is decided twice, and
the service is alive or exited with a clear reason. Rows go to benchmarks/results/faults.md."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .harness import LINES, Fleet, Results, ServiceProcess, answered, audit_table, frame_payloads, ledger, wait_until

pytestmark = pytest.mark.integration

PAYLOADS = frame_payloads(32)
WARMUP = 5  # engine.min_references in ServiceProcess


class Rig:
    """Broker, result collector, camera fleet and one service process for one fault test."""

    def __init__(self, broker, tmp_path: Path, protocol: str, audit_dir: Path | None = None, **env: str):
        self.broker = broker
        self.protocol = protocol
        self.results = Results(broker.port)
        self.fleet = Fleet(broker.port, protocol)
        self.service = ServiceProcess(tmp_path / "service", broker.port, protocol, audit_dir=audit_dir, **env)
        self.audit_dir = self.service.audit_dir

    def spooled(self) -> int:
        return len(list((self.service.dir / "state" / "spool").glob("*.frame")))

    def answered(self) -> int:
        return answered(self.fleet, self.audit_dir)

    def settle(self, timeout_s: float = 180):
        """Wait until the broker acked every frame and each acked frame has an audit row."""
        self.fleet.wait_acked(60)
        assert wait_until(lambda: self.answered() >= len(self.fleet.acked), timeout_s), \
            f"{len(self.fleet.acked) - self.answered()} acked frame(s) never answered; log:\n{self.service.log()[-3000:]}"
        time.sleep(1.0)  # a second decision or result, if any, would come now
        return ledger(self.fleet, self.audit_dir, self.results)

    def close(self) -> None:
        self.fleet.close()
        self.results.close()
        if self.service.process is not None:
            self.service.stop()


@pytest.fixture
def rig_factory(stock_broker, tmp_path):
    rigs = []

    def make(protocol: str, **kwargs) -> Rig:
        rig = Rig(stock_broker, tmp_path, protocol, **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def _check(led, rig) -> None:
    assert not led.lost, f"lost: {led.lost[:10]}"
    assert not led.twice, f"decided twice: {led.twice[:10]}"
    assert led.acked == led.published
    assert rig.service.process.poll() is None, "the service should still run"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_broker_restart_during_warm_up(rig_factory, protocol, fault_table):
    rig = rig_factory(protocol)
    rig.service.start()
    rig.fleet.round(PAYLOADS, 0, WARMUP - 2)  # 24 frames, all held: more than the 20 in flight
    assert wait_until(lambda: rig.spooled() == 8 * (WARMUP - 2), 60)
    rig.broker.restart()
    rig.fleet.round(PAYLOADS, WARMUP - 2, 4)
    led = rig.settle()
    _check(led, rig)
    assert led.decided == led.acked == 8 * (WARMUP + 2)
    assert rig.spooled() == 0
    fault_table(protocol, led, "broker SIGTERM+start with 24 frames held in warm-up (spooled, acked)")


def test_broker_restart_mid_burst(rig_factory, fault_table):
    rig = rig_factory("5")
    rig.service.start()
    burst = rig.fleet.burst(PAYLOADS, 0, 16, fps=40)
    assert wait_until(lambda: rig.answered() >= 40, 120)
    rig.broker.restart()
    burst.join()
    led = rig.settle()
    _check(led, rig)
    assert led.decided == led.acked
    fault_table("5", led, "broker SIGTERM+start after 40 answers, camera still sending")


def test_sigkill_during_warm_up_then_restart(rig_factory, fault_table):
    rig = rig_factory("3.1.1")
    rig.service.start()
    rig.fleet.round(PAYLOADS, 0, WARMUP - 2)
    assert wait_until(lambda: rig.spooled() == 8 * (WARMUP - 2), 60)
    rig.service.kill()
    rig.service.start()  # the spooled frames are fed back before any new frame
    rig.fleet.round(PAYLOADS, WARMUP - 2, 2)
    led = rig.settle()
    _check(led, rig)
    assert led.decided == led.acked == 8 * WARMUP
    assert "fed back first" in rig.service.log()
    fault_table("3.1.1", led, "SIGKILL with 24 frames held in warm-up, restart")


def test_sigkill_mid_burst_then_restart(rig_factory, fault_table):
    rig = rig_factory("5")
    rig.service.start()
    burst = rig.fleet.burst(PAYLOADS, 0, 16, fps=40)
    assert wait_until(lambda: rig.answered() >= 40, 120)
    rig.service.kill()
    time.sleep(1.0)
    rig.service.start()
    burst.join()
    led = rig.settle()
    _check(led, rig)
    fault_table("5", led, "SIGKILL after 40 answers, camera still sending, restart")


def test_sigterm_during_burst_then_restart(rig_factory, fault_table):
    rig = rig_factory("3.1.1")
    rig.service.start()
    burst = rig.fleet.burst(PAYLOADS, 0, 16, fps=40)
    assert wait_until(lambda: rig.answered() >= 40, 120)
    assert rig.service.signal(signal.SIGTERM) == 0
    assert "service stopped after" in rig.service.log()
    rig.service.start()
    burst.join()
    led = rig.settle()
    _check(led, rig)
    assert led.decided == led.acked
    fault_table("3.1.1", led, "SIGTERM after 40 answers (clean stop, exit 0), restart")


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, ("the audit-disk faults mount a small tmpfs and need root with "
                                  f"CAP_SYS_ADMIN: {done.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    mounts = []

    def mount(name: str, size: str) -> Path:
        path = tmp_path / name
        _mount_tmpfs(path, size)
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _bind_read_only(path: Path) -> None:
    """A read-only bind mount of ``path`` over itself. mount binds, then remounts read-only; a file
    the service opens through the bind in between makes the remount fail ("mount point is busy"),
    so undo the half-made mount and try again."""
    for _ in range(50):
        made = subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True, text=True)
        if made.returncode == 0:
            return
        if subprocess.run(["mountpoint", "-q", str(path)]).returncode == 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # lazy: the file may still be open
        time.sleep(0.05)
    raise AssertionError(f"could not bind {path} read-only: {made.stderr.strip()}")


def test_audit_directory_read_only_then_writable(rig_factory, tmp_path, fault_table):
    """Read-only via a read-only bind mount over the audit folder (a plain remount,ro is refused
    while the service holds its lock file open for writing; the bind mount has no writers)."""
    audit = tmp_path / "audit-ro"
    audit.mkdir()
    rig = rig_factory("5", audit_dir=audit)
    rig.service.start()
    burst = rig.fleet.burst(PAYLOADS, 0, 12, fps=30)
    assert wait_until(lambda: rig.answered() >= 24, 120)
    _bind_read_only(audit)
    try:
        assert wait_until(lambda: "audit write failing" in rig.service.log(), 30)
        assert "Read-only file system" in rig.service.log()
        time.sleep(3.0)  # frames keep arriving; none may be acked while nothing is durable
        assert rig.service.process.poll() is None
        assert any(s.startswith("audit write failing") for s in rig.service.statuses)
    finally:
        subprocess.run(["umount", "-l", str(audit)], check=True)
    burst.join()
    led = rig.settle()
    _check(led, rig)
    assert "audit writes work again" in rig.service.log()
    fault_table("5", led, "audit folder read-only (ro bind mount) for 3+ s mid-burst, then writable")


def test_audit_directory_full_then_freed(rig_factory, tmpfs, fault_table):
    audit = tmpfs("audit-full", "4m")
    rig = rig_factory("3.1.1", audit_dir=audit)
    rig.service.start()
    burst = rig.fleet.burst(PAYLOADS, 0, 12, fps=30)
    assert wait_until(lambda: rig.answered() >= 24, 120)
    filler = audit / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    assert wait_until(lambda: "No space left on device" in rig.service.log(), 30)
    time.sleep(3.0)
    assert rig.service.process.poll() is None
    filler.unlink()
    burst.join()
    led = rig.settle()
    _check(led, rig)
    fault_table("3.1.1", led, "audit tmpfs (4 MiB) filled for 3+ s mid-burst, then freed")


def test_overload_twice_the_capacity(rig_factory, fault_table):
    """MQTT 5 (receive maximum 65535): the backlog reaches the service, which drops what it cannot
    score in time as stale or queue_full, each with an audit row, instead of deciding it late."""
    rig = rig_factory("5", MUSC_ENGINE__MAX_AGE_S="2", MUSC_ENGINE__QUEUE_SIZE="64", MUSC_ENGINE__BEHIND_S="1")
    rig.service.start()
    rig.fleet.round(PAYLOADS, 0, WARMUP)  # warm every line up
    assert wait_until(lambda: rig.answered() >= 8 * WARMUP, 120)
    started, before = time.monotonic(), rig.answered()
    rig.fleet.round(PAYLOADS, WARMUP, 10)  # as fast as possible: the service's capacity
    assert wait_until(lambda: rig.answered() >= before + 80, 120)
    capacity = 80 / (time.monotonic() - started)
    seconds = 60  # the bar: 2x overload for a minute
    per_line = max(4, int(2 * capacity * seconds / len(LINES)))
    burst = rig.fleet.burst(PAYLOADS, WARMUP + 10, per_line, fps=2 * capacity, prefix="o")
    burst.join()
    led = rig.settle()
    _check(led, rig)
    assert "falls behind" in rig.service.log()
    fault_table("5", led, f"{2 * capacity:.0f} frames/s for {seconds} s after measuring {capacity:.0f} "
                          "frames/s; max_age_s 2, queue 64")
    assert len(audit_table(rig.audit_dir)) >= led.acked


def test_torn_and_corrupt_memory_snapshots_then_restart(rig_factory, fault_table):
    """Memory on. Two clean stops leave two snapshot generations per line; then line0's newest
    segment is torn (truncated) and every manifest of line1 is garbage. On restart line0 falls back
    to the previous generation, line1 is set aside and starts fresh, the other lines load: every
    line keeps running, 0 lost, 0 twice."""
    rig = rig_factory("5", MUSC_MEMORY__ENABLED="true", MUSC_ENGINE__SCORE_MODE="combined",
                      MUSC_MEMORY__PATCHES_PER_FRAME="16")
    rig.service.start()
    rig.fleet.round(PAYLOADS, 0, WARMUP + 1)
    assert wait_until(lambda: rig.answered() >= 8 * (WARMUP + 1), 120)
    assert rig.service.signal(signal.SIGTERM) == 0  # the final snapshot: generation 1
    rig.service.start()
    rig.fleet.round(PAYLOADS, WARMUP + 1, WARMUP)  # the window is not persisted: warm-up again
    assert wait_until(lambda: rig.answered() >= 8 * (2 * WARMUP + 1), 120)
    assert rig.service.signal(signal.SIGTERM) == 0  # generation 2: the new rows only
    from musc_stream.stream.engine import state_dir_name

    state = rig.service.dir / "state"
    torn = sorted((state / state_dir_name("line0")).glob("seg-*.bin"))[-1]
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    for manifest in (state / state_dir_name("line1")).glob("manifest-*.json"):
        manifest.write_text('{"format": 2, "segments": [')
    rig.service.start()
    log = rig.service.log()
    assert "line line0: newest memory snapshot damaged" in log
    assert f"state of {state_dir_name('line1')} is damaged" in log
    assert len(list(state.glob(f"{state_dir_name('line1')}.damaged-*"))) == 1
    rig.fleet.round(PAYLOADS, 2 * WARMUP + 1, WARMUP + 1)
    led = rig.settle()
    _check(led, rig)
    assert led.decided == led.acked
    fault_table("5", led, "memory on; after 2 clean stops: line0's newest segment truncated (previous "
                          "generation used), line1's manifests garbage (set aside, fresh); restart")
