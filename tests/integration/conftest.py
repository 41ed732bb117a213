"""Fixtures: a real Mosquitto on a free loopback port, with persistence so restarts keep sessions."""

import shutil

import pytest

from musc_stream.devtools.broker import LocalBroker


@pytest.fixture
def broker(tmp_path):
    assert shutil.which("mosquitto"), "integration tests need mosquitto (scripts/setup.sh installs it)"
    with LocalBroker(persistence_dir=tmp_path / "mosquitto") as b:
        assert b.kind == "mosquitto"
        yield b


@pytest.fixture
def stock_broker(tmp_path):
    """Mosquitto with its default limits (20 in-flight QoS 1 messages per client)."""
    from .helpers import StockBroker

    assert shutil.which("mosquitto"), "integration tests need mosquitto (scripts/setup.sh installs it)"
    with StockBroker(persistence_dir=tmp_path / "mosquitto") as b:
        assert "max_inflight_messages" not in b.config_text()
        yield b
