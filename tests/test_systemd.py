"""sd_notify against real AF_UNIX datagram sockets, bound at a path and in the abstract namespace."""

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from musc_stream.service import systemd


def _receive(sock: socket.socket) -> bytes:
    sock.settimeout(5.0)  # a datagram on a local socket arrives at once; this only bounds a failure
    return sock.recv(65536)


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A socket like /run/systemd/notify: a path in the file system."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    yield sock, str(path)
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    """A socket in the abstract namespace, named the way systemd writes it in $NOTIFY_SOCKET ('@...')."""
    name = f"musc-stream-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    yield sock, "@" + name
    sock.close()


def test_notify_reaches_a_path_socket(path_socket):
    sock, address = path_socket
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": address}) is True
    assert _receive(sock) == b"READY=1"


def test_notify_reaches_an_abstract_socket(abstract_socket):
    sock, address = abstract_socket
    assert systemd.notify("READY=1\nSTATUS=warming up", env={"NOTIFY_SOCKET": address}) is True
    assert _receive(sock) == b"READY=1\nSTATUS=warming up"


def test_abstract_name_is_not_taken_for_a_relative_path(abstract_socket, tmp_path, monkeypatch):
    # '@name' must go to the abstract namespace, not to a file called '@name' in the working directory.
    sock, address = abstract_socket
    decoy = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    monkeypatch.chdir(tmp_path)
    decoy.bind(address)
    try:
        assert systemd.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": address}) is True
        assert _receive(sock) == b"WATCHDOG=1"
        decoy.setblocking(False)
        with pytest.raises(BlockingIOError):
            decoy.recv(65536)
    finally:
        decoy.close()


def test_helpers_send_the_documented_assignments(path_socket):
    sock, address = path_socket
    env = {"NOTIFY_SOCKET": address}
    assert systemd.ready(env)
    assert _receive(sock) == b"READY=1"
    assert systemd.watchdog(env)
    assert _receive(sock) == b"WATCHDOG=1"
    assert systemd.stopping(env)
    assert _receive(sock) == b"STOPPING=1"
    assert systemd.status("12.5 frames/s, 3 lines", env)
    assert _receive(sock) == b"STATUS=12.5 frames/s, 3 lines"


def test_status_cannot_inject_assignments(path_socket):
    # A newline would end STATUS and start a new assignment, e.g. a READY=1 from a line id in the text.
    sock, address = path_socket
    assert systemd.status("line a\nREADY=1", {"NOTIFY_SOCKET": address})
    assert _receive(sock) == b"STATUS=line a READY=1"


def test_status_keeps_utf8(path_socket):
    sock, address = path_socket
    assert systemd.status("Förderband 2: 9.8 frames/s", {"NOTIFY_SOCKET": address})
    assert _receive(sock).decode("utf-8") == "STATUS=Förderband 2: 9.8 frames/s"


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}], ids=["unset", "empty"])
def test_without_systemd_every_call_is_a_no_op(env):
    assert systemd.notify("READY=1", env) is False
    assert systemd.ready(env) is False
    assert systemd.watchdog(env) is False
    assert systemd.stopping(env) is False
    assert systemd.status("x", env) is False


def test_a_missing_socket_is_logged_not_raised(tmp_path, caplog):
    address = str(tmp_path / "gone")
    with caplog.at_level("WARNING", logger="musc_stream.service.systemd"):
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": address}) is False
    assert address in caplog.text


def test_an_unsupported_address_is_refused(caplog):
    with caplog.at_level("WARNING", logger="musc_stream.service.systemd"):
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    assert "vsock:2:1234" in caplog.text


def test_default_env_is_the_process_environment(path_socket, monkeypatch):
    # What the service does under systemd: no env argument, $NOTIFY_SOCKET set by the manager.
    sock, address = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert systemd.ready() is True
    assert _receive(sock) == b"READY=1"


@pytest.mark.skipif(shutil.which("systemd-notify") is None,
                    reason="systemd-notify not installed (scripts/setup.sh installs the systemd package)")
@pytest.mark.parametrize("kind", ["path_socket", "abstract_socket"])
def test_same_datagram_as_systemds_own_client(kind, request):
    # systemd-notify(1) is libsystemd's sd_notify: our bytes must equal its bytes on the same address.
    sock, address = request.getfixturevalue(kind)
    env = {**os.environ, "NOTIFY_SOCKET": address}
    subprocess.run(["systemd-notify", "--no-block", "--ready", "--status=9.8 frames/s"], env=env,
                   check=True, timeout=30)
    theirs = _receive(sock)
    assert systemd.notify("READY=1\nSTATUS=9.8 frames/s", env) is True
    assert _receive(sock) == theirs == b"READY=1\nSTATUS=9.8 frames/s"


# -- watchdog interval --------------------------------------------------------------------------


def test_watchdog_interval_in_seconds():
    assert systemd.watchdog_interval_s({"WATCHDOG_USEC": "60000000"}) == 60.0
    assert systemd.watchdog_interval_s({"WATCHDOG_USEC": "1500000"}) == 1.5


def test_watchdog_for_this_process():
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_interval_s(env) == 30.0


def test_watchdog_for_another_process_is_not_ours():
    # Inherited from a parent that systemd watches: our pings would not count.
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert systemd.watchdog_interval_s(env) is None


@pytest.mark.parametrize("env", [
    {},
    {"WATCHDOG_USEC": ""},
    {"WATCHDOG_USEC": "0"},
    {"WATCHDOG_USEC": "-5"},
    {"WATCHDOG_USEC": "sixty"},
    {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "main"},
], ids=["unset", "empty", "zero", "negative", "not-a-number", "bad-pid"])
def test_no_watchdog(env):
    assert systemd.watchdog_interval_s(env) is None
