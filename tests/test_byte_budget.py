"""The decoded-frame byte budget: fair share per line, and refusal from the header, before decode."""

import io

import numpy as np
import pytest
from PIL import Image

from musc_stream.service.budget import MIB, ByteBudget, Ticket
from musc_stream.service.config import FrameLimits
from musc_stream.service.frames import Refused, decode_frame


def test_a_flooding_line_cannot_take_the_room_of_another():
    budget = ByteBudget(100 * MIB)
    granted = []
    while isinstance(t := budget.reserve("flood", 10 * MIB), Ticket):
        granted.append(t)
    assert len(granted) == 5  # half is free for anyone; then 100 // (1 holder + 1) = 50 MiB
    assert "fair share" in t
    quiet = budget.reserve("quiet", 10 * MIB)
    assert isinstance(quiet, Ticket)  # a line holding nothing always gets in while the total fits
    assert budget.used == 60 * MIB <= budget.capacity
    for t in granted[:2]:
        budget.release(t)
    assert isinstance(budget.reserve("flood", 10 * MIB), Ticket)


def test_the_total_never_exceeds_the_budget_and_release_is_idempotent():
    budget = ByteBudget(30 * MIB)
    tickets = [budget.reserve(f"line{i}", 10 * MIB) for i in range(4)]
    assert [isinstance(t, Ticket) for t in tickets] == [True, True, True, False]
    assert "byte budget full" in tickets[3] and "engine.max_queued_bytes" in tickets[3]
    assert budget.peak == 30 * MIB
    budget.release(tickets[0])
    budget.release(tickets[0])
    budget.release(None)
    assert budget.used == 20 * MIB and budget.held_by("line0") == 0


def _blank_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decoded_size_is_asked_for_before_the_pixels_are_decoded():
    payload = _blank_png(2000, 1500)  # a few KB on the wire, 9 MB decoded
    assert len(payload) < 100_000
    asked = []

    def refuse(line, frame_id, nbytes):
        asked.append((line, frame_id, nbytes))
        raise Refused("budget full", line, frame_id)

    with pytest.raises(Refused) as refused:
        decode_frame("line/a/frames", payload, {"frame_id": "f1"}, FrameLimits(), "line", admit=refuse)
    assert asked == [("a", "f1", 2000 * 1500 * 3)]
    assert refused.value.frame_id == "f1"
    frame = decode_frame("line/a/frames", payload, {"frame_id": "f1"}, FrameLimits(), "line",
                         admit=lambda *a: asked.append(a))
    assert frame.image.nbytes == asked[-1][2] and frame.image.shape == (1500, 2000, 3)
    assert not np.any(frame.image)
