"""Envoy with its plugin config from a watched file: through ECDS (examples/dynamic-ecds.envoy.yaml
and examples/ecds/ma_gateway.yaml, the recommended way: see the end of this module) or through
LDS (examples/dynamic-lds.envoy.yaml).

LDS: `render_listener` and `render_bootstrap` turn the example bootstrap and its LDS file
(examples/lds/listener.yaml) into a test stack: a free listener port, admin on port 0, the
emulator as upstream, the given gateway keys and plugin overrides, and the LDS file in a
directory of its own. `DynamicEnvoy.update` writes a new listener the way an operator should (a
sibling file renamed over the watched one) and waits for Envoy's LDS counters to move, never for
a fixed time. ECDS: the same with the filter's config (`render_extension_config`,
`render_ecds_bootstrap`, `EcdsEnvoy.start` and `EcdsEnvoy.update`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
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


def render_wasm(wasm: dict, *, upstream: stack.Upstream, gateway_keys: dict[str, str],
                plugin_overrides: dict | None = None, wasm_path: Path = stack.WASM,
                raw_plugin: str | None = None):
    """In place: a Wasm filter `config` with this stack's module path, upstream authority, keys
    and overrides; `raw_plugin` replaces the plugin JSON text verbatim (bad-config tests)."""
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


def _render_audit_log(hcm: dict, audit_path: Path | None):
    for log in hcm["access_log"]:
        if log["name"] == "envoy.access_loggers.file":
            log["typed_config"]["path"] = str(audit_path) if audit_path else "/dev/null"


def render_listener(listener: dict, *, port: int, upstream: stack.Upstream, gateway_keys: dict[str, str],
                    plugin_overrides: dict | None = None, wasm_path: Path = stack.WASM,
                    audit_path: Path | None = None, raw_plugin: str | None = None) -> dict:
    """The example listener with this stack's port, Wasm path, upstream authority and keys;
    `raw_plugin` replaces the plugin JSON text verbatim (bad-config tests)."""
    listener = copy.deepcopy(listener)
    listener["address"]["socket_address"]["port_value"] = port
    _render_audit_log(listener["filter_chains"][0]["filters"][0]["typed_config"], audit_path)
    render_wasm(wasm_filter(listener), upstream=upstream, gateway_keys=gateway_keys,
                plugin_overrides=plugin_overrides, wasm_path=wasm_path, raw_plugin=raw_plugin)
    return listener


def _render_static_parts(config: dict, *, upstream: stack.Upstream, wasm_path: Path):
    """In place, for both examples: admin on port 0, the `anthropic` cluster to `upstream`
    (plain HTTP to the emulator), the reconciler on the given module."""
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
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


def render_bootstrap(*, lds_dir: Path, upstream: stack.Upstream, wasm_path: Path = stack.WASM) -> dict:
    """The example bootstrap: admin on port 0, LDS from `lds_dir`, the `anthropic` cluster to
    `upstream` (plain HTTP to the emulator), the reconciler on the same Wasm."""
    config = yaml.safe_load(EXAMPLE.read_text())
    lds = config["dynamic_resources"]["lds_config"]["path_config_source"]
    lds["path"] = str(lds_dir / "listener.yaml")
    lds["watched_directory"]["path"] = str(lds_dir)
    _render_static_parts(config, upstream=upstream, wasm_path=wasm_path)
    return config


def write_listener(lds_dir: Path, listener: dict, version: str):
    """Atomically replaces the watched LDS file (write a sibling, rename over)."""
    doc = {"version_info": version, "resources": [{"@type": LISTENER_TYPE, **listener}]}
    staged = lds_dir / f".listener.yaml.{version}"
    staged.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(staged, lds_dir / "listener.yaml")


def listener_manager_counters(envoy: stack.Envoy) -> dict[str, int]:
    """Envoy's listener_manager.* counters and gauges (LDS updates, in-place updates, drains)."""
    out = {}
    for line in envoy.admin("/stats?filter=^listener_manager\\.").splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name.removeprefix("listener_manager.")] = int(value)
    return out


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
        return listener_manager_counters(self.envoy)

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
        shutil.rmtree(self.lds_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# ECDS: the Wasm filter's config alone from a watched file (examples/dynamic-ecds.envoy.yaml and
# examples/ecds/ma_gateway.yaml); no listener change, nothing drained
# ---------------------------------------------------------------------------------------------

ECDS_EXAMPLE = stack.ROOT / "examples" / "dynamic-ecds.envoy.yaml"
ECDS_RESOURCE = stack.ROOT / "examples" / "ecds" / "ma_gateway.yaml"
EXTENSION_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
WASM_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"


def example_extension_config() -> dict:
    """The shipped ECDS resource (a TypedExtensionConfig: `@type`, `name`, `typed_config`)."""
    doc = yaml.safe_load(ECDS_RESOURCE.read_text())
    (resource,) = doc["resources"]
    return resource


def hcm_of(config: dict) -> dict:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def http_filter(config: dict, name: str = "ma_gateway") -> dict:
    return next(f for f in hcm_of(config)["http_filters"] if f["name"] == name)


def render_extension_config(*, upstream: stack.Upstream, gateway_keys: dict[str, str],
                            plugin_overrides: dict | None = None, wasm_path: Path = stack.WASM,
                            raw_plugin: str | None = None) -> dict:
    """The shipped ECDS resource's `typed_config` (the Wasm filter) for this stack."""
    typed_config = copy.deepcopy(example_extension_config()["typed_config"])
    render_wasm(typed_config["config"], upstream=upstream, gateway_keys=gateway_keys,
                plugin_overrides=plugin_overrides, wasm_path=wasm_path, raw_plugin=raw_plugin)
    return typed_config


def render_ecds_bootstrap(*, ecds_dir: Path, upstream: stack.Upstream, wasm_path: Path = stack.WASM,
                          audit_path: Path | None = None, listen_port: int = 0,
                          default_config: dict | None = None) -> dict:
    """The shipped ECDS bootstrap: listener on `listen_port` (any by default), admin on port 0,
    the filter's config discovered from `ecds_dir/ma_gateway.yaml`, the `anthropic` cluster to
    `upstream`, the reconciler on `wasm_path`. `default_config` adds one (the example
    deliberately has none: test_config_reload.py shows why)."""
    config = yaml.safe_load(ECDS_EXAMPLE.read_text())
    config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = listen_port
    _render_audit_log(hcm_of(config), audit_path)
    discovery = http_filter(config)["config_discovery"]
    if default_config is not None:
        discovery["default_config"] = default_config
    source = discovery["config_source"]["path_config_source"]
    source["path"] = str(ecds_dir / ECDS_RESOURCE.name)
    source["watched_directory"]["path"] = str(ecds_dir)
    _render_static_parts(config, upstream=upstream, wasm_path=wasm_path)
    return config


def extension_config_text(typed_config: dict, version: str) -> str:
    """The ECDS file, as examples/ecds/ma_gateway.yaml lays it out."""
    resource = {**example_extension_config(), "typed_config": typed_config}
    return yaml.safe_dump({"version_info": version, "resources": [resource]}, sort_keys=False)


def stage_extension_config(ecds_dir: Path, text: str, version: str) -> Path:
    """Writes the next ECDS file next to the watched one (Envoy does not look at it yet)."""
    staged = ecds_dir / f".{ECDS_RESOURCE.name}.{version}"
    staged.write_text(text)
    return staged


def write_extension_config(ecds_dir: Path, text: str, version: str):
    """Atomically replaces the watched ECDS file (write a sibling, rename over), as the
    example's header tells operators to."""
    os.replace(stage_extension_config(ecds_dir, text, version), ecds_dir / ECDS_RESOURCE.name)


def ecds_counters(envoy: stack.Envoy, name: str = "ma_gateway") -> dict[str, int]:
    prefix = f"extension_config_discovery.http_filter.{name}."
    out = {}
    for line in envoy.admin(f"/stats?filter=^{prefix}").splitlines():
        key, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[key.removeprefix(prefix)] = int(value)
    return out


@dataclass
class EcdsEnvoy:
    envoy: stack.Envoy
    ecds_dir: Path
    versions: int = 1

    @classmethod
    def start(cls, initial: dict | str, upstream: stack.Upstream, *, env: dict[str, str],
              extra_args: list[str] | None = None, wasm_path: Path = stack.WASM,
              audit_path: Path | None = None, listen_port: int = 0, concurrency: int = 2,
              default_config: dict | None = None) -> "EcdsEnvoy":
        """`initial`: the filter's typed_config (written as version 1), or the file's raw text."""
        ecds_dir = Path(tempfile.mkdtemp(prefix="ma-gateway-ecds-"))
        text = initial if isinstance(initial, str) else extension_config_text(initial, "1")
        write_extension_config(ecds_dir, text, "1")
        config = render_ecds_bootstrap(ecds_dir=ecds_dir, upstream=upstream, wasm_path=wasm_path,
                                       audit_path=audit_path, listen_port=listen_port,
                                       default_config=default_config)
        envoy = stack.Envoy(config=config, env=env, concurrency=concurrency, extra_args=list(extra_args or []))
        try:
            envoy.start()
        except BaseException:
            shutil.rmtree(ecds_dir, ignore_errors=True)
            raise
        return cls(envoy, ecds_dir)

    def counters(self) -> dict[str, int]:
        return ecds_counters(self.envoy)

    def update(self, typed_config: dict | str, timeout: float = 30) -> tuple[str, float, dict[str, int]]:
        """Pushes a new filter config (or raw file text) the way an operator should; waits until
        Envoy took it. Returns ("accepted" | "rejected" | "failed" (unreadable file), seconds
        from the rename to the counter, counters after)."""
        before = self.counters()
        self.versions += 1
        version = str(self.versions)
        text = typed_config if isinstance(typed_config, str) else extension_config_text(typed_config, version)
        staged = stage_extension_config(self.ecds_dir, text, version)
        started = time.monotonic()
        os.replace(staged, self.ecds_dir / ECDS_RESOURCE.name)
        deadline = started + timeout
        verdicts = {"update_success": "accepted", "update_rejected": "rejected", "update_failure": "failed"}
        while time.monotonic() < deadline:
            now = self.counters()
            for counter, verdict in verdicts.items():
                if now.get(counter, 0) > before.get(counter, 0):
                    return verdict, time.monotonic() - started, now
            time.sleep(0.005)
        raise TimeoutError(f"ECDS update {version} neither accepted nor rejected in {timeout}s: {self.counters()}")

    def stop(self):
        self.envoy.stop()
        shutil.rmtree(self.ecds_dir, ignore_errors=True)
