"""A minimal HashiCorp Vault KV v2 read endpoint on a free loopback port, for rotation tests.

`GET /v1/secret/data/<path>` with the right `X-Vault-Token` answers
`{"data":{"data":{"api_key":…},"metadata":{"version":n}}}`; anything else 403/404 like Vault.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeVault:
    def __init__(self, token: str):
        self.token = token
        self.secrets: dict[str, str] = {}
        self.versions: dict[str, int] = {}
        self.reads = 0
        vault = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                vault.reads += 1
                if self.headers.get("x-vault-token") != vault.token:
                    return self.reply(403, {"errors": ["permission denied"]})
                key = vault.secrets.get(self.path)
                if key is None:
                    return self.reply(404, {"errors": []})
                return self.reply(200, {"data": {"data": {"api_key": key},
                                                 "metadata": {"version": vault.versions[self.path]}}})

            def reply(self, status, body):
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def put(self, path: str, key: str):
        self.secrets[path] = key
        self.versions[path] = self.versions.get(path, 0) + 1

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
