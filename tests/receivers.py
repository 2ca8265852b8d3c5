"""A webhook receiver on 127.0.0.1 for the alert tests: records what was POSTed, answers as scripted."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """An HTTP server on 127.0.0.1 that records POSTed JSON and answers with scripted statuses."""

    def __init__(self, statuses: list[int] | None = None, hang: bool = False) -> None:
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.statuses = list(statuses or [])
        self.hang = threading.Event() if hang else None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.hang is not None:
                    receiver.hang.wait(10)
                    return
                receiver.bodies.append(json.loads(body))
                receiver.paths.append(self.path)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                reply = b"ok" if status < 300 else b'{"message": "no such webhook"}'
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/SECRET"

    def close(self) -> None:
        if self.hang is not None:
            self.hang.set()
        self.server.shutdown()
        self.server.server_close()
