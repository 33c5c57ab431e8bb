//! The shared policy vectors (`tests/policy_vectors.json`): every settings
//! variant of the seed README, as the `[policy]` table the Python package
//! generates, must give the supervisor exactly the answers that
//! `djangocommand.is_command_allowed` gives (`tests/python/test_package.py`
//! checks the Python side against the same file).

use std::collections::BTreeMap;

use dcsupervisor::config::PolicyConfig;
use serde::Deserialize;

#[derive(Deserialize)]
struct Vectors {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    policy: serde_json::Value,
    expect: BTreeMap<String, (bool, String)>,
}

#[test]
fn the_supervisor_agrees_with_is_command_allowed_on_every_case() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/policy_vectors.json")).unwrap();
    let vectors: Vectors = serde_json::from_str(&text).unwrap();
    assert!(vectors.cases.len() >= 8, "the seed's variants are all there");
    for case in vectors.cases {
        let config: PolicyConfig = serde_json::from_value(case.policy.clone())
            .unwrap_or_else(|e| panic!("case {}: {e}: {}", case.name, case.policy));
        let policy = config.build();
        for (command, (allowed, reason)) in &case.expect {
            match policy.check(command) {
                Ok(()) => assert!(*allowed && reason.is_empty(), "case {}: {command} allowed", case.name),
                Err(refusal) => {
                    assert!(!allowed, "case {}: {command} refused ({refusal})", case.name);
                    assert_eq!(&refusal.to_string(), reason, "case {}: {command}", case.name);
                }
            }
        }
    }
}
