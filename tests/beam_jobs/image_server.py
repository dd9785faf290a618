"""A tiny threaded HTTP server on 127.0.0.1 for download tests.

Each path has a :class:`Route`: a body, a status, a delay before answering, a number of first
requests that fail (to exercise retries), a redirect, or a body sent without Content-Length.
The server records every request (path, User-Agent) so tests can count attempts.
"""

from __future__ import annotations

import dataclasses
import http.server
import socket
import threading
import time
from typing import Dict, List, Optional, Tuple


@dataclasses.dataclass
class Route:
    body: bytes = b""
    status: int = 200
    sleep: float = 0.0             # seconds before the answer (longer than the client timeout)
    fail_first: int = 0            # the first N requests get `fail_status`
    fail_status: int = 500
    content_length: bool = True    # False: no Content-Length header, body until close
    location: Optional[str] = None  # redirect target (status 301/302/...)
    content_type: str = "application/octet-stream"


class ImageServer:
    """``with ImageServer({"/a.png": Route(body=...)}) as server: server.url("/a.png")``."""

    def __init__(self, routes: Dict[str, Route]):
        self.routes = dict(routes)
        self.requests: List[Tuple[str, str]] = []  # (path, user agent)
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                with server._lock:
                    server.requests.append((self.path, self.headers.get("User-Agent", "")))
                    hits = sum(1 for p, _ in server.requests if p == self.path)
                route = server.routes.get(self.path)
                try:
                    if route is None:
                        self._answer(404, b"not found")
                        return
                    if route.sleep:
                        time.sleep(route.sleep)
                    if hits <= route.fail_first:
                        self._answer(route.fail_status, b"try again later")
                    elif route.location is not None:
                        self.send_response(route.status)
                        self.send_header("Location", route.location)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    else:
                        self._answer(route.status, route.body, route.content_type,
                                     route.content_length)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): expected in these tests

            def _answer(self, status, body, content_type="text/plain", length=True):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for i in range(0, len(body), 65536):
                    self.wfile.write(body[i:i + 65536])

            def log_message(self, *args):  # keep test output quiet
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def hits(self, path: str) -> int:
        with self._lock:
            return sum(1 for p, _ in self.requests if p == path)

    def user_agents(self, path: str) -> List[str]:
        with self._lock:
            return [ua for p, ua in self.requests if p == path]

    def start(self) -> "ImageServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def closed_port_url(path: str = "/x.png") -> str:
    """An http URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
