//! Signed executions (issue 6, `[policy.signing]`), end to end: a real
//! `dccontrol serve --signing-key` and a real `dcsupervisor` pinning its
//! public key. What a hostile or stale control plane would try: tampered
//! arguments, an old (or future) issue time signed with the right key, an
//! unsigned execution, and replaying a signed one, also after a restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use common::plane::{chunks, output, status_and_code, ControlPlane, Supervisor, LIMIT};
use dcsupervisor::local_plane::wire::{ExecutionDetail, NewExecution};
use dcsupervisor::protocol::api::ExecutionId;
use ed25519_dalek::{Signer as _, SigningKey};
use serde_json::{json, Value};

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// `dccontrol keygen`: the key file and the printed public key.
fn keygen(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("signing.key");
    let out = Command::new(env!("CARGO_BIN_EXE_dccontrol")).arg("keygen").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (path, String::from_utf8(out.stdout).unwrap().trim().to_string())
}

fn signing_policy(public_key: &str) -> String {
    format!("[policy.signing]\npublic_key = {public_key:?}\nmax_age = 300\n")
}

/// Signs the way docs/protocol.md says, independently of the runner's code:
/// compact JSON with sorted keys, over the fields as the runner reads them.
fn sign_by_hand(key_file: &Path, id: &str, command: &str, issued_at: i64) -> String {
    let seed = BASE64.decode(std::fs::read_to_string(key_file).unwrap().trim()).unwrap();
    let key = SigningKey::from_bytes(&seed.try_into().unwrap());
    let message = format!(
        "{{\"args\":\"\",\"command\":{},\"id\":{},\"issued_at\":{issued_at},\"timeout\":300,\"use_metadata_only_mode\":false}}",
        Value::from(command),
        Value::from(id),
    );
    BASE64.encode(key.sign(message.as_bytes()).to_bytes())
}

/// `command` (no arguments) whose `/pending/` entry has `overrides`
/// replaced after signing, and the id to queue it under if given.
fn overridden(command: &str, args: &str, id: Option<&ExecutionId>, overrides: Value) -> NewExecution {
    let Value::Object(overrides) = overrides else { panic!("overrides are a JSON object") };
    NewExecution { id: id.cloned(), pending_overrides: Some(overrides), ..NewExecution::new(command, args) }
}

/// An execution the plane queues under `id`, handed out with `issued_at`
/// and a signature made by hand with `key_file`.
fn signed_by_hand(key_file: &Path, command: &str, issued_at: i64) -> NewExecution {
    let id = ExecutionId::parse(&uuid::Uuid::new_v4().to_string()).unwrap();
    let signature = sign_by_hand(key_file, id.as_str(), command, issued_at);
    overridden(command, "", Some(&id), json!({"issued_at": issued_at, "signature": signature}))
}

async fn refused_because(plane: &ControlPlane, request: NewExecution, reason: &str) -> ExecutionDetail {
    let execution = plane.wait_done(&plane.queue_with(request).await, LIMIT).await;
    assert_eq!(status_and_code(&execution), ("failed", -1), "{execution:#?}");
    let stderr = output(&execution, true);
    assert!(stderr.contains(reason), "expected {reason:?} in:\n{stderr}");
    assert!(stderr.contains("[policy.signing]"), "{stderr}");
    assert_eq!(output(&execution, false), "", "it did not run");
    execution
}

fn occurrences(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_executions_signed_by_the_pinned_key_within_the_window_run() {
    let keys = tempfile::tempdir().unwrap();
    let (key_file, public_key) = keygen(keys.path());
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let plane = ControlPlane::start_signed(&key_file);
    let _runner = Supervisor::start(&plane.url, &signing_policy(&public_key), "");

    let valid = plane.wait_done(&plane.queue("say", "'signed and sound\\n'").await, LIMIT).await;
    assert_eq!(status_and_code(&valid), ("success", 0));
    assert_eq!(output(&valid, false), "signed and sound\n");

    // The control plane (or something on the way) changes the arguments after signing.
    let tampered = overridden("say", "'as signed\\n'", None, json!({"args": "'tampered\\n'"}));
    refused_because(&plane, tampered, "signature does not verify").await;

    // Properly signed with the right key, but issued too long ago, or ahead of the clock.
    let stale = signed_by_hand(&key_file, "noop", unix_now() - 412);
    refused_because(&plane, stale, "s ago, outside the 300 s window").await;
    let future = signed_by_hand(&key_file, "noop", unix_now() + 3600);
    refused_because(&plane, future, "s in the future").await;

    // The same hand-made signature with a current issue time is accepted:
    // the documented message is the one the runner checks.
    let fresh = signed_by_hand(&key_file, "noop", unix_now());
    let fresh = plane.wait_done(&plane.queue_with(fresh).await, LIMIT).await;
    assert_eq!(status_and_code(&fresh), ("success", 0), "{fresh:#?}");

    // Signature (and issue time) stripped.
    let stripped = overridden("noop", "", None, json!({"signature": null, "issued_at": null}));
    refused_because(&plane, stripped, "signature missing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_execution_is_refused_also_after_a_restart() {
    let keys = tempfile::tempdir().unwrap();
    let (key_file, public_key) = keygen(keys.path());
    let plane = ControlPlane::start_signed(&key_file);
    let mut runner = Supervisor::start(&plane.url, &signing_policy(&public_key), "");

    let id = plane.queue("noop", "").await;
    let original = plane.wait_done(&id, LIMIT).await;
    assert_eq!(status_and_code(&original), ("success", 0));
    let entry = plane.signed_entry(&id).await;
    assert!(entry["signature"].is_string() && entry["issued_at"].is_i64(), "{entry}");

    // The same signed entry, handed out again.
    plane.inject_pending(vec![entry.clone()]).await.unwrap();
    runner.wait_for_log("already seen (replay)", LIMIT).await;

    // After a restart, the id is still remembered (state_dir/signing-seen.jsonl).
    assert_eq!(runner.terminate(LIMIT).await, Some(0));
    let seen = std::fs::read_to_string(runner.dir.path().join(".dcsupervisor/signing-seen.jsonl")).unwrap();
    assert!(seen.contains(id.as_str()), "{seen}");
    runner.restart();
    let after_restart = plane.queue("noop", "").await;
    assert_eq!(status_and_code(&plane.wait_done(&after_restart, LIMIT).await).0, "success");
    plane.inject_pending(vec![entry]).await.unwrap();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while occurrences(&runner.log(), "already seen (replay)") < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the replay was not refused:\n{}", runner.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Neither replay ran: the execution is as it was.
    let now = plane.execution(&id).await;
    assert_eq!(now.summary.completed_at, original.summary.completed_at);
    assert_eq!(chunks(&now), chunks(&original));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_executions_run_only_without_policy_signing() {
    let keys = tempfile::tempdir().unwrap();
    let (_, public_key) = keygen(keys.path());
    let unsigned_plane = ControlPlane::start();
    let _strict = Supervisor::start(&unsigned_plane.url, &signing_policy(&public_key), "");
    refused_because(&unsigned_plane, NewExecution::new("noop", ""), "signature missing").await;

    let plane = ControlPlane::start();
    let _plain = Supervisor::start(&plane.url, "", "");
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_public_key_stops_the_start_naming_the_field_and_the_fix() {
    let keys = tempfile::tempdir().unwrap();
    let (key_file, _) = keygen(keys.path());
    // keygen never replaces a key.
    let again = Command::new(env!("CARGO_BIN_EXE_dccontrol")).arg("keygen").arg(&key_file).output().unwrap();
    assert!(!again.status.success());

    let plane = ControlPlane::start();
    let mut off_curve = [0u8; 32];
    off_curve[0] = 2; // y = 2 has no x on the curve
    for (key, problem) in [
        ("not base64!", "not base64"),
        (&BASE64.encode([1u8; 31])[..], "decodes to 31 bytes instead of 32"),
        (&BASE64.encode(off_curve)[..], "not a valid Ed25519 public key"),
    ] {
        let mut runner = Supervisor::start(&plane.url, &signing_policy(key), "");
        assert_eq!(runner.wait_exit(LIMIT).await, Some(1), "{}", runner.log());
        let log = runner.log();
        assert!(log.contains("policy.signing.public_key") && log.contains(problem), "{log}");
        assert!(log.contains("32-byte Ed25519 public key"), "the fix: {log}");
    }
}
