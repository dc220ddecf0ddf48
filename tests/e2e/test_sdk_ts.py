"""The official TypeScript SDK (`@anthropic-ai/sdk`, pinned in tests/sdk-ts/package.json) drives
the same Managed Agents flow as test_sdk.py through the gateway (tests/sdk-ts/flow.mjs, run by
Node with the SDK's default headers: Node's fetch offers `accept-encoding: gzip, deflate`), and
the gateway meters that session exactly as the emulator's ground truth says.

Needs `npm --prefix tests/sdk-ts ci` (installs the locked SDK into tests/sdk-ts/node_modules);
skipped with that reason otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.e2e.conftest import KEYS, Gateway, start_gateway
from tests.e2e.test_sdk import assert_metered_exactly, metering_snapshot
from tests.harness import stack

SDK_TS = stack.ROOT / "tests" / "sdk-ts"
FLOW = SDK_TS / "flow.mjs"
MODEL = "claude-sonnet-4-6"
TEXT = "hello from the TypeScript SDK"
# The emulator echoes a user.message twice on the stream (as queued, then as processed); the
# history holds it once. Heartbeats are SSE comments, which the SDK never yields.
STREAM_TYPES = ["user.message", "user.message", "session.status_running", "span.model_request_start",
                "agent.message", "span.model_request_end", "session.usage", "session.status_idle"]
HISTORY_TYPES = ["user.message", "session.status_running", "span.model_request_start",
                 "agent.message", "span.model_request_end", "session.usage", "session.status_idle"]


def _missing_prerequisite() -> str | None:
    if shutil.which("node") is None:
        return "node is not on PATH (Node >= 20 runs tests/sdk-ts/flow.mjs)"
    if not (SDK_TS / "node_modules" / "@anthropic-ai" / "sdk" / "package.json").exists():
        return "tests/sdk-ts/node_modules is missing: run `npm --prefix tests/sdk-ts ci`"
    return None


# `make e2e` installs the SDK first, so in CI a missing prerequisite is a failure, never a skip.
if os.environ.get("CI") and _missing_prerequisite() is not None:
    raise RuntimeError(f"CI run without the TypeScript SDK: {_missing_prerequisite()}")
pytestmark = pytest.mark.skipif(_missing_prerequisite() is not None, reason=_missing_prerequisite() or "")


@pytest.fixture(scope="module")
def sdk_ts_gateway(emulator):
    """A gateway of its own: its counters move only with this module's session (the shared
    gateway's reconciler may meter other tests' sessions of the same model at any moment)."""
    envoy = start_gateway(emulator, api_key=emulator.api_key)
    yield Gateway(envoy, emulator)
    envoy.stop()


def run_flow(gateway, key: str, timeout: float = 90) -> dict:
    try:
        proc = subprocess.run(["node", str(FLOW), "--base-url", gateway.url, "--api-key", key],
                              capture_output=True, text=True, timeout=timeout, cwd=str(SDK_TS))
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"flow.mjs did not finish within {timeout} s; stderr: {err.stderr!r}") from None
    assert proc.returncode == 0, f"flow.mjs exited {proc.returncode}; stderr:\n{proc.stderr[-4000:]}"
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"expected one JSON line, got {proc.stdout!r}"
    return json.loads(lines[0])


def test_official_typescript_sdk_full_flow_is_metered_exactly(sdk_ts_gateway):
    gateway = sdk_ts_gateway
    before = metering_snapshot(gateway, MODEL)
    result = run_flow(gateway, KEYS["bob"])

    assert result["session_id"].startswith("sesn_"), result
    assert result["texts"] == [f"Echo: {TEXT}"], result
    assert result["event_types"] == STREAM_TYPES, result
    assert result["history_types"] == HISTORY_TYPES, result

    truth = assert_metered_exactly(gateway, result["session_id"], before, MODEL)
    usage = result["usage"]
    assert usage["input_tokens"] > 0, usage
    assert (usage["input_tokens"], usage["output_tokens"], usage["cache_read_input_tokens"]) == (
        truth["input_tokens"], truth["output_tokens"], truth["cache_read_input_tokens"]), (usage, truth)
    assert usage["cache_creation"] == truth["cache_creation"], (usage, truth)
