"""A minimal restic REST server (the rest-server HTTP protocol, v1 and v2) on 127.0.0.1, in memory,
requiring HTTP basic auth: the real restic talks to it, and the test sees which credentials
restic sent. Neither rest-server nor rclone is installed here; this is the protocol, not a fake
of kvm-borg.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import re
import threading

V2 = "application/vnd.x.restic.rest.v2"
_TYPES = ("data", "keys", "locks", "snapshots", "index")


class RestServer:
    """Serve one repository at http://127.0.0.1:PORT/PREFIX/ for `user`:`password`; `auth_seen`
    collects every Authorization header received."""

    def __init__(self, user: str, password: str, prefix: str = "repo"):
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.prefix = prefix
        self.files: dict[str, bytes] = {}
        self.created = False
        self.auth_seen: set[str] = set()
        self.lock = threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.httpd.server_address[1]

    def url(self, user: str, password: str) -> str:
        return f"rest:http://{user}:{password}@127.0.0.1:{self.port}/{self.prefix}/"

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: bytes = b"", content_type: str = "application/octet-stream",
                       headers: dict | None = None):
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _route(self):
                auth = self.headers.get("Authorization", "")
                server.auth_seen.add(auth)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if auth != server.expected:
                    return self._reply(401)
                path = self.path.split("?", 1)[0]
                match = re.fullmatch(rf"/{server.prefix}/(?:(config)|({'|'.join(_TYPES)})/([0-9a-f]*))?/?", path)
                if not match:
                    return self._reply(404)
                with server.lock:
                    if match.group(0).rstrip("/") == f"/{server.prefix}" and self.command == "POST":
                        server.created = True
                        return self._reply(200)
                    if match.group(2) and not match.group(3):
                        return self._list(match.group(2))
                    key = "config" if match.group(1) else f"{match.group(2)}/{match.group(3)}"
                    return self._file(key, body)

            def _list(self, kind):
                names = sorted((k.split("/", 1)[1], len(v)) for k, v in server.files.items()
                               if k.startswith(kind + "/"))
                if V2 in self.headers.get("Accept", ""):
                    return self._reply(200, json.dumps([{"name": n, "size": s} for n, s in names]).encode(), V2)
                return self._reply(200, json.dumps([n for n, _ in names]).encode(), "application/json")

            def _file(self, key, body):
                if self.command == "POST":
                    server.files[key] = body
                    return self._reply(200)
                if self.command == "DELETE":
                    server.files.pop(key, None)
                    return self._reply(200)
                if key not in server.files:
                    return self._reply(404)
                data = server.files[key]
                ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if ranged:
                    start = int(ranged.group(1))
                    end = int(ranged.group(2)) if ranged.group(2) else len(data) - 1
                    return self._reply(206, data[start:end + 1],
                                       headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"})
                return self._reply(200, data)

            do_GET = do_HEAD = do_POST = do_DELETE = _route

        return Handler

    @contextlib.contextmanager
    def running(self):
        thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()
            thread.join(10)
