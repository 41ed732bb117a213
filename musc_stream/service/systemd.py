"""The systemd notify protocol (sd_notify) without libsystemd: READY, STOPPING, WATCHDOG and STATUS.

systemd passes a Type=notify service the address of its notification socket in ``$NOTIFY_SOCKET``:
a file-system path (``/run/systemd/notify``) or a name in the Linux abstract namespace, written
with a leading ``@``. A notification is one datagram of newline-separated ``KEY=value``
assignments (sd_notify(3)). With ``WatchdogSec=`` set, systemd also passes ``$WATCHDOG_USEC`` (and
``$WATCHDOG_PID``), and kills the service unless ``WATCHDOG=1`` arrives at least that often.

Like sd_notify, every function here reads the systemd variables from the environment, because
that is where systemd puts them; each takes ``env`` so callers and tests can pass their own
mapping. Outside systemd (``$NOTIFY_SOCKET`` unset) every call is a no-op that returns False.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one notification, e.g. ``"READY=1"`` or ``"STATUS=12.5 frames/s"``.

    Returns True when the datagram was sent, False when ``$NOTIFY_SOCKET`` is unset or empty (not
    started by systemd) or the send failed. A failure is logged, never raised: a lost notification
    must not stop the service (systemd then times it out or restarts it, which is its job).
    """
    env = os.environ if env is None else env
    address = env.get(NOTIFY_SOCKET_ENV, "")
    if not address:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]  # abstract namespace: systemd writes the leading NUL as '@'
    elif address.startswith("/"):
        target = address
    else:
        # systemd >= 254 may also pass vsock:CID:PORT (for VMs); not a place this service runs.
        logger.warning("unsupported $%s %r: notification %r not sent", NOTIFY_SOCKET_ENV, address,
                       state)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        logger.warning("could not notify systemd at %s (%r): %s", address, state, exc)
        return False
    return True


def ready(env: Mapping[str, str] | None = None) -> bool:
    """Start-up finished: the model is loaded and warm and the subscription is live."""
    return notify("READY=1", env)


def stopping(env: Mapping[str, str] | None = None) -> bool:
    """Shutdown has begun (systemd stops expecting watchdog pings)."""
    return notify("STOPPING=1", env)


def watchdog(env: Mapping[str, str] | None = None) -> bool:
    """Keep-alive ping; send it from the loop that must not hang, at least every half interval."""
    return notify("WATCHDOG=1", env)


def status(text: str, env: Mapping[str, str] | None = None) -> bool:
    """One line for `systemctl status`; newlines would start new assignments, so they become spaces."""
    return notify("STATUS=" + " ".join(text.splitlines()), env)


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds, or None when systemd set no watchdog for this process.

    None also when ``$WATCHDOG_PID`` names another process: the variables were inherited from a
    parent that systemd watches, and pings from here would not count (sd_watchdog_enabled(3)).
    Ping at least every half of the returned value.
    """
    env = os.environ if env is None else env
    usec = env.get(WATCHDOG_USEC_ENV, "")
    if not usec:
        return None
    try:
        interval_us = int(usec)
    except ValueError:
        logger.warning("ignoring $%s=%r: not an integer", WATCHDOG_USEC_ENV, usec)
        return None
    if interval_us <= 0:
        logger.warning("ignoring $%s=%r: not positive", WATCHDOG_USEC_ENV, usec)
        return None
    pid = env.get(WATCHDOG_PID_ENV, "")
    if pid:
        try:
            watched = int(pid)
        except ValueError:
            logger.warning("ignoring the watchdog: $%s=%r is not a process id", WATCHDOG_PID_ENV, pid)
            return None
        if watched != os.getpid():
            logger.debug("watchdog is for pid %d, not this process (%d)", watched, os.getpid())
            return None
    return interval_us / 1_000_000
