"""A byte budget for decoded frames waiting in the service (being decoded, queued, held for warm-up).

Counting frames does not bound memory: a 3 KB blank PNG decodes to 75 MB. A decode worker reads
the image header, asks for ``width * height * 3`` bytes here, and only decodes when granted; the
scoring stage gives the bytes back once the frame is scored (or, if the engine holds it for
warm-up, once it is answered). Fair share per line, as for the queue's frame count: half the budget
is free for anyone; beyond that a line may hold budget / (lines holding bytes + 1), so one
flooding line cannot take the room another line needs, and a line with nothing waiting always
finds room. A grant is a ``Ticket``; giving it back twice is harmless.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass
class Ticket:
    """Bytes granted to one frame of one line."""

    line: str | None
    nbytes: int
    released: bool = False


class ByteBudget:
    """Thread-safe per-line fair share of ``capacity`` bytes (decode workers reserve, the scoring
    stage releases). ``peak`` is the most ever granted at once."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._bytes: dict[str | None, int] = {}
        self._total = 0
        self.peak = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._total

    def reserve(self, line: str | None, nbytes: int) -> Ticket | str:
        """A Ticket for ``nbytes`` of ``line``, or a one-line reason why not (nothing reserved)."""
        with self._lock:
            if self._total + nbytes > self.capacity:
                return (f"decoded-frame byte budget full ({self._total / MIB:.0f} MiB of "
                        f"engine.max_queued_bytes {self.capacity / MIB:.0f} MiB in use, this frame needs "
                        f"{nbytes / MIB:.1f} MiB)")
            mine = self._bytes.get(line, 0)
            if mine and self._total + nbytes > self.capacity // 2:  # a line holding nothing gets in
                holding = sum(1 for n in self._bytes.values() if n > 0)
                share = self.capacity // (holding + 1)  # +1: room kept for a line with nothing waiting
                if mine + nbytes > share:
                    return (f"line over its fair share of the decoded-frame byte budget ({mine / MIB:.0f} MiB "
                            f"held + {nbytes / MIB:.1f} MiB > {share / MIB:.0f} MiB, engine.max_queued_bytes "
                            f"{self.capacity / MIB:.0f} MiB shared by {holding} line(s))")
            self._bytes[line] = self._bytes.get(line, 0) + nbytes
            self._total += nbytes
            self.peak = max(self.peak, self._total)
            return Ticket(line, nbytes)

    def release(self, ticket: Ticket | None) -> None:
        if ticket is None:
            return
        with self._lock:
            if ticket.released:
                return
            ticket.released = True
            left = self._bytes.get(ticket.line, 0) - ticket.nbytes
            if left > 0:
                self._bytes[ticket.line] = left
            else:
                self._bytes.pop(ticket.line, None)
            self._total = max(0, self._total - ticket.nbytes)

    def held_by(self, line: str | None) -> int:
        with self._lock:
            return self._bytes.get(line, 0)
