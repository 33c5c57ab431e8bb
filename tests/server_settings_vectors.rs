//! The shared server-settings vectors (`tests/server_settings_vectors.json`):
//! `[server]` in dc.toml must be accepted or refused exactly as
//! `djangocommand.conf` accepts or refuses the same `DJANGOCOMMAND_*`
//! settings (`tests/python/test_server_settings_vectors.py` checks the
//! Python side against the same file), naming the same field.

use dcsupervisor::config::{ConfigError, ServerConfig};
use serde::Deserialize;

#[derive(Deserialize)]
struct Vectors {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    server: serde_json::Value,
    valid: bool,
    field: Option<String>,
}

/// `Ok` or the field the refusal names (`None` when the value does not even
/// have the field's type).
fn verdict(server: &serde_json::Value) -> Result<(), Option<String>> {
    let config: ServerConfig = serde_json::from_value(server.clone()).map_err(|_| None)?;
    let checked = config.settings().and_then(|_| config.validate_numbers());
    checked.map_err(|error| match error {
        ConfigError::Invalid { field, .. } => Some(field.to_string()),
        ConfigError::Load { .. } => None,
    })
}

#[test]
fn the_supervisor_agrees_with_the_python_package_on_every_case() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/server_settings_vectors.json"))
            .unwrap();
    let vectors: Vectors = serde_json::from_str(&text).unwrap();
    for case in vectors.cases {
        match (verdict(&case.server), case.valid) {
            (Ok(()), true) => {}
            (Ok(()), false) => panic!("case {:?}: accepted, should be refused", case.name),
            (Err(field), true) => panic!("case {:?}: refused ({field:?}), should be accepted", case.name),
            (Err(None), false) => {
                let field = case.field.as_deref().unwrap_or_default();
                let value = case.server.get(field.trim_start_matches("server.")).unwrap();
                assert!(
                    !value.is_u64(),
                    "case {:?}: a type error, yet {value} has the right type",
                    case.name
                );
            }
            (Err(Some(field)), false) => assert_eq!(Some(field), case.field, "case {:?}", case.name),
        }
    }
}
