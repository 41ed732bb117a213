"""Fixtures: a real Mosquitto on a free loopback port, with persistence so restarts keep sessions."""

import shutil

import pytest

from musc_stream.broker import LocalBroker


@pytest.fixture
def broker(tmp_path):
    assert shutil.which("mosquitto"), "integration tests need mosquitto (scripts/setup.sh installs it)"
    with LocalBroker(persistence_dir=tmp_path / "mosquitto") as b:
        assert b.kind == "mosquitto"
        yield b
