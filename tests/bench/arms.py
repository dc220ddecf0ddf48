"""The arms of the benchmark: what sits between the load generator and the emulator.

- A0: nothing (the emulator itself).
- A1: Envoy, router only (no access log, no filter): the limit the filter is measured against.
- A2: A1 plus Envoy's native `envoy.filters.http.sse_to_metadata`, extracting the same usage
  field (`model_usage.output_tokens` of `span.model_request_end`) into dynamic metadata.
- A3: the shipped envoy.yaml with the full plugin configuration (gateway key auth, tenant,
  isolation, routing, credential injection, metering, limits and budgets, audit access log), V8.
- A4: A3 on `envoy.wasm.runtime.wasmtime` and `envoy.wasm.runtime.wamr`.
- A5: LiteLLM's proxy (PyPI) in pass-through mode, in its own venv.

Every Envoy binds port 0 and is awaited on /ready (tests/harness/stack.py).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import stack

GATEWAY_KEY = "bench-gateway-key-0001"
BETA = "managed-agents-2026-04-01"
TENANT = "bench"
BENCH_DIR = stack.ROOT / "target" / "bench"
LITELLM_VENV = BENCH_DIR / "litellm-venv"
LITELLM_SPEC = "litellm[proxy]"

HUGE = 6_000_000  # the largest rate the limits config accepts (per minute)

# Everything the filter can do, configured so that nothing refuses benchmark traffic: the
# limit and budget code runs on every call (token buckets, stream slots, budget checks).
FULL_PLUGIN = {
    "tenants": [{"name": TENANT, "scopes": ["*:*"]}],
    "gateway_keys": [{"name": "bench", "sha256": stack.sha256_hex(GATEWAY_KEY), "tenant": TENANT}],
    "isolation": {"enabled": True, "untagged": "deny"},
    "limits": {
        "per_tenant": {
            "create": {"per_minute": HUGE}, "read": {"per_minute": HUGE},
            "stream": {"per_minute": HUGE}, "concurrent_streams": 1_000_000,
        },
        "per_principal": {
            "create": {"per_minute": HUGE}, "read": {"per_minute": HUGE},
            "stream": {"per_minute": HUGE}, "concurrent_streams": 1_000_000,
        },
        "budgets": {"tenants": {"*": {"tokens_per_day": 10**15, "microdollars_per_day": 10**15,
                                       "session_microdollars": 10**6}}},
    },
    "audit": {"redact_ids": False},
}

RUNTIMES = {
    "A3": "envoy.wasm.runtime.v8",
    "A4-wasmtime": "envoy.wasm.runtime.wasmtime",
    "A4-wamr": "envoy.wasm.runtime.wamr",
}


@dataclass
class Arm:
    """One way to reach the emulator; `port` is where the load goes."""

    name: str
    label: str
    headers: dict[str, str] = field(default_factory=dict)
    port: int = 0
    prefix: str = ""  # path prefix in front of /v1 (LiteLLM pass-through)
    h2: bool = False  # speaks HTTP/2 (prior knowledge) on `port`
    pid: int | None = None
    envoy: stack.Envoy | None = None
    proc: subprocess.Popen | None = None
    error: str | None = None  # why the arm could not run
    start_s: float | None = None  # launch to ready
    workdir: Path | None = None
    launched_at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def rss_kib(self) -> int | None:
        if self.pid is None:
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the arm's process (all its threads) has used so far; for an
        arm started in its own session (LiteLLM and its workers), the whole process group."""
        if self.pid is None:
            return None
        pids = [self.pid]
        if self.proc is not None:
            pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
        total, found = 0, False
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if pid != self.pid and (self.proc is None or int(fields[2]) != self.pid):
                continue  # fields[2] is the process group
            total += int(fields[11]) + int(fields[12])
            found = True
        return total / os.sysconf("SC_CLK_TCK") if found else None

    def stop(self):
        if self.envoy is not None:
            self.envoy.stop()
        if self.proc is not None:
            _stop_group(self.proc)


def _stop_group(proc: subprocess.Popen, grace: float = 10):
    """Stops a process started in its own session (and its children), by its id."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace)


def direct_headers(emulator: stack.Emulator) -> dict[str, str]:
    """What a client must send when nothing injects credentials or betas for it."""
    return {"x-api-key": emulator.api_key, "anthropic-version": "2023-06-01", "anthropic-beta": BETA}


def gateway_headers() -> dict[str, str]:
    """What a gateway client sends: its gateway key (the filter injects the rest)."""
    return {"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01", "anthropic-beta": BETA}


def full_config(emulator: stack.Emulator, runtime: str, audit_path: Path, wasm_path: Path = stack.WASM) -> dict:
    config = stack.render_envoy_config(
        upstream=emulator.upstream,
        listen_port=0,
        admin_port=0,
        gateway_keys={"bench": GATEWAY_KEY},
        plugin_overrides=FULL_PLUGIN,
        audit_path=audit_path,
        wasm_path=wasm_path,
    )
    hcm = _hcm(config)
    wasm = next(f for f in hcm["http_filters"] if f["name"] == "ma_gateway")["typed_config"]["config"]
    wasm["vm_config"]["runtime"] = runtime
    for ext in config.get("bootstrap_extensions", []):
        ext["typed_config"]["config"]["vm_config"]["runtime"] = runtime
    return config


def _hcm(config: dict) -> dict:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def router_only_config(emulator: stack.Emulator) -> dict:
    """The shipped config without the filter, the access logs and the background service."""
    config = copy.deepcopy(full_config(emulator, RUNTIMES["A3"], Path("/dev/null")))
    hcm = _hcm(config)
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "ma_gateway"]
    hcm.pop("access_log", None)
    config.pop("bootstrap_extensions", None)
    return config


def sse_to_metadata_config(emulator: stack.Emulator) -> dict:
    """A1 plus the native SSE-to-metadata filter pulling the same usage field out of streams."""
    config = router_only_config(emulator)
    rule = {
        "selectors": [{"key": "model_usage"}, {"key": "output_tokens"}],
        "on_present": {"metadata_namespace": "ma_bench", "key": "output_tokens", "type": "NUMBER"},
    }
    native = {
        "name": "envoy.filters.http.sse_to_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
            "response_rules": {
                "content_parser": {
                    "name": "envoy.content_parsers.json",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.content_parsers.json.v3.JsonContentParser",
                        "rules": [{"rule": rule}],
                    },
                },
                # Our filter keeps usage events up to metering.max_event_bytes (256 KiB by
                # default); the native filter gets the same bound.
                "max_event_size": 262144,
            },
        },
    }
    hcm = _hcm(config)
    hcm["http_filters"].insert(0, native)
    return config


def start_envoy(arm: Arm, config: dict, timeout: float = 120) -> Arm:
    envoy = stack.Envoy(config=config, env=stack.envoy_env(arm.headers.pop("_upstream_key", None)),
                        log_level="warning")
    arm.workdir = envoy.workdir
    started = time.monotonic()
    try:
        envoy.start(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal: the arm cannot run
        arm.error = f"Envoy did not start: {str(exc).strip()[-600:]}"
        return arm
    arm.start_s = time.monotonic() - started
    arm.envoy = envoy
    arm.port = envoy.listen_port
    arm.pid = envoy.proc.pid if envoy.proc else None
    arm.h2 = True
    return arm


def validate(config: dict, emulator: stack.Emulator) -> str | None:
    """`envoy --mode validate` (loads the Wasm module on the configured runtime): an error
    in a second instead of a start that only ends at its timeout."""
    workdir = Path(tempfile.mkdtemp(prefix="ma-bench-validate-"))
    try:
        path = workdir / "envoy.json"
        path.write_text(json.dumps(config))
        old = os.environ.get("ANTHROPIC_API_KEY")
        os.environ["ANTHROPIC_API_KEY"] = emulator.api_key
        try:
            res = stack.validate_config(path)
        finally:
            if old is None:
                os.environ.pop("ANTHROPIC_API_KEY", None)
            else:
                os.environ["ANTHROPIC_API_KEY"] = old
        if res.returncode == 0:
            return None
        lines = (res.stdout + res.stderr).splitlines()
        why = [ln for ln in lines if "without support" in ln] or [ln for ln in lines if "critical" in ln or "error" in ln]
        text = (why[0] if why else (lines[-1] if lines else f"exit {res.returncode}"))
        return "`envoy --mode validate` refused the config: " + re.sub(r"^\[[^]]*\]\[\d+\]", "", text).strip()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def envoy_arm(name: str, label: str, config: dict, emulator: stack.Emulator, *, gateway: bool) -> Arm:
    headers = gateway_headers() if gateway else direct_headers(emulator)
    arm = Arm(name=name, label=label, headers=dict(headers))
    err = validate(config, emulator)
    if err:
        arm.error = err
        return arm
    arm.headers["_upstream_key"] = emulator.api_key
    start_envoy(arm, config)
    arm.headers.pop("_upstream_key", None)
    return arm


def time_envoy_start(config: dict, emulator: stack.Emulator) -> float | None:
    """Launch-to-/ready seconds of one Envoy with `config` (stopped right after)."""
    arm = Arm(name="probe", label="probe", headers={"_upstream_key": emulator.api_key})
    start_envoy(arm, copy.deepcopy(config))
    try:
        return arm.start_s
    finally:
        arm.stop()
        if arm.workdir:
            shutil.rmtree(arm.workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A5: LiteLLM


def litellm_install(log_path: Path, timeout: float) -> str | None:
    """Creates target/bench/litellm-venv with LiteLLM's proxy; returns an error or None."""
    python = LITELLM_VENV / "bin" / "python"
    if (LITELLM_VENV / "bin" / "litellm").exists():
        return None
    try:
        with open(log_path, "ab") as log:
            if not python.exists():
                subprocess.run(["python3", "-m", "venv", str(LITELLM_VENV)], check=True,
                               stdout=log, stderr=subprocess.STDOUT, timeout=120)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            LITELLM_SPEC], check=True, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"`pip install {LITELLM_SPEC}` did not finish within {timeout:.0f} s (log: {log_path})"
    except subprocess.CalledProcessError as exc:
        tail = log_path.read_text(errors="replace")[-400:] if log_path.exists() else ""
        return f"`pip install {LITELLM_SPEC}` failed ({exc.returncode}): {tail.strip()}"
    if not (LITELLM_VENV / "bin" / "litellm").exists():
        return "LiteLLM installed without its `litellm` proxy command"
    return None


def litellm_version() -> str | None:
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists():
        return None
    try:
        out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def litellm_arm(emulator: stack.Emulator, *, install: bool, install_timeout: float, workers: int = 2) -> Arm:
    """Launches LiteLLM's proxy with a generic pass-through route `/ma/v1/*` → emulator `/v1/*`
    (await it with `litellm_ready`).

    The route injects the upstream key like the gateway does (`headers`) and forwards the
    client's other headers (`forward_headers`). The pass-through route itself is not
    authenticated with LiteLLM's master key (random per run, sent as `x-litellm-api-key`),
    as the gateway authenticates its own keys.
    """
    arm = Arm(name="A5", label="LiteLLM proxy, pass-through", prefix="/ma")
    arm.headers = {"anthropic-version": "2023-06-01", "anthropic-beta": BETA}
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    if install:
        err = litellm_install(BENCH_DIR / "litellm-install.log", install_timeout)
    elif not (LITELLM_VENV / "bin" / "litellm").exists():
        err = (f"not installed ({LITELLM_VENV.relative_to(stack.ROOT)} missing); the smoke run does "
               "not install it, `make bench` does")
    else:
        err = None
    if err:
        arm.error = err
        return arm
    workdir = Path(tempfile.mkdtemp(prefix="ma-bench-litellm-"))
    arm.workdir = workdir
    config = {
        "model_list": [],
        "general_settings": {
            "pass_through_endpoints": [{
                "path": "/ma/v1",
                "target": f"{emulator.url}/v1",
                "include_subpath": True,
                "forward_headers": True,
                "headers": {"x-api-key": emulator.api_key},
            }],
        },
        "litellm_settings": {"telemetry": False},
    }
    (workdir / "config.yaml").write_text(json.dumps(config))
    master = "sk-" + os.urandom(24).hex()
    arm.headers["x-litellm-api-key"] = master
    arm.port = _free_port()  # uvicorn reports no port-0 choice; a bind race only fails this arm
    env = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_API_KEY",)}
    env.update(LITELLM_TELEMETRY="False", LITELLM_LOG="ERROR", NO_DOCS="True",
               DISABLE_ADMIN_UI="True", LITELLM_LOCAL_MODEL_COST_MAP="True",
               LITELLM_MASTER_KEY=master)
    log = open(workdir / "litellm.log", "wb")
    arm.launched_at = time.monotonic()
    arm.proc = subprocess.Popen(
        [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(workdir / "config.yaml"),
         "--host", "127.0.0.1", "--port", str(arm.port), "--num_workers", str(workers)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(workdir), start_new_session=True,
    )
    return arm


def litellm_ready(arm: Arm, timeout: float = 180) -> Arm:
    """Waits until the launched proxy answers its liveness probe (or exits, or times out)."""
    if arm.error or arm.proc is None:
        return arm
    log_path = arm.workdir / "litellm.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if arm.proc.poll() is not None:
            arm.error = (f"LiteLLM proxy exited with {arm.proc.returncode}: "
                         + log_path.read_text(errors="replace")[-600:].strip())
            return arm
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{arm.port}/health/liveliness", timeout=2) as resp:
                if resp.status == 200:
                    arm.start_s = time.monotonic() - arm.launched_at
                    arm.pid = arm.proc.pid
                    return arm
        except OSError:
            pass
        time.sleep(0.2)
    arm.error = f"LiteLLM proxy not live after {timeout:.0f} s"
    arm.stop()
    return arm


# ---------------------------------------------------------------------------------------------
# Cost breakdown: variants between A1 and A3, to say what costs what.

NOOP_DIR = stack.ROOT / "tests" / "bench" / "noop_filter"
NOOP_WASM = BENCH_DIR / "noop-target" / "wasm32-wasip1" / "release" / "ma_bench_noop_filter.wasm"


# What ma-gateway asks of Envoy on one `GET /v1/agents/{id}` with the full config (read from
# src/host: request header map, 7 audit properties, header edits incl. the 2 rate-limit
# descriptors, credential + owner + 2 token buckets + budget reads, 2 bucket writes, clock
# reads, :status, 3 x-ratelimit-* headers, the JSON response buffered to strip the owner tag,
# 3 metric updates in on_log).
HOSTCALLS = ("get_headers=1,set_property=7,header_edits=7,shared_get=6,shared_set=2,time=4,status=1,"
             "add_response_headers=3,rewrite_body=1,metrics=3")
HOSTCALLS_LABEL = ("1 header-map read, 7 set_property, 8 header edits, 6 shared-data reads, 2 writes, "
                   "4 clock reads, :status read, 3 response headers, response body buffered, read and "
                   "written back, 3 metric updates")


def build_noop() -> str | None:
    """Builds the do-nothing proxy-wasm module (tests/bench/noop_filter); returns an error."""
    res = subprocess.run(
        ["cargo", "build", "--offline", "--quiet", "--release", "--target", "wasm32-wasip1",
         "--manifest-path", str(NOOP_DIR / "Cargo.toml"), "--target-dir", str(BENCH_DIR / "noop-target")],
        capture_output=True, text=True, timeout=600, cwd=stack.ROOT,
    )
    if res.returncode != 0 or not NOOP_WASM.exists():
        return f"noop filter build failed: {res.stderr.strip()[-300:]}"
    return None


O3_WASM = BENCH_DIR / "o3-target" / "wasm32-wasip1" / "release" / "ma_gateway.wasm"


def build_o3() -> str | None:
    """The same filter built at opt-level 3 instead of the shipped size-optimised "z" (the
    env var overrides .cargo/config.toml's wasm32 rustflags), into its own target dir."""
    env = dict(os.environ, CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS="-C opt-level=3",
               MA_GATEWAY_REVISION="bench-opt-level-3")
    res = subprocess.run(
        ["cargo", "build", "--quiet", "--release", "--lib", "--target", "wasm32-wasip1",
         "--target-dir", str(BENCH_DIR / "o3-target")],
        capture_output=True, text=True, timeout=900, cwd=stack.ROOT, env=env,
    )
    if res.returncode != 0 or not O3_WASM.exists():
        return f"opt-level 3 build failed: {res.stderr.strip()[-300:]}"
    return None


def _shipped_logs(emulator: stack.Emulator, audit_path: Path) -> list:
    return _hcm(full_config(emulator, RUNTIMES["A3"], audit_path))["access_log"]


def variant_configs(emulator: stack.Emulator, audit_dir: Path, *, with_o3: bool) -> dict[str, tuple[str, dict]]:
    """name → (what it adds, config), from A1 up to A3."""
    out: dict[str, tuple[str, dict]] = {}
    cfg = router_only_config(emulator)
    _hcm(cfg)["access_log"] = _shipped_logs(emulator, audit_dir / "V-logs.log")
    out["A1+logs"] = ("A1 + the shipped access logs (audit file + stdout JSON), no filter", cfg)
    cfg = router_only_config(emulator)
    _hcm(cfg)["http_filters"].insert(0, {
        "name": "noop",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "noop", "root_id": "noop",
                "vm_config": {"vm_id": "noop", "runtime": RUNTIMES["A3"],
                              "code": {"local": {"filename": str(NOOP_WASM)}}},
            },
        },
    })
    out["A1+noop-wasm"] = ("A1 + a proxy-wasm filter that does nothing (V8), no logs", cfg)
    cfg = copy.deepcopy(cfg)
    noop = _hcm(cfg)["http_filters"][0]["typed_config"]["config"]
    noop["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": HOSTCALLS}
    out["A1+hostcalls"] = ("A1 + a Wasm filter making the gateway's hostcalls for this call and nothing "
                           "else (" + HOSTCALLS_LABEL + "), no logs", cfg)
    cfg = full_config(emulator, RUNTIMES["A3"], audit_dir / "V-nologs.log")
    _hcm(cfg).pop("access_log", None)
    out["A3-no-logs"] = ("A3 without the access logs (filter only)", cfg)
    cfg = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys={"bench": GATEWAY_KEY}, plugin_overrides=None, audit_path=audit_dir / "V-min.log")
    out["A3-minimal"] = ("shipped default plugin config: key auth, routing, injection, metering; "
                         "no tenants/isolation/limits; logs", cfg)
    no_limits = {k: v for k, v in FULL_PLUGIN.items() if k != "limits"}
    cfg = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys={"bench": GATEWAY_KEY}, plugin_overrides=no_limits, audit_path=audit_dir / "V-nolim.log")
    out["A3-no-limits"] = ("A3 without limits/budgets (tenant, isolation, audit kept)", cfg)
    if with_o3:
        size = O3_WASM.stat().st_size if O3_WASM.exists() else 0
        out["A3-opt-level-3"] = (f"A3 with the module built at opt-level 3 ({size / 1024:,.0f} KiB) "
                                 "instead of the shipped \"z\"",
                                 full_config(emulator, RUNTIMES["A3"], audit_dir / "V-o3.log", O3_WASM))
    return out
