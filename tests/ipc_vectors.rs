//! The shared IPC test vectors (`tests/ipc_vectors.json`): the Rust codec must
//! produce and accept exactly these bytes. `tests/python/test_worker_codec.py`
//! checks the Python codec against the same file.
//!
//! Regenerate after a deliberate protocol change:
//! `cargo test --test ipc_vectors -- --ignored regenerate`

use std::collections::BTreeSet;

use dcsupervisor::ipc::{
    decode_payload, encode_payload, CommandInfo, Event, ExitStatus, ForkHazard, GivenArg, HazardKind,
    JobLimits, LogLevel, ParseOutcome, Request, PROTOCOL_VERSION,
};
use serde_json::{json, Value};

const VECTORS_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ipc_vectors.json");

enum Message {
    Request(Request),
    Event(Event),
}

fn cases() -> Vec<(&'static str, Message)> {
    use Message::{Event as E, Request as R};
    vec![
        ("discover", R(Request::Discover)),
        (
            "run_with_args",
            R(Request::Run {
                job: 7,
                command: "migrate".into(),
                args: vec!["--plan".into(), "app label with spaces".into()],
                limits: JobLimits { cpu_seconds: 60, address_space_bytes: 1 << 30, nice: 10 },
            }),
        ),
        (
            "run_no_args",
            R(Request::Run {
                job: u64::MAX,
                command: "noop".into(),
                args: vec![],
                limits: JobLimits::default(),
            }),
        ),
        ("signal_term", R(Request::Signal { job: 1, signal: 15 })),
        ("shutdown", R(Request::Shutdown)),
        (
            "parse_args",
            R(Request::ParseArgs {
                request: 3,
                command: "migrate".into(),
                args: vec!["--datab=other".into(), "demo".into(), "zero".into()],
            }),
        ),
        (
            "parse_args_none",
            R(Request::ParseArgs { request: u64::MAX, command: "noop".into(), args: vec![] }),
        ),
        (
            "read_settings",
            R(Request::ReadSettings {
                request: 4,
                names: vec!["SECRET_KEY".into(), "DATABASES.*.PASSWORD".into()],
            }),
        ),
        ("setting_values", E(Event::SettingValues { request: 4, values: vec!["s3cr3t-✓".into()] })),
        ("inspect_fork", R(Request::InspectFork { request: 5 })),
        (
            "fork_hazards",
            E(Event::ForkHazards {
                request: 5,
                hazards: vec![
                    ForkHazard { kind: HazardKind::Socket, detail: "fd 7: socket".into() },
                    ForkHazard { kind: HazardKind::SharedRandom, detail: "apm.rng ✓".into() },
                ],
            }),
        ),
        (
            "hello",
            E(Event::Hello {
                protocol: PROTOCOL_VERSION,
                pid: 4242,
                python_version: "3.11.7".into(),
                django_version: "5.2.19".into(),
            }),
        ),
        (
            "startup_failed",
            E(Event::StartupFailed {
                protocol: PROTOCOL_VERSION,
                error: "Traceback (most recent call last):\n  ModuleNotFoundError: No module named 'x'\n"
                    .into(),
            }),
        ),
        (
            "commands",
            E(Event::Commands {
                commands: vec![
                    CommandInfo {
                        name: "migrate".into(),
                        app_label: "django.core".into(),
                        help_text: "usage: manage.py migrate\n".into(),
                    },
                    CommandInfo {
                        name: "héllo_✓".into(),
                        app_label: "demo".into(),
                        help_text: String::new(),
                    },
                ],
            }),
        ),
        ("commands_empty", E(Event::Commands { commands: vec![] })),
        ("job_started", E(Event::JobStarted { job: 7, pid: 31337 })),
        ("job_failed", E(Event::JobFailed { job: 8, error: "fork failed".into() })),
        ("job_exited_code", E(Event::JobExited { job: 7, status: ExitStatus::Code { code: -1 } })),
        ("job_exited_signal", E(Event::JobExited { job: 9, status: ExitStatus::Signal { signal: 11 } })),
        ("log_debug", E(Event::Log { level: LogLevel::Debug, message: "d".into() })),
        ("log_info", E(Event::Log { level: LogLevel::Info, message: "i".into() })),
        ("log_warning", E(Event::Log { level: LogLevel::Warning, message: "threads alive at fork".into() })),
        ("log_error", E(Event::Log { level: LogLevel::Error, message: "e".into() })),
        (
            "parsed_args",
            E(Event::ParsedArgs {
                request: 3,
                result: ParseOutcome::Parsed {
                    given: vec![
                        GivenArg {
                            dest: "database".into(),
                            flags: vec!["--database".into()],
                            values: vec!["other".into()],
                        },
                        GivenArg { dest: "plan".into(), flags: vec!["--plan".into()], values: vec![] },
                        GivenArg { dest: "app_label".into(), flags: vec![], values: vec!["demo".into()] },
                    ],
                },
            }),
        ),
        (
            "parsed_args_none",
            E(Event::ParsedArgs { request: 4, result: ParseOutcome::Parsed { given: vec![] } }),
        ),
        (
            "parsed_args_refused",
            E(Event::ParsedArgs {
                request: 5,
                result: ParseOutcome::Refused {
                    message: "Error: argument --lines: invalid int value: 'x'".into(),
                },
            }),
        ),
    ]
}

fn to_vector(name: &str, message: &Message) -> Value {
    let (kind, value, payload) = match message {
        Message::Request(r) => ("Request", serde_json::to_value(r).unwrap(), encode_payload(r).unwrap()),
        Message::Event(e) => ("Event", serde_json::to_value(e).unwrap(), encode_payload(e).unwrap()),
    };
    json!({"name": name, "type": kind, "value": value, "hex": hex(&payload)})
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

fn load_vectors() -> Vec<Value> {
    let text = std::fs::read_to_string(VECTORS_PATH).expect("tests/ipc_vectors.json is readable");
    let root: Value = serde_json::from_str(&text).expect("vectors file is JSON");
    root["vectors"].as_array().expect("a `vectors` array").clone()
}

#[test]
fn rust_codec_matches_every_shared_vector() {
    let vectors = load_vectors();
    assert!(!vectors.is_empty());
    for vector in &vectors {
        let name = vector["name"].as_str().unwrap();
        let bytes = unhex(vector["hex"].as_str().unwrap());
        let value = vector["value"].clone();
        match vector["type"].as_str().unwrap() {
            "Request" => {
                let expected: Request = serde_json::from_value(value).unwrap();
                assert_eq!(hex(&encode_payload(&expected).unwrap()), hex(&bytes), "encoding {name}");
                assert_eq!(decode_payload::<Request>(&bytes).unwrap(), expected, "decoding {name}");
            }
            "Event" => {
                let expected: Event = serde_json::from_value(value).unwrap();
                assert_eq!(hex(&encode_payload(&expected).unwrap()), hex(&bytes), "encoding {name}");
                assert_eq!(decode_payload::<Event>(&bytes).unwrap(), expected, "decoding {name}");
            }
            other => panic!("vector {name} has unknown type {other}"),
        }
    }
}

#[test]
fn vectors_file_is_up_to_date_and_covers_every_variant() {
    let expected: Vec<Value> = cases().iter().map(|(name, m)| to_vector(name, m)).collect();
    assert_eq!(
        load_vectors(),
        expected,
        "regenerate with: cargo test --test ipc_vectors -- --ignored regenerate"
    );
    let variants: BTreeSet<String> = expected
        .iter()
        .map(|v| match &v["value"] {
            Value::String(unit) => unit.clone(),
            Value::Object(tagged) => tagged.keys().next().unwrap().clone(),
            other => panic!("unexpected shape {other}"),
        })
        .collect();
    let all = [
        "Discover",
        "Run",
        "Signal",
        "Shutdown",
        "ParseArgs",
        "Hello",
        "StartupFailed",
        "Commands",
        "JobStarted",
        "JobFailed",
        "JobExited",
        "Log",
        "ParsedArgs",
        "ReadSettings",
        "SettingValues",
        "InspectFork",
        "ForkHazards",
    ];
    for variant in all {
        assert!(variants.contains(variant), "no vector for {variant}");
    }
}

#[test]
#[ignore = "writes tests/ipc_vectors.json"]
fn regenerate() {
    let vectors: Vec<Value> = cases().iter().map(|(name, m)| to_vector(name, m)).collect();
    let text = serde_json::to_string_pretty(&json!({ "vectors": vectors })).unwrap();
    std::fs::write(VECTORS_PATH, text + "\n").unwrap();
}
