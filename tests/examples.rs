//! Every plugin config shipped in `examples/` parses and compiles, so documentation can never
//! drift from what the filter accepts.

use std::fs;
use std::path::Path;

use ma_gateway::config::Plan;

#[test]
fn every_example_plugin_config_compiles() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut parsed = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        // Plugin configs only: the JSON Schema of them sits beside them.
        if path.extension().and_then(|e| e.to_str()) != Some("json")
            || path.to_string_lossy().ends_with(".schema.json")
        {
            continue;
        }
        let bytes = fs::read(&path).unwrap();
        if let Err(err) = Plan::from_json(&bytes) {
            panic!("{}: {err}", path.display());
        }
        parsed += 1;
    }
    assert!(
        parsed >= 2,
        "expected the example configs in {}, parsed {parsed}",
        dir.display()
    );
}

#[test]
fn full_example_enables_every_neighbour_and_two_tenants() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/plugin-config.json");
    let plan = Plan::from_json(&fs::read(path).unwrap()).unwrap();
    assert_eq!(plan.routes.neighbours.len(), 4);
    let tenants: Vec<&str> = plan
        .gateway_keys
        .iter()
        .map(|k| k.tenant.as_str())
        .collect();
    assert_eq!(tenants, ["platform", "research"]);
    assert_eq!(plan.tenant_credential("research"), "research-workspace");
    assert!(plan.isolation.enabled);
    assert!(plan.jwt.is_some());
    assert_eq!(plan.credentials.len(), 2);
}

/// The plugin JSON of every `google.protobuf.StringValue` `value: |` block in a YAML file, in
/// order (the same text extraction as tests/config_schema.rs; no YAML parser needed).
#[allow(clippy::unwrap_used, clippy::panic)] // a test helper: failing loudly is its job
fn plugin_string_values(relative: &str) -> Vec<serde_json::Value> {
    let text = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let indent = |line: &str| line.len() - line.trim_start().len();
    let mut values = Vec::new();
    for i in 1..lines.len() {
        if lines[i].trim() != "value: |" || !lines[i - 1].contains("google.protobuf.StringValue") {
            continue;
        }
        let block: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|next| next.trim().is_empty() || indent(next) > indent(lines[i]))
            .copied()
            .collect();
        let json = block.join("\n");
        if let Err(err) = Plan::from_json(json.as_bytes()) {
            panic!("{relative}: {err}");
        }
        values.push(serde_json::from_str(&json).unwrap());
    }
    values
}

/// The ECDS example (`examples/ecds/ma_gateway.yaml`, served to the filter of
/// `examples/dynamic-ecds.envoy.yaml`) ships envoy.yaml's plugin config, for the filter and for
/// the reconciler alike (tests/e2e/test_config_reload.py compares the whole Envoy configs).
#[test]
fn ecds_example_ships_the_envoy_yaml_plugin_config() {
    let shipped = plugin_string_values("envoy.yaml");
    assert_eq!(shipped.len(), 1, "envoy.yaml: one StringValue (anchored)");
    assert_eq!(
        plugin_string_values("examples/ecds/ma_gateway.yaml"),
        shipped,
        "examples/ecds/ma_gateway.yaml"
    );
    assert_eq!(
        plugin_string_values("examples/dynamic-ecds.envoy.yaml"),
        shipped,
        "examples/dynamic-ecds.envoy.yaml (reconciler)"
    );
}
