"""The line page's server and board over real HTTP on loopback: what it refuses (cross-site actions,
foreign Host names, too many live viewers, a port in use) and what the board forgets. The browser
test with a running service is tests/integration/test_line_page.py."""

from __future__ import annotations

import http.client
import json
import socket
import time

import numpy as np
import pytest

from musc_stream.service.ui import Board, LinePage, LinePageBindError
from musc_stream.service.ui.server import MAX_STREAMS
from musc_stream.stream.records import Decision

ACTION = {"Content-Type": "application/json", "X-Musc-Action": "1"}


def decision(frame_id: str, score: float, alert: bool = False, heatmap: np.ndarray | None = None) -> Decision:
    return Decision("l1", frame_id, time.time(), score, 0.5, alert, False, heatmap=heatmap,
                    window_size=8, memory_size=100, decided_at=time.time())


@pytest.fixture
def page():
    resets: list[str] = []
    board = Board(history=20, recent=3).start()
    line_page = LinePage(board, "127.0.0.1", 0, reset=lambda line: resets.append(line))
    image = np.full((40, 60, 3), 128, np.uint8)
    board.offer(decision("a0", 0.9, alert=True, heatmap=np.linspace(0, 1, 2400, dtype=np.float32).reshape(40, 60)),
                image)
    board.offer(decision("n1", 0.1), image)
    assert board.drain()
    yield line_page, board, resets
    line_page.shutdown()
    board.stop()


def request(port: int, method: str, path: str, body: dict | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def test_actions_need_json_the_page_header_and_the_pages_origin(page):
    line_page, board, resets = page
    port = line_page.port
    body = {"line": "l1"}
    assert request(port, "POST", "/api/reset", body, {"Content-Type": "text/plain"})[0] == 403
    assert request(port, "POST", "/api/reset", body, {"Content-Type": "application/json"})[0] == 403
    assert request(port, "OPTIONS", "/api/reset", headers={"Origin": "http://evil.example",
                                                          "Access-Control-Request-Headers": "x-musc-action"})[0] == 501
    assert request(port, "POST", "/api/reset", body, {**ACTION, "Sec-Fetch-Site": "cross-site"})[0] == 403
    assert resets == []
    status, data = request(port, "POST", "/api/reset", body, ACTION)
    assert status == 202 and json.loads(data)["ok"] and resets == ["l1"]
    assert board.snapshot()["lines"]["l1"]["reset_requested_at"] is not None
    assert request(port, "POST", "/api/reset", {"line": "nope"}, ACTION)[0] == 404
    status, data = request(port, "POST", "/api/feedback", {"line": "l1", "frame_id": "a0", "verdict": "maybe"}, ACTION)
    assert status == 400 and "not_defect" in json.loads(data)["error"]
    status, data = request(port, "POST", "/api/feedback", {"line": "l1", "frame_id": "a0", "verdict": "defect"}, ACTION)
    assert status == 501  # this page was started without a feedback action


def test_loopback_page_refuses_foreign_host_names(page):
    line_page, _, _ = page
    assert request(line_page.port, "GET", "/api/state", headers={"Host": "evil.example"})[0] == 421
    assert request(line_page.port, "GET", "/api/state", headers={"Host": f"localhost:{line_page.port}"})[0] == 200


def test_pictures_and_static_files(page):
    line_page, _, _ = page
    status, png = request(line_page.port, "GET", "/picture?line=l1&frame=a0&kind=heatmap")
    assert status == 200 and png.startswith(b"\x89PNG")
    status, jpeg = request(line_page.port, "GET", "/picture?line=l1&frame=n1&kind=frame")
    assert status == 200 and jpeg.startswith(b"\xff\xd8")
    assert request(line_page.port, "GET", "/picture?line=l1&frame=n1&kind=heatmap")[0] == 404  # no alert, no map
    for path in ("/", "/app.js", "/app.css"):
        assert request(line_page.port, "GET", path)[0] == 200


def test_live_viewers_are_capped(page):
    line_page, _, _ = page
    streams = []
    try:
        for _ in range(MAX_STREAMS):
            conn = http.client.HTTPConnection("127.0.0.1", line_page.port, timeout=5)
            conn.request("GET", "/events")
            response = conn.getresponse()
            assert response.status == 200
            assert response.fp.readline().startswith(b"retry:")
            streams.append(conn)
        assert request(line_page.port, "GET", "/events")[0] == 503
    finally:
        for conn in streams:
            conn.close()


def test_board_forgets_pictures_of_frames_it_no_longer_shows_and_survives_a_bad_update():
    errors = []
    board = Board(recent=3, on_error=lambda: errors.append(1)).start()
    image = np.zeros((32, 32, 3), np.uint8)
    for i in range(5):
        board.offer(decision(f"f{i}", 0.1), image)
    board.offer(decision("bad", 0.9, alert=True, heatmap=np.zeros((0, 0), np.float32)), image)  # empty map
    board.offer(decision("f5", 0.2), image)
    assert board.drain()
    board.stop()
    snapshot = board.snapshot()["lines"]["l1"]
    assert [e["frame_id"] for e in snapshot["recent"]] == ["f5", "f4", "f3"]
    # f0…f2 are no longer shown; their pictures stay for 3 more frames (a page a snapshot behind)
    assert all(board.picture("l1", f"f{i}", "frame") is not None for i in range(6))
    assert errors == [1] and board.errors == 1


def test_board_forgets_a_picture_once_recent_more_frames_have_fallen_off():
    board = Board(recent=3).start()
    image = np.zeros((32, 32, 3), np.uint8)
    for i in range(7):
        board.offer(decision(f"f{i}", 0.1), image)
    assert board.drain()
    board.stop()
    assert [e["frame_id"] for e in board.snapshot()["lines"]["l1"]["recent"]] == ["f6", "f5", "f4"]
    assert board.picture("l1", "f0", "frame") is None  # fell off, then 3 more fell off after it
    assert all(board.picture("l1", f"f{i}", "frame") is not None for i in range(1, 7))


def test_port_in_use_is_one_line_naming_the_setting():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LinePageBindError) as caught:
            LinePage(Board(), "127.0.0.1", port)
    message = str(caught.value)
    assert "\n" not in message and "MUSC_UI__PORT" in message and f"ui.port {port}" in message
