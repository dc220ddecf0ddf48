"""Cost through real Envoy: spans are priced as an estimate (model, fast mode, Haiku 5.5's
>100K band), and every new cumulative `list_cost` Anthropic reports (session.usage events on
any stream, history pages, session reads, the reconciler) sets the session's charged cost to
exactly that figure, once, up or down; tenant budgets follow the same figure.

The emulator bills at its own list prices; session metadata `emulator_list_cost_delta_cents`
moves its list cost away from any price table (either way), so the gateway's estimate and
Anthropic's figure differ by a known amount."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
from fractions import Fraction

import pytest

from tests.e2e.conftest import MANAGED_AGENTS_BETA, Gateway
from tests.e2e.test_metering import eventually, metric, prometheus
from tests.harness import stack

ALICE, MONEY = "gw-key-recon-alice", "gw-key-recon-money"
BUDGET_MICROS = 100_000_000  # $100 a day for tenant "money"
# µ$ per MTok (input, 5m write, 1h write, cache read, output): the reference's 2026-12 table.
PRICES = {
    "claude-opus-5-5": (4_000_000, 5_000_000, 8_000_000, 200_000, 20_000_000),
    "claude-haiku-5-5": (100_000, 125_000, 200_000, 10_000, 500_000),
}
RUNTIME_MICROS_PER_HOUR = 80_000


def plugin(reconcile_secs: int) -> dict:
    return {
        "tenants": [{"name": "default"}, {"name": "money"}],
        "gateway_keys": [
            {"name": "alice", "sha256": stack.sha256_hex(ALICE), "tenant": "default"},
            {"name": "money", "sha256": stack.sha256_hex(MONEY), "tenant": "money"},
        ],
        "limits": {"budgets": {"tenants": {"money": {"microdollars_per_day": BUDGET_MICROS}}}},
        "metering": {"reconcile_interval_secs": reconcile_secs},
    }


def start(emulator, reconcile_secs: int) -> Gateway:
    config = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys={}, plugin_overrides=plugin(reconcile_secs))
    envoy = stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key), concurrency=2).start()
    return Gateway(envoy, emulator)


@pytest.fixture(scope="module")
def reconciling(emulator):
    """The reconciler polls every second: it reads the sessions too."""
    gw = start(emulator, reconcile_secs=1)
    yield gw
    gw.envoy.stop()


@pytest.fixture(scope="module")
def streaming_only(emulator):
    """No reconciler: spans reach the gateway before any snapshot covers them, so the
    estimate is the span's price (fast mode, long-context band)."""
    gw = start(emulator, reconcile_secs=0)
    yield gw
    gw.envoy.stop()


class Stream:
    def __init__(self, gw: Gateway, path: str, key: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        self.conn.request("GET", path, headers={
            "x-api-key": key, "anthropic-beta": MANAGED_AGENTS_BETA, "anthropic-version": "2023-06-01"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200

    def until_idle(self, deadline_s: float = 30) -> list[tuple[str, dict]]:
        events, name, data = [], None, []
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            line = self.resp.readline()
            assert line, f"stream ended early: {events}"
            line = line.decode().rstrip("\r\n")
            if line == "":
                if name is not None:
                    events.append((name, json.loads("\n".join(data)) if data else None))
                    if name == "session.status_idle":
                        return events
                name, data = None, []
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        raise AssertionError(f"no idle within {deadline_s}s: {events}")

    def close(self):
        self.conn.close()


def new_session(gw: Gateway, key: str, model: str, delta_cents: int = 0, budget_cents: int | None = None) -> str:
    agent = gw.ok("POST", "/v1/agents", key=key, body={"name": "recon", "model": model})
    env = gw.ok("POST", "/v1/environments", key=key, body={
        "name": "recon", "config": {"type": "cloud", "networking": {"type": "unrestricted"}}})
    body = {"agent": agent["id"], "environment_id": env["id"],
            "metadata": {"emulator_list_cost_delta_cents": str(delta_cents)}}
    if budget_cents is not None:
        body["budget"] = {"type": "limit", "max_list_cost": {"amount": str(budget_cents), "currency": "USD"}}
    return gw.ok("POST", "/v1/sessions", key=key, body=body)["id"]


def send(gw: Gateway, key: str, sid: str, text: str):
    gw.ok("POST", f"/v1/sessions/{sid}/events", key=key, body={
        "events": [{"type": "user.message", "content": [{"type": "text", "text": text}]}]})


def run_turn(gw: Gateway, key: str, sid: str, text: str, paths=("events/stream",)):
    """Opens the streams, sends one turn and reads every stream to idle."""
    streams = [Stream(gw, f"/v1/sessions/{sid}/{p}", key) for p in paths]
    send(gw, key, sid, text)
    results = [None] * len(streams)

    def drain(i):
        results[i] = streams[i].until_idle()

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(streams))]
    [t.start() for t in threads]
    [t.join(40) for t in threads]
    [s.close() for s in streams]
    assert all(results), "every stream must see the turn"
    for events in results:
        usage = [d for n, d in events if n == "session.usage"]
        assert usage and "list_cost" in usage[-1]["usage"], events
    return results


def reconciler_reads(gw: Gateway, sid: str) -> int:
    return sum(r["path"] == f"/v1/sessions/{sid}"
               and any(n == "user-agent" and v == "ma-gateway-reconciler" for n, v in r["headers"])
               for r in gw.emulator.requests())


def wait_reconciler(gw: Gateway, sid: str, reads: int):
    end = time.monotonic() + 20
    while reconciler_reads(gw, sid) < reads:
        assert time.monotonic() < end, f"the reconciler never read {sid} {reads} times"
        time.sleep(0.1)


def money(samples, tenant: str, model: str) -> dict[str, int]:
    labels = {"tenant": tenant, "model": model}
    return {
        "estimate": metric(samples, "ma_gateway_cost_microdollars_total", **labels),
        "up": metric(samples, "ma_gateway_cost_list_correction_microdollars_total", kind="up", **labels),
        "down": metric(samples, "ma_gateway_cost_list_correction_microdollars_total", kind="down", **labels),
        "corrections": sum(metric(samples, "ma_gateway_list_cost_corrections_total", kind=k, **labels)
                           for k in ("up", "down")),
        "charged": metric(samples, "ma_gateway_charged_cost_microdollars", **labels),
        "unpriced": metric(samples, "ma_gateway_unpriced_tokens_total", **labels),
    }


def diff(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def estimate(truth: dict, model: str, times: int = 1) -> int:
    """The exact table price of the truth, floored once: tokens × `times`, runtime not."""
    p_in, p_5m, p_1h, p_read, p_out = PRICES[model]
    cache = truth["cache_creation"]
    tokens = (truth["input_tokens"] * p_in + truth["output_tokens"] * p_out
              + truth["cache_read_input_tokens"] * p_read
              + cache["ephemeral_5m_input_tokens"] * p_5m + cache["ephemeral_1h_input_tokens"] * p_1h)
    micros = Fraction(tokens * times, 1_000_000) + Fraction(truth["active_seconds"] * RUNTIME_MICROS_PER_HOUR, 3600)
    return int(micros)


def stored_budget_cents(gw: Gateway, sid: str) -> int:
    req = urllib.request.Request(f"{gw.emulator.url}/v1/sessions/{sid}", headers={
        "x-api-key": gw.emulator.api_key, "anthropic-version": "2023-06-01",
        "anthropic-beta": MANAGED_AGENTS_BETA})
    with gw.emulator.urlopen(req) as resp:
        return int(json.loads(resp.read())["budget"]["max_list_cost"]["amount"])


def test_list_cost_above_and_below_the_estimate_converges_exactly_once_and_budgets_follow(reconciling):
    gw = reconciling
    model = "claude-opus-5-5"
    lists, sessions = [], []
    # 2,000,000 input tokens on Opus 5.5 are $8: the table estimate; Anthropic then says
    # $3.37 more, then $3 less.
    for delta, direction in [(337, "up"), (-300, "down")]:
        before = money(prometheus(gw), "money", model)
        sid = new_session(gw, MONEY, model, delta_cents=delta, budget_cents=2_000)
        sessions.append(sid)
        reads = reconciler_reads(gw, sid)
        run_turn(gw, MONEY, sid, "emulator:prompt=2000000 price me", paths=("events/stream", "stream"))
        gw.ok("GET", f"/v1/sessions/{sid}/events?limit=1000", key=MONEY)
        gw.ok("GET", f"/v1/sessions/{sid}", key=MONEY)
        wait_reconciler(gw, sid, reads + 2)
        # A second turn's worth of reads of the same figure changes nothing either.
        gw.ok("GET", f"/v1/sessions/{sid}", key=MONEY)
        truth = gw.emulator.usage(sid)
        list_micros = truth["list_cost_cents"] * 10_000
        assert truth["list_cost_delta_cents"] == delta
        got = diff(money(eventually(gw, lambda s: money(s, "money", model)["charged"]
                                    - before["charged"] == list_micros), "money", model), before)
        print(f"\n{direction}: estimate {got['estimate']} µ$, list_cost {list_micros} µ$, got {got}")
        assert got["estimate"] == estimate(truth, model)
        assert abs(got["estimate"] - list_micros) > 2_000_000
        assert got["charged"] == list_micros
        assert got["corrections"] == 1
        assert got[direction] == abs(list_micros - got["estimate"])
        assert got["up" if direction == "down" else "down"] == 0
        assert got["estimate"] + got["up"] - got["down"] == list_micros
        lists.append(truth["list_cost_cents"])
    assert lists[0] > 800 > lists[1]

    # The tenant's budget was charged the list costs, not the estimates: once their sessions
    # are archived (their reservations released), a new session's spend ceiling is what is
    # left of $100 after them, to the cent.
    for sid in sessions:
        gw.ok("POST", f"/v1/sessions/{sid}/archive", key=MONEY)
    sid = new_session(gw, MONEY, model)
    assert stored_budget_cents(gw, sid) == BUDGET_MICROS // 10_000 - sum(lists)


def test_an_unpriced_model_converges_to_the_list_cost(reconciling):
    gw = reconciling
    model = "claude-future-9"
    before = money(prometheus(gw), "default", model)
    sid = new_session(gw, ALICE, model, delta_cents=250)
    run_turn(gw, ALICE, sid, "who prices me")
    truth = gw.emulator.usage(sid)
    assert truth["list_cost_cents"] == 250
    got = diff(money(eventually(gw, lambda s: money(s, "default", model)["charged"]
                                - before["charged"] == 2_500_000), "default", model), before)
    tokens = (truth["input_tokens"] + truth["output_tokens"] + truth["cache_read_input_tokens"]
              + truth["cache_creation_input_tokens"])
    assert got == {"estimate": 0, "up": 2_500_000, "down": 0, "corrections": 1,
                   "charged": 2_500_000, "unpriced": tokens}


@pytest.mark.parametrize("model,text,times", [
    ("claude-opus-5-5", "emulator:fast emulator:prompt=100000 quickly", 2),
    ("claude-opus-5-5", "emulator:prompt=100000 slowly", 1),
    ("claude-haiku-5-5", "emulator:prompt=150000 long", 5),
    ("claude-haiku-5-5", "emulator:prompt=90000 short", 1),
])
def test_fast_mode_and_long_haiku_prompts_are_estimated_at_their_multiple(streaming_only, model, text, times):
    gw = streaming_only
    before = money(prometheus(gw), "default", model)
    sid = new_session(gw, ALICE, model)
    events = run_turn(gw, ALICE, sid, text)[0]
    spans = [d for n, d in events if n == "span.model_request_end"]
    assert len(spans) == 1
    assert spans[0]["model_usage"].get("speed") == ("fast" if "fast" in text else None)
    truth = gw.emulator.usage(sid)
    list_micros = truth["list_cost_cents"] * 10_000
    got = diff(money(eventually(gw, lambda s: money(s, "default", model)["charged"]
                                - before["charged"] == list_micros), "default", model), before)
    expected = estimate(truth, model, times)
    print(f"\n{model} {text!r}: estimate {got['estimate']} µ$ (×{times}: {expected}), list {list_micros}")
    assert got["estimate"] == expected
    if times > 1:
        assert expected > estimate(truth, model)
    # Anthropic's figure (rounded to the cent) is the last word, once.
    assert got["charged"] == list_micros
    assert abs(got["estimate"] - list_micros) <= 5_000


def test_a_turn_on_a_thread_of_another_model_converges_to_its_list_cost(reconciling):
    """Spans carry no model: a turn an advisor or subagent runs on a cheaper model is
    estimated at the session's model, and Anthropic's list cost brings it down, once."""
    gw = reconciling
    model = "claude-opus-5-5"
    before = money(prometheus(gw), "default", model)
    sid = new_session(gw, ALICE, model)
    run_turn(gw, ALICE, sid, "emulator:prompt=1000000 emulator:thread-model=claude-haiku-5-5 advise")
    truth = gw.emulator.usage(sid)
    assert [s["model"] for s in truth["spans"]] == ["claude-haiku-5-5"]
    list_micros = truth["list_cost_cents"] * 10_000
    got = diff(money(eventually(gw, lambda s: money(s, "default", model)["charged"]
                                - before["charged"] == list_micros), "default", model), before)
    # Estimated at Opus 5.5 ($4/MTok: ~$4.00), billed at Haiku 5.5 over 100K ($0.50/MTok: $0.50).
    assert got["estimate"] == estimate(truth, model)
    # 1,000,000 input × $0.50 + 50 cache writes × $0.625 + 26 output × $2.50 + 2 s runtime: 50 cents.
    assert list_micros == 500_000
    assert got == {"estimate": got["estimate"], "up": 0, "down": got["estimate"] - list_micros,
                   "corrections": 1, "charged": list_micros, "unpriced": 0}
