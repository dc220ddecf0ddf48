"""Bounded shared data: creating many sessions leaves Envoy's memory flat once the bounded
cache families (owner, affinity, tenant, thread model) have filled their slots; what still grows
is the exact accounting record per session, which is not slotted.

Sessions are created through the gateway with wrk (2 threads, each stopping after its share
of 201 responses). After a warm-up batch that fills every slot, a second, larger batch must
not grow Envoy's RSS by more than a small allowance, while the live-entry gauges stay at or
below the slot counts and evictions are counted. MA_BOUNDED_WARMUP and MA_BOUNDED_N set the batch sizes (40000 + 60000 = 100k sessions
the default).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.e2e.conftest import Gateway
from tests.harness import stack

KEY = "gw-key-bounded-acme"
PLUGIN = {
    "tenants": [{"name": "acme"}],
    "gateway_keys": [{"name": "k", "sha256": stack.sha256_hex(KEY), "tenant": "acme"}],
}
CLOUD = {"type": "cloud", "networking": {"type": "unrestricted"}}
WARMUP = int(os.environ.get("MA_BOUNDED_WARMUP", "40000"))
BATCH = int(os.environ.get("MA_BOUNDED_N", "60000"))
# Slot counts of src/bounded.rs.
# Envoy RSS growth allowed over the second batch (see the assertion).
GROWTH_BOUND_KIB = int(os.environ.get("MA_BOUNDED_GROWTH_KIB", "24576"))
SLOTS = {"owner": 32_768, "tenant": 16_384, "affinity": 16_384}

LUA = """
local n, limit = 0, %d
local body = '%s'
request = function()
  return wrk.format("POST", "/v1/sessions", {
    ["x-api-key"] = "%s", ["anthropic-version"] = "2023-06-01",
    ["anthropic-beta"] = "managed-agents-2026-04-01", ["content-type"] = "application/json"}, body)
end
response = function(status, headers, body)
  if status == 200 then n = n + 1 end
  if n >= limit then wrk.thread:stop() end
end
"""


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))


def state_stats(gw: Gateway) -> dict[str, int]:
    out = {}
    for line in gw.envoy.admin("/stats?filter=ma_gateway_state").splitlines():
        name, _, value = line.partition(": ")
        out[name.strip().removeprefix("wasmcustom.")] = int(value)
    return out


def sessions_created(gw: Gateway) -> int:
    total = 0
    for line in gw.envoy.admin("/stats?filter=ma_gateway_requests_total").splitlines():
        name, _, value = line.partition(": ")
        if ".family.sessions." in name and ".action.create." in name and "2xx" in name:
            total += int(value)
    return total


def create_sessions(gw: Gateway, agent: str, env: str, count: int) -> None:
    """Creates `count` more sessions (at least) with wrk, stopping it once the gateway has
    answered that many creates (wrk itself would run out its whole duration)."""
    target = sessions_created(gw) + count
    body = f'{{"agent":"{agent}","environment_id":"{env}"}}'
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA % (count // 2, body, KEY))
    wrk = subprocess.Popen(["wrk", "-t2", "-c16", "-d150s", "--timeout", "10s", "-s", script.name,
                            f"http://127.0.0.1:{gw.port}/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stack._wait_until(lambda: sessions_created(gw) >= target or wrk.poll() is not None,
                          timeout=150, what=f"{count} session creates", interval=0.5)
        assert sessions_created(gw) >= target, "wrk ended before creating every session"
    finally:
        wrk.terminate()
        wrk.wait(timeout=10)
        os.unlink(script.name)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk")
def test_many_sessions_leave_envoy_memory_flat():
    emu = stack.Emulator(api_key=stack.new_emulator_key(), tls=False, compression="off", chunking="plain")
    try:
        config = stack.render_envoy_config(upstream=emu.upstream, listen_port=0, admin_port=0,
                                           gateway_keys={}, plugin_overrides=PLUGIN)
        gw = Gateway(stack.Envoy(config=config, env=stack.envoy_env(emu.api_key)).start(), emu)
        try:
            agent = gw.ok("POST", "/v1/agents", key=KEY, body={"name": "a", "model": "claude-sonnet-4-6"})["id"]
            env = gw.ok("POST", "/v1/environments", key=KEY, body={"name": "e", "config": CLOUD})["id"]
            pid = gw.envoy.proc.pid
            create_sessions(gw, agent, env, WARMUP)
            before = rss_kib(pid)
            stats_before = state_stats(gw)
            create_sessions(gw, agent, env, BATCH)
            after = rss_kib(pid)
            stats = state_stats(gw)
            print(f"\nenvoy RSS after {WARMUP} sessions: {before} KiB; after {BATCH} more: {after} KiB "
                  f"(+{after - before} KiB)\nstate stats before: {stats_before}\nstate stats after: {stats}")
            for family, slots in SLOTS.items():
                live = stats.get(f"ma_gateway_state_live_entries.family.{family}", 0)
                assert 0 < live <= slots, (family, live)
            assert stats.get("ma_gateway_state_evictions_total.family.owner", 0) > 0
            # Accounting records are not slotted (src/bounded.rs, FAMILIES): never evicted or
            # refused, so every session stays metered; they are what still grows.
            assert not any("family.usage" in k or "family.list_cost" in k for k in stats), stats
            # The cache families no longer grow: the second batch costs what the accounting
            # records cost (measured 2026-12-04: see README "Scope of state"), well under the
            # ~700 B a session that every family cost before they were bounded (+41.5 MiB).
            assert after - before < GROWTH_BOUND_KIB, (before, after)
            # The gateway still isolates and answers after all the churn.
            assert gw.ok("GET", f"/v1/agents/{agent}", key=KEY)["id"] == agent
        finally:
            gw.envoy.stop()
    finally:
        emu.stop()
