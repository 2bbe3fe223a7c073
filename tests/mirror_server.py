"""A misbehaving mirror on 127.0.0.1 for download tests.

Paths look like /<mode>/<file>. Mode `good` serves the file; every other mode fails in its own way,
except `together`, which serves it too, but only once two requests for the path have arrived (or
after 5 s), then slowly, so that two concurrent downloads are sure to overlap.
Requests are counted per path so tests can assert what was (not) fetched.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BAD_MODES = ("403", "503", "reset", "truncated", "html200", "wrongbytes")


class MirrorServer:
    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: Counter[str] = Counter()
        self._barriers: dict[str, threading.Barrier] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server.requests[self.path] += 1
                _, mode, name = self.path.split("/", 2)
                body = server.files.get(name)
                if body is None:
                    self.send_error(404)
                elif mode == "good":
                    self._send(200, body)
                elif mode == "together":
                    with server._lock:
                        barrier = server._barriers.setdefault(self.path, threading.Barrier(2, timeout=5))
                    try:
                        barrier.wait()
                    except threading.BrokenBarrierError:  # the other download never came: serve this one anyway
                        pass
                    self._send(200, body, pieces=8, pause=0.01)
                elif mode in ("403", "503"):
                    self.send_error(int(mode))
                elif mode == "reset":
                    # promise the full length, send half, then drop the connection hard
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    self.close_connection = True
                elif mode == "truncated":
                    self._send(200, body[: len(body) * 2 // 3])
                elif mode == "html200":
                    self._send(200, b"<!DOCTYPE html><html><body>Please log in</body></html>",
                               "text/html")
                elif mode == "wrongbytes":
                    flipped = bytearray(body)
                    flipped[len(flipped) // 2] ^= 0xFF
                    self._send(200, bytes(flipped))
                else:
                    self.send_error(404)

            def _send(self, code: int, body: bytes, ctype: str = "application/octet-stream",
                      pieces: int = 1, pause: float = 0.0):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                step = max(1, -(-len(body) // pieces))
                for start in range(0, len(body), step):
                    self.wfile.write(body[start:start + step])
                    self.wfile.flush()
                    time.sleep(pause)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def url(self, mode: str) -> str:
        return f"{self.base}/{mode}/"

    def __enter__(self) -> MirrorServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
