"""Fault-suite fixtures, and the report hook that writes benchmarks/results/faults.md.

Each fault test records one row (published, acked, decided, lost, twice, notes) through the
``fault_table`` fixture; at the end of a session that ran fault tests the table is written with
the commit and the machine, so the README can quote it.
"""

from __future__ import annotations

import inspect
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from .harness import Ledger, StockBroker

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "faults.md"
_ROWS: list[tuple[str, str, Ledger, str]] = []


@pytest.fixture
def stock_broker(tmp_path):
    assert shutil.which("mosquitto"), "the fault suite needs mosquitto (scripts/setup.sh installs it)"
    with StockBroker(persistence_dir=tmp_path / "mosquitto") as broker:
        assert "max_inflight_messages" not in broker.config_text()
        yield broker


@pytest.fixture
def fault_table(request):
    """Call with (protocol, ledger, notes) to add this test's row to faults.md."""
    def record(protocol: str, ledger: Ledger, notes: str = "") -> None:
        _ROWS.append((request.node.originalname, protocol, ledger, notes))
    return record


def _table_tests() -> set[str]:
    """Names of the fault tests that add a row: the table is written only when all of them did."""
    from . import test_faults

    return {name for name, fn in vars(test_faults).items()
            if name.startswith("test_") and callable(fn) and "fault_table" in inspect.signature(fn).parameters}


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS or {row[0] for row in _ROWS} != _table_tests():
        return  # a partial run (-k, one test, a failure) never overwrites the whole suite's table
    root = RESULTS.parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "musc_stream"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    lines = [
        "# Fault suite: delivery under faults",
        "",
        f"Written by `pytest tests/faults` (tests/faults/conftest.py) at commit {commit}"
        f"{' with uncommitted changes in musc_stream/' if dirty else ''}, on {platform.node()} "
        f"({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}).",
        "Real Mosquitto with its default limits (20 in-flight, 1000 queued per client), 8 lines starting "
        "together, `musc-stream serve` as a real process with the seeded random tiny ViT (64 px).",
        "published: frames the cameras sent; acked: frames the broker acknowledged to the cameras (what the "
        "service owes an answer); decided: acked frames with exactly one decision row in the Parquet audit; "
        "other: acked frames answered by a drop/failure row instead (reason in notes); lost: acked frames "
        "with no audit row; twice: frames with two decision rows (results are at least once, see README).",
        "",
        "| test | MQTT | published | acked | decided | other | lost | twice | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, protocol, led, notes in _ROWS:
        other = ", ".join(f"{k} {v}" for k, v in sorted(led.reasons.items()))
        extra = "; ".join(x for x in (
            other, f"{led.no_result} result message(s) missing" if led.no_result else "",
            f"{led.results_repeated} result message(s) arrived twice (QoS 1 resend or re-publish after a redelivery)" if led.results_repeated else "",
            notes) if x)
        lines.append(f"| {name} | {protocol} | {led.published} | {led.acked} | {led.decided} | "
                     f"{led.answered_other} | {len(led.lost)} | {len(led.twice)} | {extra} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
