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
