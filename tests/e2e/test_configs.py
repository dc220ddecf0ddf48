"""Every shipped Envoy config is valid for the real Envoy, and a bad plugin config is refused
with a message naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import stack

SHIPPED = [stack.ENVOY_YAML] + sorted((stack.ROOT / "examples").glob("*.envoy.yaml"))


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.name)
def test_shipped_envoy_configs_validate(config: Path):
    result = stack.validate_config(config)
    assert result.returncode == 0, result.stdout + result.stderr


def rendered(tmp_path: Path, overrides: dict) -> Path:
    config = stack.render_envoy_config(
        upstream=stack.Upstream("http", "127.0.0.1", 9), listen_port=0, admin_port=0,
        gateway_keys={"dev": "k"}, plugin_overrides=overrides)
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    return path


def test_rendered_config_validates(tmp_path):
    assert stack.validate_config(rendered(tmp_path, {})).returncode == 0


@pytest.mark.parametrize("overrides,message", [
    ({"upstrem": {}}, "config error at upstrem: unknown field"),
    ({"routes": {"neighbours": ["mail"]}}, "config error at routes.neighbours[0]: unknown neighbour"),
    ({"gateway_keys": [{"name": "k", "sha256": "nothex"}]}, "config error at gateway_keys[0].sha256"),
    ({"api_version": "v0"}, "config error at api_version: unsupported version"),
])
def test_bad_plugin_config_is_rejected_naming_the_field(tmp_path, overrides, message):
    result = stack.validate_config(rendered(tmp_path, overrides))
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
