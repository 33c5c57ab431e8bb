//! Signed executions (`[policy.signing]`, opt-in). With a pinned Ed25519
//! public key, an execution runs only if it carries a signature that key
//! made over its canonical message (id, command, args, timeout, metadata-only
//! flag and issue time), was issued within the window, and its id was never
//! accepted before. Accepted ids are kept in the state directory
//! ([`SEEN_FILE`]) for as long as they could still pass the window, so a
//! replay is refused after a restart too. docs/protocol.md ("Signed
//! executions") describes the format for control planes.
//!
//! The message format, the signing side and the key encodings are
//! `protocol::signed`, shared with `dccontrol`.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::{Rejection, Rule};
use crate::protocol::api::{Execution, ExecutionId};
use crate::protocol::signed::message;
use crate::sync::LockExt as _;

/// Seconds an issue time may lie ahead of this host's clock (clock skew).
pub const MAX_CLOCK_SKEW: i64 = 60;
/// Default of `policy.signing.max_age`, in seconds.
pub const DEFAULT_MAX_AGE: u64 = 300;
/// The accepted ids, one JSON object a line, in the state directory.
pub const SEEN_FILE: &str = "signing-seen.jsonl";

/// Why a signed execution was refused; the text names the check that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureRefusal {
    #[error("signature missing (this runner only runs signed executions)")]
    Missing,
    #[error("signed, but the issue time (issued_at) is missing")]
    NoIssueTime,
    #[error("signature does not verify: not the base64 of a 64-byte Ed25519 signature")]
    Malformed,
    #[error("signature does not verify against the public key pinned in policy.signing.public_key")]
    Invalid,
    #[error("issued {age} s ago, outside the {max_age} s window")]
    Expired { age: i64, max_age: i64 },
    #[error("issued {ahead} s in the future, beyond the {MAX_CLOCK_SKEW} s allowed clock skew")]
    FromTheFuture { ahead: i64 },
    #[error("already seen (replay): an execution with this id was accepted before")]
    Replay,
    #[error("its id could not be recorded against replays: {0}")]
    Unrecorded(String),
}

/// The checks of `[policy.signing]`.
#[derive(Debug)]
pub struct Signing {
    key: VerifyingKey,
    max_age: i64,
    seen: Arc<SeenIds>,
}

impl Signing {
    /// `state_dir` holds the accepted ids (read on first use).
    pub fn new(key: VerifyingKey, max_age: u64, state_dir: &Path) -> Self {
        Self {
            key,
            max_age: max_age.min(i64::MAX as u64) as i64,
            seen: SeenIds::for_file(&state_dir.join(SEEN_FILE)),
        }
    }

    /// Accepts the execution, recording its id, or says which check failed.
    /// `now` is unix seconds.
    pub fn accept(&self, execution: &Execution, now: i64) -> Result<(), SignatureRefusal> {
        let signature = execution.signature.as_deref().ok_or(SignatureRefusal::Missing)?;
        let issued_at = execution.issued_at.ok_or(SignatureRefusal::NoIssueTime)?;
        let signature = BASE64
            .decode(signature.trim())
            .ok()
            .and_then(|bytes| Signature::from_slice(&bytes).ok())
            .ok_or(SignatureRefusal::Malformed)?;
        self.key
            .verify_strict(&message(execution, issued_at), &signature)
            .map_err(|_| SignatureRefusal::Invalid)?;
        if issued_at < now.saturating_sub(self.max_age) {
            return Err(SignatureRefusal::Expired {
                age: now.saturating_sub(issued_at),
                max_age: self.max_age,
            });
        }
        if issued_at > now.saturating_add(MAX_CLOCK_SKEW) {
            return Err(SignatureRefusal::FromTheFuture { ahead: issued_at.saturating_sub(now) });
        }
        self.seen.claim(&execution.id, issued_at, now.saturating_sub(self.max_age))
    }

    /// Forgets an accepted id: the execution could not be started, so the
    /// control plane still has it queued and will hand it out again.
    pub fn forget(&self, id: &ExecutionId) {
        self.seen.forget(id);
    }

    /// The refusal, with what this runner requires.
    pub fn rejection(&self, refusal: &SignatureRefusal) -> Rejection {
        let hint = format!(
            "This runner only runs executions signed by the control plane's key pinned in \
             [policy.signing] of dc.toml, issued at most {} s earlier, and each one once.\n",
            self.max_age
        );
        Rejection::new(Rule::Signature, refusal.to_string(), hint)
    }
}

/// One line of [`SEEN_FILE`].
#[derive(Serialize, Deserialize)]
struct SeenLine {
    id: String,
    issued_at: i64,
}

/// The accepted ids (lowercased) and their issue times, in memory and in a
/// file. One per file and process, so a reload (which builds new settings)
/// keeps the ids accepted before it.
#[derive(Debug)]
struct SeenIds {
    path: PathBuf,
    /// `None` until the first use loads the file.
    state: Mutex<Option<SeenState>>,
}

#[derive(Debug, Default)]
struct SeenState {
    ids: HashMap<String, i64>,
    /// Lines in the file: rewritten without the old ones when it doubles.
    lines: usize,
}

impl SeenIds {
    fn for_file(path: &Path) -> Arc<SeenIds> {
        static OPEN: Mutex<BTreeMap<PathBuf, Arc<SeenIds>>> = Mutex::new(BTreeMap::new());
        let mut open = OPEN.locked();
        let seen = open
            .entry(path.to_path_buf())
            .or_insert_with(|| Arc::new(SeenIds { path: path.to_path_buf(), state: Mutex::new(None) }));
        Arc::clone(seen)
    }

    /// Records `id` unless it was seen; ids issued before `oldest` can no
    /// longer pass the window and are forgotten.
    fn claim(&self, id: &ExecutionId, issued_at: i64, oldest: i64) -> Result<(), SignatureRefusal> {
        let unrecorded =
            |error: std::io::Error| SignatureRefusal::Unrecorded(format!("{}: {error}", self.path.display()));
        let mut guard = self.state.locked();
        let state = match &mut *guard {
            Some(state) => state,
            None => guard.insert(self.load(oldest).map_err(unrecorded)?),
        };
        let key = id.as_str().to_ascii_lowercase();
        if state.ids.contains_key(&key) {
            return Err(SignatureRefusal::Replay);
        }
        state.ids.retain(|_, issued| *issued >= oldest);
        let line = SeenLine { id: key.clone(), issued_at };
        self.append(&line).map_err(unrecorded)?;
        state.ids.insert(key, issued_at);
        state.lines += 1;
        if state.lines > 2 * state.ids.len() + 64 {
            match self.rewrite(&state.ids) {
                Ok(()) => state.lines = state.ids.len(),
                Err(error) => tracing::warn!("cannot prune {}: {error}", self.path.display()),
            }
        }
        Ok(())
    }

    fn forget(&self, id: &ExecutionId) {
        let mut guard = self.state.locked();
        if let Some(state) = &mut *guard {
            if state.ids.remove(&id.as_str().to_ascii_lowercase()).is_some() {
                match self.rewrite(&state.ids) {
                    Ok(()) => state.lines = state.ids.len(),
                    Err(error) => tracing::warn!("cannot rewrite {}: {error}", self.path.display()),
                }
            }
        }
    }

    /// The ids of the file still inside the window; the file is rewritten
    /// with only those.
    fn load(&self, oldest: i64) -> std::io::Result<SeenState> {
        // Bytes, not text: a byte of garbage (a crash, a full disk) spoils
        // its own line only, not the whole file, which would otherwise refuse
        // every signed execution until someone removed it.
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(error) => return Err(error),
        };
        let ids: HashMap<String, i64> = bytes
            .split(|byte| *byte == b'\n')
            .filter_map(|line| serde_json::from_slice::<SeenLine>(line).ok())
            .filter(|line| line.issued_at >= oldest)
            .map(|line| (line.id.to_ascii_lowercase(), line.issued_at))
            .collect();
        self.rewrite(&ids)?;
        Ok(SeenState { lines: ids.len(), ids })
    }

    fn append(&self, line: &SeenLine) -> std::io::Result<()> {
        let mut text = serde_json::to_string(line).map_err(std::io::Error::other)?;
        text.push('\n');
        let mut file =
            OpenOptions::new().create(true).read(true).append(true).mode(0o600).open(&self.path)?;
        // One write of a short line, but a full disk (or a crash) can still
        // cut one short: the next line must not be glued to it, or that id
        // would be unreadable after a restart and its replay accepted.
        if ends_inside_a_line(&file)? {
            text.insert(0, '\n');
        }
        file.write_all(text.as_bytes())
    }

    /// Replaces the file (through a temporary one and a rename).
    fn rewrite(&self, ids: &HashMap<String, i64>) -> std::io::Result<()> {
        let mut text = String::new();
        for (id, issued_at) in ids {
            let line = SeenLine { id: id.clone(), issued_at: *issued_at };
            text.push_str(&serde_json::to_string(&line).map_err(std::io::Error::other)?);
            text.push('\n');
        }
        let temporary = self.path.with_extension("jsonl.tmp");
        let mut file =
            OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&temporary)?;
        file.write_all(text.as_bytes())?;
        std::fs::rename(&temporary, &self.path)
    }
}

/// Whether the file's last byte is not a newline (a line was cut short).
fn ends_inside_a_line(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt as _;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(false);
    }
    let mut last = [0u8];
    file.read_exact_at(&mut last, len - 1)?;
    Ok(last[0] != b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::signed::sign;
    use ed25519_dalek::SigningKey;
    use proptest::strategy::Strategy as _;

    const ID: &str = "3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b";
    const NOW: i64 = 1_750_000_000;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn execution(args: &str) -> Execution {
        serde_json::from_value(serde_json::json!({"id": ID, "command": "migrate", "args": args})).unwrap()
    }

    fn signed(args: &str, issued_at: i64) -> Execution {
        let mut execution = execution(args);
        execution.issued_at = Some(issued_at);
        execution.signature = Some(sign(&key(), &execution, issued_at));
        execution
    }

    fn signing(dir: &Path) -> Signing {
        Signing::new(key().verifying_key(), 300, dir)
    }

    #[test]
    fn a_signature_covers_every_signed_field() {
        let dir = tempfile::tempdir().unwrap();
        let good = signed("--plan", NOW);
        let tampered: [fn(&mut Execution); 6] = [
            |e| e.args.push_str(" --fake"),
            |e| e.command = "flush".into(),
            |e| e.id = ExecutionId::parse(&ID.to_ascii_uppercase()).unwrap(),
            |e| e.timeout += 1,
            |e| e.use_metadata_only_mode = true,
            |e| e.issued_at = Some(NOW + 1),
        ];
        for change in tampered {
            let mut execution = good.clone();
            change(&mut execution);
            assert_eq!(signing(dir.path()).accept(&execution, NOW), Err(SignatureRefusal::Invalid));
        }
        let mut unsigned = good.clone();
        unsigned.signature = None;
        assert_eq!(signing(dir.path()).accept(&unsigned, NOW), Err(SignatureRefusal::Missing));
        let mut garbled = good.clone();
        garbled.signature = Some("not base64!".into());
        assert_eq!(signing(dir.path()).accept(&garbled, NOW), Err(SignatureRefusal::Malformed));
        let other = Signing::new(SigningKey::from_bytes(&[8u8; 32]).verifying_key(), 300, dir.path());
        assert_eq!(other.accept(&good, NOW), Err(SignatureRefusal::Invalid));
        assert_eq!(signing(dir.path()).accept(&good, NOW), Ok(()));
    }

    #[test]
    fn the_issue_time_must_be_in_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let signing = signing(dir.path());
        assert_eq!(
            signing.accept(&signed("", NOW - 412), NOW),
            Err(SignatureRefusal::Expired { age: 412, max_age: 300 })
        );
        assert_eq!(
            signing.accept(&signed("", NOW - 412), NOW).unwrap_err().to_string(),
            "issued 412 s ago, outside the 300 s window"
        );
        assert_eq!(
            signing.accept(&signed("", NOW + 61), NOW),
            Err(SignatureRefusal::FromTheFuture { ahead: 61 })
        );
        assert_eq!(signing.accept(&signed("", NOW + 60), NOW), Ok(()));
    }

    #[test]
    fn an_id_is_accepted_once_even_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let execution = signed("", NOW);
        assert_eq!(signing(dir.path()).accept(&execution, NOW), Ok(()));
        assert_eq!(signing(dir.path()).accept(&execution, NOW + 1), Err(SignatureRefusal::Replay));
        // A new process: what the file says.
        let fresh = SeenIds { path: dir.path().join(SEEN_FILE), state: Mutex::new(None) };
        assert_eq!(fresh.claim(&execution.id, NOW, NOW - 300), Err(SignatureRefusal::Replay));
        // Once outside the window it is forgotten (the window refuses it anyway).
        let later = SeenIds { path: dir.path().join(SEEN_FILE), state: Mutex::new(None) };
        assert_eq!(later.claim(&execution.id, NOW, NOW + 1), Ok(()));
        // An execution that could not be started may come back.
        let signing = signing(dir.path());
        let other = signed("--other", NOW);
        let other =
            Execution { id: ExecutionId::parse("00000000-0000-4000-8000-000000000000").unwrap(), ..other };
        let other = Execution { signature: Some(sign(&key(), &other, NOW)), ..other };
        assert_eq!(signing.accept(&other, NOW), Ok(()));
        signing.forget(&other.id);
        assert_eq!(signing.accept(&other, NOW), Ok(()));
    }

    /// Failed before the fix: an append that a full disk cut short glued
    /// the next id's line to it, and that id was lost at the next start.
    #[test]
    fn a_line_cut_short_does_not_swallow_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let seen = || SeenIds { path: dir.path().join(SEEN_FILE), state: Mutex::new(None) };
        let first = signed("", NOW);
        let running = seen();
        assert_eq!(running.claim(&first.id, NOW, NOW - 300), Ok(()));
        // A write the disk cut short, while the runner goes on.
        let mut file = OpenOptions::new().append(true).open(dir.path().join(SEEN_FILE)).unwrap();
        file.write_all(br#"{"id":"00000000-0000-4000-8000-0000"#).unwrap();
        let second = ExecutionId::parse("3f2b8c1e-0a4d-4e5f-9b6a-000000000002").unwrap();
        assert_eq!(running.claim(&second, NOW, NOW - 300), Ok(()));
        // After a restart both ids are still known.
        let restarted = seen();
        assert_eq!(restarted.claim(&first.id, NOW, NOW - 300), Err(SignatureRefusal::Replay));
        assert_eq!(restarted.claim(&second, NOW, NOW - 300), Err(SignatureRefusal::Replay));
    }

    /// Failed before the fix: one byte of invalid UTF-8 made the whole
    /// file unreadable, and every signed execution was refused
    /// ("its id could not be recorded") until someone removed it.
    #[test]
    fn a_garbled_byte_spoils_its_line_only() {
        let dir = tempfile::tempdir().unwrap();
        let line = serde_json::json!({"id": ID, "issued_at": NOW}).to_string();
        std::fs::write(
            dir.path().join(SEEN_FILE),
            format!("{line}\n\u{0}\u{0}").into_bytes().into_iter().chain([0x80, b'\n']).collect::<Vec<u8>>(),
        )
        .unwrap();
        let signing = signing(dir.path());
        assert_eq!(
            signing.accept(&signed("", NOW), NOW),
            Err(SignatureRefusal::Replay),
            "the good line counts"
        );
        let other = signed("--other", NOW);
        let other =
            Execution { id: ExecutionId::parse("00000000-0000-4000-8000-000000000000").unwrap(), ..other };
        let other = Execution { signature: Some(sign(&key(), &other, NOW)), ..other };
        assert_eq!(signing.accept(&other, NOW), Ok(()));
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(128))]

        /// signing-seen.jsonl of any content (a torn append, tampering):
        /// the lines that parse count, the rest are dropped; never a panic,
        /// and an id found in it is still refused as a replay.
        #[test]
        fn any_seen_file_is_read(
            lines in proptest::collection::vec(
                proptest::prop_oneof![
                    ".{0,40}",
                    (".{0,40}", proptest::prelude::any::<i64>())
                        .prop_map(|(id, issued_at)| serde_json::json!({"id": id, "issued_at": issued_at}).to_string()),
                    proptest::prelude::any::<i64>()
                        .prop_map(|issued_at| serde_json::json!({"id": ID, "issued_at": issued_at}).to_string()),
                    crate::proptest_support::json_value().prop_map(|value| value.to_string()),
                ],
                0..6,
            ),
            torn_tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..12),
            now in proptest::prop_oneof![proptest::prelude::any::<i64>(), proptest::strategy::Just(NOW)],
        ) {
            let dir = tempfile::tempdir().unwrap();
            // Whole lines, then what a torn append left.
            let mut file: Vec<u8> = lines.iter().flat_map(|line| format!("{line}\n").into_bytes()).collect();
            file.extend(torn_tail);
            std::fs::write(dir.path().join(SEEN_FILE), &file).unwrap();
            let recorded = lines.iter().filter_map(|line| serde_json::from_str::<SeenLine>(line).ok()).any(|line| {
                line.id.eq_ignore_ascii_case(ID) && line.issued_at >= NOW - 300
            });
            let signing = signing(dir.path());
            let accepted = signing.accept(&signed("", now), now);
            if now == NOW && recorded {
                proptest::prop_assert_eq!(accepted, Err(SignatureRefusal::Replay));
            }
        }
    }
}
