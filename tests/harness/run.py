"""`make run`: Envoy with the filter on 127.0.0.1:10000 (admin 127.0.0.1:9901).

Upstream, in order of precedence:
  ANTHROPIC_BASE_URL  any compatible http(s) upstream (egress proxy, staging);
  ANTHROPIC_API_KEY   https://api.anthropic.com over TLS;
  neither             the bundled emulator, so the demo works offline.
The gateway key clients use is $GATEWAY_KEY (default: dev-gateway-key-change-me).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from tests.harness import stack


def main() -> int:
    gateway_key = os.environ.get("GATEWAY_KEY") or stack.DEV_GATEWAY_KEY
    listen_port = int(os.environ.get("GATEWAY_PORT", "10000"))
    admin_port = int(os.environ.get("ADMIN_PORT", "9901"))
    base_url = os.environ.get("ANTHROPIC_BASE_URL")
    api_key = os.environ.get("ANTHROPIC_API_KEY")
    emulator = None
    if base_url:
        upstream = stack.Upstream.parse(base_url)
        where = f"{base_url} (ANTHROPIC_BASE_URL)"
        if not api_key:
            print("warning: ANTHROPIC_BASE_URL is set but ANTHROPIC_API_KEY is not; calls will get 503", file=sys.stderr)
    elif api_key:
        upstream = stack.Upstream("https", "api.anthropic.com", 443)
        where = "https://api.anthropic.com"
    else:
        api_key = stack.new_emulator_key()
        emulator = stack.Emulator(api_key=api_key)
        upstream = emulator.upstream
        where = f"the bundled emulator at {emulator.url} (no ANTHROPIC_API_KEY set)"

    audit_log = stack.ROOT / ".run" / "audit.log"
    audit_log.parent.mkdir(exist_ok=True)
    config = stack.render_envoy_config(
        upstream=upstream, listen_port=listen_port, admin_port=admin_port, gateway_keys={"dev": gateway_key},
        audit_path=audit_log,
    )
    envoy = stack.Envoy(config=config, env=stack.envoy_env(api_key))
    try:
        envoy.start()
    except BaseException:
        if emulator:
            emulator.stop()
        raise
    print(
        f"""
ma-gateway is up.
  gateway   http://127.0.0.1:{envoy.listen_port}   (admin {envoy.admin_url}, loopback only)
  upstream  {where}
  key       GATEWAY_KEY={gateway_key}
  envoy log {envoy.log_path}
  audit log {audit_log}

Try it:
  curl -s http://127.0.0.1:{envoy.listen_port}/v1/agents \\
    -H 'x-api-key: {gateway_key}' \\
    -H 'content-type: application/json' \\
    -d '{{"name":"demo","model":"claude-sonnet-4-6"}}'

Ctrl-C stops everything.""",
        flush=True,
    )
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping and envoy.proc.poll() is None:
            time.sleep(0.5)
    finally:
        envoy.stop()
        if emulator:
            emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
