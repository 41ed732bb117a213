"""The /metrics endpoint under abuse: loopback by default, bounded connections and threads, a clear
error when its port is taken. Real sockets and real scrapes."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from musc_stream.service.config import Settings
from musc_stream.service.sinks.prometheus import (
    HTTP_WORKERS,
    MAX_CONNECTIONS,
    Metrics,
    MetricsBindError,
    start_http_server,
)

EVENT_TIMEOUT_S = 20.0  # bounds a wait for something that must happen; never a speed claim


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=EVENT_TIMEOUT_S) as response:
        return response.read().decode()


def _eventually(predicate) -> bool:
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_metrics_listen_on_loopback_by_default():
    host = Settings().metrics.host
    assert host == "127.0.0.1"
    server, port = start_http_server(Metrics(), host, 0)
    try:
        assert server.host == "127.0.0.1"
        assert "musc_queue_depth" in _scrape(port)
    finally:
        server.shutdown()


def test_four_hundred_idle_connections_hold_no_threads_and_scrapes_go_on():
    metrics = Metrics()
    server, port = start_http_server(metrics, "127.0.0.1", 0)
    idle: list[socket.socket] = []
    threads_before = threading.active_count()
    try:
        assert "musc_" in _scrape(port)  # warm: the worker pool has started its threads
        for _ in range(400):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=EVENT_TIMEOUT_S))
        assert _eventually(lambda: server.open_connections <= MAX_CONNECTIONS and
                           server.open_connections >= MAX_CONNECTIONS // 2)
        assert threading.active_count() <= threads_before + HTTP_WORKERS
        metrics.set_queue_depth(7)
        assert "musc_queue_depth 7.0" in _scrape(port)  # Prometheus still gets its answer
        # The oldest idle connections were closed to make room: the server hung up on them.
        idle[0].settimeout(EVENT_TIMEOUT_S)
        assert idle[0].recv(1) == b""
    finally:
        for s in idle:
            s.close()
        server.shutdown()


def test_idle_and_slow_clients_are_hung_up_on():
    server, port = start_http_server(Metrics(), "127.0.0.1", 0, idle_timeout_s=0.5, request_timeout_s=0.5)
    try:
        silent = socket.create_connection(("127.0.0.1", port), timeout=EVENT_TIMEOUT_S)
        slow = socket.create_connection(("127.0.0.1", port), timeout=EVENT_TIMEOUT_S)
        slow.sendall(b"GET /metr")  # a request that never ends: a worker gives up on it
        assert silent.recv(1) == b"" and slow.recv(1) == b""
        assert _eventually(lambda: server.open_connections == 0)
        assert "musc_" in _scrape(port)
    finally:
        server.shutdown()


def test_port_in_use_names_the_setting_and_the_fix():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsBindError) as caught:
            start_http_server(Metrics(), "127.0.0.1", port)
    message = str(caught.value)
    assert f"metrics.port {port}: the port is already in use" in message
    assert "MUSC_METRICS__PORT" in message and "\n" not in message and "Errno" not in message
