"""Plugin config changes under load from a watched file, in real Envoy, through the two shipped
examples: ECDS (examples/dynamic-ecds.envoy.yaml + examples/ecds/ma_gateway.yaml, the recommended
way) and LDS (examples/dynamic-lds.envoy.yaml + examples/lds/listener.yaml). Both run from copies
of the shipped files (paths, ports, upstream and keys rewritten), never from configs built here.

ECDS (only the Wasm filter's config is discovered):
- The example's bootstrap is envoy.yaml with `config_discovery` in place of the inline filter,
  and its ECDS file holds envoy.yaml's filter config; `--mode validate` does not read the ECDS
  file, so the resource is also validated as the inline filter.
- An accepted update is applied within milliseconds to every request that starts afterwards,
  including the next call on a keep-alive connection opened before (nothing is drained or
  closed); an event stream open across the update, even one opened with a key the update
  revokes, keeps receiving every event, ends normally and is metered exactly.
- A bad update (on_configure refuses the JSON; or a misspelled Envoy field, with the
  recommended `--reject-unknown-dynamic-fields`) is rejected (`update_rejected`), the log names
  the field and the previous config keeps serving; half a file is refused the same way.
- Fail-closed without a `default_config`: the listener accepts connections only once the filter
  config is loaded (polled from the process start), and with an invalid ECDS file at startup
  every call is answered 500 by Envoy (an Anthropic `api_error` envelope, through
  local_reply_config), never forwarded, until a valid file is renamed in. With
  a default_config, the same invalid file would serve the default silently (shown here too).

LDS:
- The example's listener is envoy.yaml's listener; its bootstrap is envoy.yaml's (admin, stats
  tags, cluster, reconciler) with LDS instead of a static listener. `envoy --mode validate` does
  not read LDS files, so the listener is also validated as a static one here, and the example is
  started for real.
- An accepted update (a gateway key added, another removed) is applied in place (only the filter
  chain changed) within tens of milliseconds: new connections get the new config at once; an event
  stream open across the update keeps receiving every event, ends normally and is metered exactly;
  an HTTP/1.1 keep-alive connection opened before serves one more call on the old config and is
  closed (`--drain-strategy immediate`).
- A bad update (on_configure refuses the JSON) is rejected by Envoy
  (`listener_manager.lds.update_rejected`) and the previous config keeps serving.
- Open streams on the old filter chain are closed when `--drain-time-s` runs out (measured with
  2 s); hence the example's `--drain-time-s 3600`.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
import yaml
from jsonschema import Draft202012Validator

from tests.e2e.conftest import KEYS, MANAGED_AGENTS_BETA, Gateway
from tests.e2e.test_failure_policy import Stream, tokens
from tests.e2e.test_streaming import new_session, send_text
from tests.harness import dynamic, stack

# What the example tells operators to run Envoy with (its header comment says so; checked).
RECOMMENDED_FLAGS = ["--drain-time-s", "3600", "--drain-strategy", "immediate"]
SHORT_DRAIN_S = 2
TICKS = 8
NEW_KEY = "gw-key-carol-0003"
BAD_PLUGIN = '{"api_version": "v1", "gateway_keys": [{"name": "x", "sha256": "nothex"}]}'
BAD_PLUGIN_ERROR = "config error at gateway_keys[0].sha256: expected 64 hex digits"


def _envoy_yaml() -> dict:
    return yaml.safe_load(stack.ENVOY_YAML.read_text())


def assert_stream_kept(stream, updated_at, emulator, sid, gw):
    """The stream opened before the update(s): every tick, a normal end, still open, and the
    turn's usage metered exactly."""
    stream.wait(lambda s: "session.status_idle" in s.names(), 30, "the turn to end on the stream")
    after = [name for at, name in stream.events if at > updated_at]
    print(f"stream across the update(s): {stream.count('agent.message')} ticks, "
          f"{after.count('agent.message')} after the (first) update; still open: {stream.ended_at is None}")
    assert stream.count("agent.message") == TICKS
    assert after.count("agent.message") >= 1
    assert after[-3:] == ["span.model_request_end", "session.usage", "session.status_idle"]
    assert stream.ended_at is None, f"the stream was closed: {stream.error}"
    truth = emulator.usage(sid)
    expected = {"input": truth["input_tokens"], "output": truth["output_tokens"],
                "cache_read": truth["cache_read_input_tokens"],
                "cache_write": truth["cache_creation_input_tokens"]}
    assert truth["model_requests"] == 1
    assert tokens(gw) == {kind: n for kind, n in expected.items() if n}


def test_example_listener_is_the_shipped_listener():
    shipped = _envoy_yaml()["static_resources"]["listeners"][0]
    listener = dynamic.example_listener()
    assert listener.pop("@type") == dynamic.LISTENER_TYPE
    assert listener.pop("drain_type") == "MODIFY_ONLY"
    assert listener == shipped


def test_example_bootstrap_is_the_shipped_bootstrap_with_lds():
    shipped = _envoy_yaml()
    example = yaml.safe_load(dynamic.EXAMPLE.read_text())
    for key in ("admin", "stats_config", "bootstrap_extensions"):
        assert example[key] == shipped[key], key
    assert example["static_resources"] == {"clusters": shipped["static_resources"]["clusters"]}
    assert example["node"] == {"id": "ma-gateway", "cluster": "ma-gateway"}
    lds = example["dynamic_resources"]["lds_config"]
    assert lds == {"resource_api_version": "V3", "path_config_source": {
        "path": "examples/lds/listener.yaml", "watched_directory": {"path": "examples/lds"}}}
    # The reconciler and the LDS filter share vm_id and code (shared data), and their plugin JSON.
    filter_config = dynamic.wasm_filter(dynamic.example_listener())
    service = example["bootstrap_extensions"][0]["typed_config"]["config"]
    assert service["vm_config"] == filter_config["vm_config"]
    assert json.loads(service["configuration"]["value"]) == dynamic.plugin_config(dynamic.example_listener())
    text = dynamic.EXAMPLE.read_text()
    assert " ".join(RECOMMENDED_FLAGS) in text


def test_example_listener_plugin_config_is_valid_against_the_schema():
    schema = json.loads((stack.ROOT / "examples" / "plugin-config.schema.json").read_text())
    errors = list(Draft202012Validator(schema).iter_errors(dynamic.plugin_config(dynamic.example_listener())))
    assert errors == []


def test_example_listener_validates_as_a_static_listener(tmp_path):
    """`--mode validate` skips LDS: validate the listener (and its Wasm filter) statically."""
    config = yaml.safe_load(dynamic.EXAMPLE.read_text())
    del config["dynamic_resources"]
    config["static_resources"]["listeners"] = [
        {k: v for k, v in dynamic.example_listener().items() if k != "@type"}]
    path = tmp_path / "static-lds-listener.json"
    path.write_text(json.dumps(config))
    result = stack.validate_config(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "config error" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def emulator():
    # Plaintext for this module: tests/harness/dynamic.py renders the examples' `anthropic`
    # cluster without its TLS transport socket (plain HTTP/1.1), so the LDS/ECDS gateways
    # cannot reach the session's TLS emulator. Still compressing and chunking awkwardly.
    emu = stack.Emulator(api_key=stack.new_emulator_key(), heartbeat_ms=2000, tls=False)
    yield emu
    emu.stop()


@pytest.fixture
def upstream(emulator) -> stack.Upstream:
    return emulator.upstream


def start(emulator, upstream, flags: list[str], keys: dict[str, str]) -> tuple[dynamic.DynamicEnvoy, Gateway, int]:
    port = dynamic.free_port()
    listener = dynamic.render_listener(dynamic.example_listener(), port=port, upstream=upstream, gateway_keys=keys)
    lds = dynamic.DynamicEnvoy.start(listener, upstream, env=stack.envoy_env(emulator.api_key), extra_args=flags)
    return lds, Gateway(lds.envoy, emulator), port


def open_ticking_stream(gw: Gateway) -> tuple[str, Stream]:
    sid = new_session(gw)
    stream = Stream(gw, f"/v1/sessions/{sid}/events/stream")
    assert stream.resp.status == 200
    send_text(gw, sid, f"emulator:ticker {TICKS}")
    stream.wait(lambda s: s.count("agent.message") >= 2, 20, "two ticks before the update")
    return sid, stream


def keep_alive_call(conn: http.client.HTTPConnection, key: str):
    conn.request("GET", "/v1/agents", headers={
        "x-api-key": key, "anthropic-beta": MANAGED_AGENTS_BETA, "anthropic-version": "2023-06-01"})
    resp = conn.getresponse()
    resp.read()
    return resp.status, resp.getheader("connection")


def test_config_update_under_load_keeps_streams_and_applies_to_new_requests(emulator, upstream):
    lds, gw, port = start(emulator, upstream, RECOMMENDED_FLAGS, KEYS)
    stream = keep = None
    try:
        assert lds.counters()["lds.update_success"] == 1
        assert gw.call("GET", "/v1/agents", key=KEYS["bob"]).status == 200
        assert gw.call("GET", "/v1/agents", key=NEW_KEY).status == 401

        sid, stream = open_ticking_stream(gw)
        keep = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert keep_alive_call(keep, KEYS["alice"]) == (200, None)

        # The update: carol's key added, bob's removed.
        new_keys = {"alice": KEYS["alice"], "carol": NEW_KEY}
        verdict, took, counters = lds.update(dynamic.render_listener(
            dynamic.example_listener(), port=port, upstream=upstream, gateway_keys=new_keys))
        updated_at = time.monotonic()
        print(f"\nLDS update accepted {took * 1000:.0f} ms after the rename; counters {counters}")
        assert verdict == "accepted"
        assert counters["listener_in_place_updated"] == 1
        assert counters["total_filter_chains_draining"] == 1
        assert counters["total_listeners_active"] == 1

        # An existing keep-alive connection: one more call on the old config, then closed.
        assert keep_alive_call(keep, NEW_KEY) == (401, "close")
        # New connections: the new config.
        assert gw.call("GET", "/v1/agents", key=NEW_KEY).status == 200
        assert gw.call("GET", "/v1/agents", key=KEYS["bob"]).status == 401

        # A bad config: rejected by Envoy, the previous one keeps serving.
        verdict, took, after_bad = lds.update(dynamic.render_listener(
            dynamic.example_listener(), port=port, upstream=upstream, gateway_keys={}, raw_plugin=BAD_PLUGIN))
        print(f"bad LDS update rejected {took * 1000:.0f} ms after the rename")
        assert verdict == "rejected"
        assert after_bad["lds.update_rejected"] == counters["lds.update_rejected"] + 1
        assert after_bad["lds.update_success"] == counters["lds.update_success"]
        assert after_bad["listener_in_place_updated"] == 1
        assert BAD_PLUGIN_ERROR in lds.envoy.log()
        assert gw.call("GET", "/v1/agents", key=NEW_KEY).status == 200
        assert gw.call("GET", "/v1/agents", key=KEYS["bob"]).status == 401

        # The stream opened before both updates: every tick, a normal end, exact usage.
        assert_stream_kept(stream, updated_at, emulator, sid, gw)
    finally:
        for conn in (stream, keep):
            if conn:
                conn.close()
        lds.stop()


def test_streams_on_the_old_config_are_closed_when_the_drain_time_runs_out(emulator, upstream):
    lds, gw, port = start(emulator, upstream, ["--drain-time-s", str(SHORT_DRAIN_S),
                                               "--drain-strategy", "immediate"], KEYS)
    stream = None
    try:
        sid, stream = open_ticking_stream(gw)
        verdict, _, _ = lds.update(dynamic.render_listener(
            dynamic.example_listener(), port=port, upstream=upstream,
            gateway_keys={"alice": KEYS["alice"], "carol": NEW_KEY}))
        updated_at = time.monotonic()
        assert verdict == "accepted"
        stream.wait(lambda s: s.ended_at is not None, 30, "the drain to close the stream")
        closed_after = stream.ended_at - updated_at
        print(f"\n--drain-time-s {SHORT_DRAIN_S}: stream closed {closed_after:.2f} s after the update, "
              f"{stream.count('agent.message')} of {TICKS} ticks received ({stream.error or 'EOF'})")
        assert SHORT_DRAIN_S - 0.5 <= closed_after <= SHORT_DRAIN_S + 8
        assert "session.status_idle" not in stream.names()
        deadline = time.monotonic() + 10
        while lds.counters()["total_filter_chains_draining"] != 0:
            assert time.monotonic() < deadline, "the old filter chain never finished draining"
            time.sleep(0.05)
        # The client reconnects and gets the new config; the turn's usage is still metered
        # exactly from the session (snapshot) once it ends upstream.
        deadline = time.monotonic() + 30
        while emulator.usage(sid)["model_requests"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        gw.ok("GET", f"/v1/sessions/{sid}", key=NEW_KEY)
        truth = emulator.usage(sid)
        assert tokens(gw)["output"] == truth["output_tokens"]
    finally:
        if stream:
            stream.close()
        lds.stop()


# ---------------------------------------------------------------------------------------------
# ECDS: examples/dynamic-ecds.envoy.yaml + examples/ecds/ma_gateway.yaml
# ---------------------------------------------------------------------------------------------

# What the ECDS example tells operators to run Envoy with (checked in its header comment).
ECDS_FLAGS = ["--reject-unknown-dynamic-fields"]
ECDS_DISCOVERY = {
    "config_source": {"resource_api_version": "V3", "path_config_source": {
        "path": "examples/ecds/ma_gateway.yaml", "watched_directory": {"path": "examples/ecds"}}},
    "type_urls": [dynamic.WASM_FILTER_TYPE],
}


def test_ecds_example_bootstrap_is_the_shipped_bootstrap_with_the_filter_discovered():
    shipped = _envoy_yaml()
    example = yaml.safe_load(dynamic.ECDS_EXAMPLE.read_text())
    assert example.pop("node") == {"id": "ma-gateway", "cluster": "ma-gateway"}
    discovered = dynamic.http_filter(example)
    # Exactly this: in particular no `default_config` (fail closed, see the example's header).
    assert discovered == {"name": "ma_gateway", "config_discovery": ECDS_DISCOVERY}
    filters = dynamic.hcm_of(example)["http_filters"]
    filters[filters.index(discovered)] = dynamic.http_filter(shipped)
    assert example == shipped
    assert " ".join(ECDS_FLAGS) in dynamic.ECDS_EXAMPLE.read_text()


def test_ecds_resource_is_the_shipped_filter_config():
    doc = yaml.safe_load(dynamic.ECDS_RESOURCE.read_text())
    assert doc["version_info"] == "1"
    assert doc["resources"] == [{"@type": dynamic.EXTENSION_TYPE, "name": "ma_gateway",
                                 "typed_config": dynamic.http_filter(_envoy_yaml())["typed_config"]}]


def test_ecds_resource_validates_as_the_inline_filter(tmp_path):
    """`--mode validate` does not read the ECDS file: validate its Wasm filter inline."""
    config = yaml.safe_load(dynamic.ECDS_EXAMPLE.read_text())
    filters = dynamic.hcm_of(config)["http_filters"]
    index = filters.index(dynamic.http_filter(config))
    filters[index] = {"name": "ma_gateway", "typed_config": dynamic.example_extension_config()["typed_config"]}
    path = tmp_path / "static-ecds-filter.json"
    path.write_text(json.dumps(config))
    result = stack.validate_config(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "config error" not in result.stdout + result.stderr


class Poller:
    """Calls GET /v1/agents without a key on a fixed port every 10 ms from before Envoy starts:
    what a client sees while the filter config is loading. Outcomes in order, repeats folded."""

    def __init__(self, port: int):
        self.port = port
        self.outcomes: list[tuple] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stopped.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/v1/agents", headers={"anthropic-version": "2023-06-01"})
                resp = conn.getresponse()
                body = resp.read()
                error_type = json.loads(body)["error"]["type"] if body else None
                outcome = (resp.status, error_type)
            except ConnectionRefusedError:
                outcome = ("refused",)
            except (OSError, http.client.HTTPException) as exc:
                outcome = (type(exc).__name__,)
            finally:
                conn.close()
            if not self.outcomes or self.outcomes[-1] != outcome:
                self.outcomes.append(outcome)
            time.sleep(0.01)

    def __enter__(self) -> "Poller":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        time.sleep(0.1)  # a few answers after /ready
        self.stopped.set()
        self.thread.join(timeout=10)


def start_ecds(emulator, upstream, initial: dict | str,
               default_config: dict | None = None) -> tuple[dynamic.EcdsEnvoy, Gateway, list[tuple]]:
    """The ECDS example with the recommended flags; also what a client saw from the start."""
    port = dynamic.free_port()
    with Poller(port) as poller:
        ecds = dynamic.EcdsEnvoy.start(initial, upstream, env=stack.envoy_env(emulator.api_key),
                                       extra_args=ECDS_FLAGS, listen_port=port,
                                       default_config=default_config)
    return ecds, Gateway(ecds.envoy, emulator), poller.outcomes


def test_ecds_update_under_load_keeps_streams_and_applies_to_the_next_request(emulator, upstream):
    ecds, gw, seen = start_ecds(emulator, upstream, dynamic.render_extension_config(
        upstream=upstream, gateway_keys=KEYS))
    stream = keep = None
    try:
        # Before the filter config was loaded the port refused connections; the first answer
        # already came from the filter.
        assert seen == [("refused",), (401, "authentication_error")], seen
        assert ecds.counters()["update_success"] == 1

        sid, stream = open_ticking_stream(gw)  # opened with alice's key
        keep = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        assert keep_alive_call(keep, KEYS["bob"]) == (200, None)
        assert keep_alive_call(keep, NEW_KEY) == (401, None)

        # The update: carol's key added, alice's (the open stream's) revoked.
        verdict, took, counters = ecds.update(dynamic.render_extension_config(
            upstream=upstream, gateway_keys={"bob": KEYS["bob"], "carol": NEW_KEY}))
        updated_at = time.monotonic()
        print(f"\nECDS update accepted {took * 1000:.1f} ms after the rename")
        assert verdict == "accepted"
        # The same keep-alive connection: the new config on its very next call, not closed.
        assert keep_alive_call(keep, NEW_KEY) == (200, None)
        assert keep_alive_call(keep, KEYS["alice"]) == (401, None)
        assert gw.call("GET", "/v1/agents", key=NEW_KEY).status == 200
        assert gw.call("GET", "/v1/agents", key=KEYS["alice"]).status == 401
        # Nothing about the listener changed: nothing in place, nothing draining.
        listeners = dynamic.listener_manager_counters(ecds.envoy)
        assert (listeners["listener_in_place_updated"], listeners["listener_modified"],
                listeners["total_filter_chains_draining"], listeners["total_listeners_draining"]) == (0, 0, 0, 0)

        # A config the filter refuses: rejected, the field named, the previous one serving.
        verdict, took, after_bad = ecds.update(dynamic.render_extension_config(
            upstream=upstream, gateway_keys={}, raw_plugin=BAD_PLUGIN))
        print(f"bad plugin JSON rejected {took * 1000:.1f} ms after the rename")
        assert verdict == "rejected"
        assert after_bad["update_success"] == counters["update_success"]
        assert BAD_PLUGIN_ERROR in ecds.envoy.log()
        assert keep_alive_call(keep, NEW_KEY) == (200, None)
        assert keep_alive_call(keep, KEYS["alice"]) == (401, None)

        # A misspelled Envoy field (here failure_policy, which would silently fall back to
        # FAIL_CLOSED): rejected thanks to --reject-unknown-dynamic-fields.
        typo = dynamic.render_extension_config(upstream=upstream, gateway_keys=KEYS)
        typo["config"]["failure_polcy"] = typo["config"].pop("failure_policy")
        verdict, _, after_typo = ecds.update(typo)
        assert verdict == "rejected"
        assert after_typo["update_rejected"] == after_bad["update_rejected"] + 1
        assert "no such field: 'failure_polcy'" in " ".join(ecds.envoy.log().split())
        assert keep_alive_call(keep, KEYS["alice"]) == (401, None)
        assert gw.call("GET", "/v1/agents", key=NEW_KEY).status == 200

        # Half a file (what an in-place edit can expose): refused as a whole (rejected when it
        # still parses as YAML, failed when not), the previous config serving.
        good_text = dynamic.extension_config_text(dynamic.render_extension_config(
            upstream=upstream, gateway_keys=KEYS), "x")
        verdict, _, after_cut = ecds.update(good_text[:len(good_text) // 2])
        assert verdict in {"rejected", "failed"}
        assert after_cut["update_success"] == counters["update_success"]
        assert keep_alive_call(keep, KEYS["alice"]) == (401, None)
        assert keep_alive_call(keep, NEW_KEY) == (200, None)

        # The stream opened before all four: every tick, a normal end, exact usage, although
        # its key was revoked (an update applies to requests that start after it).
        assert_stream_kept(stream, updated_at, emulator, sid, gw)
    finally:
        for conn in (stream, keep):
            if conn:
                conn.close()
        ecds.stop()


def test_ecds_invalid_file_at_startup_fails_closed_until_a_valid_one_is_renamed_in(emulator, upstream):
    """No default_config: with no loadable filter config Envoy still starts, and answers every
    call itself (500, response flag NFCF, mapped by local_reply_config to an Anthropic
    `api_error` envelope); nothing reaches upstream, no call skips the filter."""
    forwarded = len(emulator.requests())
    ecds, gw, seen = start_ecds(emulator, upstream, dynamic.render_extension_config(
        upstream=upstream, gateway_keys=KEYS, raw_plugin=BAD_PLUGIN))
    try:
        assert seen == [("refused",), (500, "api_error")], seen
        counters = ecds.counters()
        assert (counters["update_success"], counters["update_rejected"]) == (0, 1)
        assert BAD_PLUGIN_ERROR in ecds.envoy.log()
        for key in (KEYS["alice"], None):
            assert_not_loaded_envelope(gw.call("GET", "/v1/agents", key=key))
        assert_not_loaded_envelope(gw.call("POST", "/v1/messages", body={"model": "claude-sonnet-4-6", "max_tokens": 1}))
        assert len(emulator.requests()) == forwarded, "a call reached upstream without the filter"

        verdict, took, _ = ecds.update(dynamic.render_extension_config(upstream=upstream, gateway_keys=KEYS))
        print(f"\nvalid ECDS file accepted {took * 1000:.1f} ms after the rename")
        assert verdict == "accepted"
        assert gw.call("GET", "/v1/agents", key=KEYS["alice"]).status == 200
        assert gw.call("GET", "/v1/agents", key=None).status == 401
    finally:
        ecds.stop()


def assert_not_loaded_envelope(reply):
    """Envoy's own 500 for a filter without config, as the Anthropic envelope (status kept)."""
    assert reply.status == 500, reply.body
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["x-should-retry"] == "false"
    body = reply.json()
    assert (body["type"], body["error"]["type"]) == ("error", "api_error"), body
    assert body["error"]["message"] == (
        "the gateway's filter configuration is not loaded (refused or missing); nothing was forwarded")
    assert body["request_id"]


def test_a_default_config_would_serve_silently_despite_an_invalid_file(emulator, upstream):
    """Why the example has no default_config: with one (here the shipped config, with alice's
    and bob's keys), an invalid ECDS file at startup is rejected just the same, but calls are
    served on the default, e.g. with a key the file no longer lists."""
    revoking = dynamic.render_extension_config(upstream=upstream, gateway_keys={"bob": KEYS["bob"]})
    revoking["config"]["configuration"]["value"] = BAD_PLUGIN
    ecds, gw, seen = start_ecds(emulator, upstream, revoking, default_config=dynamic.render_extension_config(
        upstream=upstream, gateway_keys=KEYS))
    try:
        assert seen == [("refused",), (401, "authentication_error")], seen
        assert ecds.counters()["update_rejected"] == 1
        assert gw.call("GET", "/v1/agents", key=KEYS["alice"]).status == 200
    finally:
        ecds.stop()
