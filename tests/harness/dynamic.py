"""Envoy with its listener from LDS (a watched file): examples/dynamic-lds.envoy.yaml.

`render` turns the example bootstrap and its LDS file (examples/lds/listener.yaml) into a test
stack: a free listener port, admin on port 0, the emulator as upstream, the given gateway keys
and plugin overrides, and the LDS file in a directory of its own. `DynamicEnvoy.update` writes a
new listener the way an operator should (a sibling file renamed over the watched one) and waits
for Envoy's LDS counters to move, never for a fixed time.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.harness import stack

EXAMPLE = stack.ROOT / "examples" / "dynamic-lds.envoy.yaml"
LDS_EXAMPLE = stack.ROOT / "examples" / "lds" / "listener.yaml"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
LDS_COUNTERS = ("update_attempt", "update_success", "update_rejected", "update_failure")


def free_port() -> int:
    """A port free right now (LDS listeners keep their address across updates, so the port is
    fixed in the listener rather than 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def example_listener() -> dict:
    doc = yaml.safe_load(LDS_EXAMPLE.read_text())
    (listener,) = doc["resources"]
    return listener


def wasm_filter(listener: dict) -> dict:
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return next(f for f in hcm["http_filters"] if f["name"] == "ma_gateway")["typed_config"]["config"]


def plugin_config(listener: dict) -> dict:
    return json.loads(wasm_filter(listener)["configuration"]["value"])


def render_listener(listener: dict, *, port: int, upstream: stack.Upstream, gateway_keys: dict[str, str],
                    plugin_overrides: dict | None = None, wasm_path: Path = stack.WASM,
                    audit_path: Path | None = None, raw_plugin: str | None = None) -> dict:
    """The example listener with this stack's port, Wasm path, upstream authority and keys;
    `raw_plugin` replaces the plugin JSON text verbatim (bad-config tests)."""
    listener = copy.deepcopy(listener)
    listener["address"]["socket_address"]["port_value"] = port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for log in hcm["access_log"]:
        if log["name"] == "envoy.access_loggers.file":
            log["typed_config"]["path"] = str(audit_path) if audit_path else "/dev/null"
    wasm = wasm_filter(listener)
    wasm["vm_config"]["code"]["local"]["filename"] = str(wasm_path)
    plugin = json.loads(wasm["configuration"]["value"])
    plugin["upstream"]["authority"] = upstream.authority
    plugin["gateway_keys"] = [{"name": n, "sha256": stack.sha256_hex(k)} for n, k in gateway_keys.items()]
    for key, value in (plugin_overrides or {}).items():
        if isinstance(value, dict) and isinstance(plugin.get(key), dict):
            plugin[key] = {**plugin[key], **value}
        else:
            plugin[key] = value
    wasm["configuration"]["value"] = raw_plugin if raw_plugin is not None else json.dumps(plugin)
    return listener


def render_bootstrap(*, lds_dir: Path, upstream: stack.Upstream, wasm_path: Path = stack.WASM) -> dict:
    """The example bootstrap: admin on port 0, LDS from `lds_dir`, the `anthropic` cluster to
    `upstream` (plain HTTP to the emulator), the reconciler on the same Wasm."""
    config = yaml.safe_load(EXAMPLE.read_text())
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
    lds = config["dynamic_resources"]["lds_config"]["path_config_source"]
    lds["path"] = str(lds_dir / "listener.yaml")
    lds["watched_directory"]["path"] = str(lds_dir)
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "anthropic")
    cluster["type"] = "STATIC"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"].update(address=upstream.host, port_value=upstream.port)
    del cluster["transport_socket"]
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    options.pop("auto_config", None)
    options["explicit_http_config"] = {"http_protocol_options": {}}
    service = config["bootstrap_extensions"][0]["typed_config"]["config"]
    service["vm_config"]["code"]["local"]["filename"] = str(wasm_path)
    plugin = json.loads(service["configuration"]["value"])
    plugin["upstream"]["authority"] = upstream.authority
    service["configuration"]["value"] = json.dumps(plugin)
    return config


def write_listener(lds_dir: Path, listener: dict, version: str):
    """Atomically replaces the watched LDS file (write a sibling, rename over)."""
    doc = {"version_info": version, "resources": [{"@type": LISTENER_TYPE, **listener}]}
    staged = lds_dir / f".listener.yaml.{version}"
    staged.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(staged, lds_dir / "listener.yaml")


@dataclass
class DynamicEnvoy:
    envoy: stack.Envoy
    lds_dir: Path
    versions: int = 1

    @classmethod
    def start(cls, listener: dict, bootstrap_upstream: stack.Upstream, *, env: dict[str, str],
              extra_args: list[str] | None = None, wasm_path: Path = stack.WASM,
              concurrency: int = 2) -> "DynamicEnvoy":
        lds_dir = Path(tempfile.mkdtemp(prefix="ma-gateway-lds-"))
        write_listener(lds_dir, listener, "1")
        config = render_bootstrap(lds_dir=lds_dir, upstream=bootstrap_upstream, wasm_path=wasm_path)
        envoy = stack.Envoy(config=config, env=env, concurrency=concurrency, extra_args=list(extra_args or []))
        envoy.start()
        return cls(envoy, lds_dir)

    def counters(self) -> dict[str, int]:
        out = {}
        for line in self.envoy.admin("/stats?filter=^listener_manager\\.").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name.removeprefix("listener_manager.")] = int(value)
        return out

    def update(self, listener: dict, timeout: float = 30) -> tuple[str, float, dict[str, int]]:
        """Pushes a new listener; waits until Envoy accepted or rejected it. Returns
        ("accepted" | "rejected", seconds from the rename to the counter, counters after)."""
        before = self.counters()
        self.versions += 1
        started = time.monotonic()
        write_listener(self.lds_dir, listener, str(self.versions))
        deadline = started + timeout
        while time.monotonic() < deadline:
            now = self.counters()
            if now.get("lds.update_success", 0) > before.get("lds.update_success", 0):
                return "accepted", time.monotonic() - started, now
            if now.get("lds.update_rejected", 0) > before.get("lds.update_rejected", 0):
                return "rejected", time.monotonic() - started, now
            time.sleep(0.02)
        raise TimeoutError(f"LDS update {self.versions} neither accepted nor rejected in {timeout}s: {self.counters()}")

    def stop(self):
        self.envoy.stop()


# ---------------------------------------------------------------------------------------------
# ECDS: the Wasm filter's config alone from a watched file (no listener change, no drain)
# ---------------------------------------------------------------------------------------------

EXTENSION_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
WASM_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"


def to_ecds(config: dict, ecds_dir: Path) -> dict:
    """A rendered envoy.yaml (stack.render_envoy_config) whose `ma_gateway` HTTP filter is
    fetched by ECDS from `ecds_dir/ma_gateway.yaml` instead of being inline. Returns the
    filter's typed_config (written as version 1)."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    index = next(i for i, f in enumerate(hcm["http_filters"]) if f["name"] == "ma_gateway")
    typed_config = hcm["http_filters"][index]["typed_config"]
    hcm["http_filters"][index] = {"name": "ma_gateway", "config_discovery": {
        "config_source": {"resource_api_version": "V3", "path_config_source": {
            "path": str(ecds_dir / "ma_gateway.yaml"), "watched_directory": {"path": str(ecds_dir)}}},
        "type_urls": [WASM_FILTER_TYPE],
    }}
    config.setdefault("node", {"id": "ma-gateway", "cluster": "ma-gateway"})
    write_extension_config(ecds_dir, typed_config, "1")
    return typed_config


def write_extension_config(ecds_dir: Path, typed_config: dict, version: str):
    """Atomically replaces the watched ECDS file."""
    doc = {"version_info": version, "resources": [
        {"@type": EXTENSION_TYPE, "name": "ma_gateway", "typed_config": typed_config}]}
    staged = ecds_dir / f".ma_gateway.yaml.{version}"
    staged.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(staged, ecds_dir / "ma_gateway.yaml")


def ecds_counters(envoy: stack.Envoy, name: str = "ma_gateway") -> dict[str, int]:
    prefix = f"extension_config_discovery.http_filter.{name}."
    out = {}
    for line in envoy.admin(f"/stats?filter=^{prefix}").splitlines():
        key, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[key.removeprefix(prefix)] = int(value)
    return out


def wait_ecds(envoy: stack.Envoy, before: dict[str, int], timeout: float = 30) -> tuple[str, float]:
    """Waits until an ECDS push after `before` was accepted or rejected."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        now = ecds_counters(envoy)
        if now.get("update_success", 0) > before.get("update_success", 0):
            return "accepted", time.monotonic() - started
        if now.get("update_rejected", 0) > before.get("update_rejected", 0):
            return "rejected", time.monotonic() - started
        time.sleep(0.02)
    raise TimeoutError(f"ECDS update neither accepted nor rejected in {timeout}s: {ecds_counters(envoy)}")
