"""The live line page's HTTP server: static page, JSON snapshot, server-sent events, pictures, actions.

Standard library only (ThreadingHTTPServer), with a cap on open connections and on live event
streams, so a browser left open on every screen of a plant cannot starve the service of threads.
The page has no login: it listens on loopback by default, answers only requests whose Host names
loopback there (a DNS-rebinding guard), and takes actions only as JSON POSTs from its own origin,
which a cross-site form or image cannot send. Off loopback, put it behind a reverse proxy with
authentication (README "Live line page").
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from musc_stream.service.sinks.prometheus import bind_advice
from musc_stream.service.ui.board import VERDICTS, Board

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 64  # open connections at once (a browser opens about 6); more are answered 503 and closed
MAX_STREAMS = 8  # live /events streams at once (each holds a connection and a thread)
REQUEST_TIMEOUT_S = 10.0  # a client that sends part of a request holds its thread this long at most
MAX_BODY = 4096  # bytes of an action's JSON body
EVENT_INTERVAL_S = 0.5  # at most two snapshots a second per stream (the page redraws, no need for more)
KEEPALIVE_S = 2.0  # a snapshot at least this often, so queue and broker state stay current
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8")}
PICTURE_TYPES = {"frame": "image/jpeg", "heatmap": "image/png"}
# Same-origin scripts only, no inline code, pictures from here (and data: for none): no internet at all.
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; " \
      "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"

Action = Callable[..., "str | None"]


class LinePageBindError(OSError):
    """The page could not listen on ui.host:ui.port; the message says what to change."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, handler, page: LinePage):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.page = page
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S
    server_version = "musc-stream-line-page"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        logger.debug("line page %s " + format, self.address_string(), *args)

    # -- helpers ----------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json", {"Cache-Control": "no-store"})

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"ok": False, "error": message})

    def _host_allowed(self) -> bool:
        """On loopback, only Host names of loopback: a rebinding site's own name is refused."""
        page = self.server.page
        if not page.loopback:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]")
        if name == "localhost":
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    # -- GET --------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
        if urlsplit(self.path).path == "/events":  # a stream has no head to give
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "GET /events for the live stream")
            return
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if not self._host_allowed():
            self._error(HTTPStatus.MISDIRECTED_REQUEST, "this page answers on 127.0.0.1/localhost only")
            return
        url = urlsplit(self.path)
        page = self.server.page
        if url.path in STATIC:
            name, content_type = STATIC[url.path]
            self._send(HTTPStatus.OK, page.static(name), content_type,
                       {"Cache-Control": "no-cache", "Content-Security-Policy": CSP, "X-Frame-Options": "DENY"})
        elif url.path == "/api/state":
            self._json(HTTPStatus.OK, page.state())
        elif url.path == "/events":
            self._events()
        elif url.path == "/picture":
            query = parse_qs(url.query)
            line, frame_id, kind = (query.get(k, [""])[0] for k in ("line", "frame", "kind"))
            data = page.board.picture(line, frame_id, kind) if kind in PICTURE_TYPES else None
            if data is None:
                self._error(HTTPStatus.NOT_FOUND, "no such picture (only the last frames and alerts are kept)")
            else:
                self._send(HTTPStatus.OK, data, PICTURE_TYPES[kind], {"Cache-Control": "private, max-age=3600"})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no page at {url.path}; the line page is at /")

    def _events(self) -> None:
        """Server-sent events: one ``state`` event (the whole snapshot) per change, at most every
        EVENT_INTERVAL_S and at least every KEEPALIVE_S; ends when the server stops."""
        page = self.server.page
        if not self.server.streams.acquire(blocking=False):
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"more than {MAX_STREAMS} live viewers; close one")
            return
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")  # nginx: pass events on at once
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            version = -1
            while not page.stopping.is_set():
                version = page.board.wait(version, KEEPALIVE_S)
                body = json.dumps(page.state())
                self.wfile.write(f"retry: 2000\nevent: state\ndata: {body}\n\n".encode())
                self.wfile.flush()
                if page.stopping.wait(EVENT_INTERVAL_S):
                    break
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            pass  # the browser went away
        finally:
            self.server.streams.release()

    # -- POST -------------------------------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if not self._host_allowed():
            self._error(HTTPStatus.MISDIRECTED_REQUEST, "this page answers on 127.0.0.1/localhost only")
            return
        why = self._cross_site()
        if why:
            self._error(HTTPStatus.FORBIDDEN, why)
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            self._error(HTTPStatus.BAD_REQUEST, f"send a JSON object of at most {MAX_BODY} bytes")
            return
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError):
            self._error(HTTPStatus.BAD_REQUEST, "the body is not valid JSON")
            return
        if not isinstance(body, dict):
            self._error(HTTPStatus.BAD_REQUEST, "send a JSON object")
            return
        path = urlsplit(self.path).path
        if path == "/api/reset":
            status, data = self.server.page.reset(body)
        elif path == "/api/feedback":
            status, data = self.server.page.feedback(body)
        else:
            status, data = HTTPStatus.NOT_FOUND, {"ok": False, "error": f"no action at {path}"}
        self._json(status, data)

    def _cross_site(self) -> str | None:
        """Why this POST may come from another site (None: it comes from the page). A cross-site
        form or image can send neither a JSON content type nor a custom header; a cross-site fetch
        that sets them needs a CORS preflight (OPTIONS), which this server never grants. Browsers
        also say Sec-Fetch-Site. Origin is not compared with Host: behind a reverse proxy they differ."""
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return "actions take Content-Type: application/json"
        if self.headers.get("X-Musc-Action") != "1":
            return "actions need the header X-Musc-Action: 1 (sent by the page)"
        if (self.headers.get("Sec-Fetch-Site") or "same-origin") not in ("same-origin", "none"):
            return "cross-site request refused; use the page itself"
        return None


class LinePage:
    """The running page; ``shutdown()`` ends event streams, stops the server and frees the port."""

    def __init__(self, board: Board, host: str, port: int, reset: Action | None = None,
                 feedback: Action | None = None) -> None:
        self.board = board
        self._reset = reset
        self._feedback = feedback
        self.stopping = threading.Event()
        self._static: dict[str, bytes] = {}
        try:
            self.loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            self.loopback = False
        try:
            self._httpd = _Server((host, port), _Handler, self)
        except OSError as exc:
            error = LinePageBindError(bind_advice("ui", host, port, exc, "; set MUSC_UI__PORT to a free port (or unset it: no page)"))
            error.errno = exc.errno
            raise error from None
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="line-page-http", daemon=True)
        self._thread.start()
        logger.info("live line page on http://%s:%d/", host if ":" not in host else f"[{host}]", self.port)

    def static(self, name: str) -> bytes:
        if name not in self._static:
            self._static[name] = resources.files("musc_stream.service.ui").joinpath("static", name).read_bytes()
        return self._static[name]

    def state(self) -> dict[str, Any]:
        data = self.board.snapshot()
        data["actions"] = {"reset": self._reset is not None, "feedback": self._feedback is not None}
        return data

    def reset(self, body: dict) -> tuple[int, dict]:
        line = body.get("line")
        if not isinstance(line, str) or not self.board.knows(line):
            return HTTPStatus.NOT_FOUND, {"ok": False, "error": f"no line {line!r} on this page"}
        if self._reset is None:
            return HTTPStatus.NOT_IMPLEMENTED, {"ok": False, "error": "reset is not available"}
        why = self._reset(line)
        if why:
            return HTTPStatus.CONFLICT, {"ok": False, "error": why}
        self.board.note_reset(line)
        logger.warning("line %s: reset (product changeover) asked for on the line page", line)
        return HTTPStatus.ACCEPTED, {"ok": True, "line": line}

    def feedback(self, body: dict) -> tuple[int, dict]:
        line, frame_id, verdict = body.get("line"), body.get("frame_id"), body.get("verdict")
        if verdict not in VERDICTS:
            return HTTPStatus.BAD_REQUEST, {"ok": False, "error": f"verdict must be one of {list(VERDICTS)}"}
        if not isinstance(line, str) or not isinstance(frame_id, str) or not self.board.knows(line, frame_id):
            return HTTPStatus.NOT_FOUND, {"ok": False, "error": f"frame {frame_id!r} of line {line!r} is not "
                                                                "on this page (only the last ones are kept)"}
        if self._feedback is None:
            return HTTPStatus.NOT_IMPLEMENTED, {"ok": False, "error": "feedback is not available in this build"}
        why = self._feedback(line, frame_id, verdict)
        if why:
            return HTTPStatus.CONFLICT, {"ok": False, "error": why}
        self.board.note_feedback(line, frame_id, verdict)
        logger.info("line %s: frame %s marked %s on the line page", line, ascii(frame_id), verdict)
        return HTTPStatus.ACCEPTED, {"ok": True, "line": line, "frame_id": frame_id, "verdict": verdict}

    def shutdown(self) -> None:
        self.stopping.set()
        self.board.wake()  # event streams waiting for a change end now
        self._httpd.shutdown()
        self._thread.join(timeout=5.0)
        self._httpd.server_close()
        logger.info("line page on port %d stopped", self.port)
