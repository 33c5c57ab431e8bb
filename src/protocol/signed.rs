//! The signed-message format of `[policy.signing]` (docs/protocol.md,
//! "Signed executions"): which bytes a signature covers, how a control plane
//! signs, and how keys are written (base64 of 32 bytes). The runner checks
//! signatures in `supervisor::admission::signing`; `dccontrol` signs here.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::Serialize;

use super::api::Execution;

/// The signed fields, declared in sorted order: serialized compactly, this
/// is the canonical message (`{"args":…,"command":…,"id":…,"issued_at":…,
/// "timeout":…,"use_metadata_only_mode":…}`).
#[derive(Serialize)]
struct SignedFields<'a> {
    args: &'a str,
    command: &'a str,
    id: &'a str,
    issued_at: i64,
    timeout: u64,
    use_metadata_only_mode: bool,
}

/// The bytes a signature covers: the execution's fields as the runner read
/// them (defaults applied) and the issue time, as canonical JSON in UTF-8.
pub fn message(execution: &Execution, issued_at: i64) -> Vec<u8> {
    let fields = SignedFields {
        args: &execution.args,
        command: &execution.command,
        id: execution.id.as_str(),
        issued_at,
        timeout: execution.timeout,
        use_metadata_only_mode: execution.use_metadata_only_mode,
    };
    serde_json::to_vec(&fields).expect("strings, integers and booleans always serialize")
}

/// The base64 signature of `execution` issued at `issued_at` (what a control
/// plane puts in the `signature` field).
pub fn sign(key: &SigningKey, execution: &Execution, issued_at: i64) -> String {
    BASE64.encode(key.sign(&message(execution, issued_at)).to_bytes())
}

/// Why a key could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not base64")]
    NotBase64,
    #[error("decodes to {0} bytes instead of 32")]
    WrongLength(usize),
    #[error("not a valid Ed25519 public key (not a point of the curve)")]
    NotAPoint,
    #[error("a weak Ed25519 public key (of small order), which any signature could match")]
    Weak,
}

/// A public key from its base64 text (32 bytes, a usable curve point).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let key = VerifyingKey::from_bytes(&decode_32(text)?).map_err(|_| KeyError::NotAPoint)?;
    if key.is_weak() {
        return Err(KeyError::Weak);
    }
    Ok(key)
}

/// A signing key from the base64 text of its 32-byte secret seed.
pub fn parse_secret_seed(text: &str) -> Result<SigningKey, KeyError> {
    Ok(SigningKey::from_bytes(&decode_32(text)?))
}

pub fn encode_public_key(key: &VerifyingKey) -> String {
    BASE64.encode(key.to_bytes())
}

pub fn encode_secret_seed(key: &SigningKey) -> String {
    BASE64.encode(key.to_bytes())
}

fn decode_32(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = BASE64.decode(text.trim()).map_err(|_| KeyError::NotBase64)?;
    let length = bytes.len();
    bytes.try_into().map_err(|_| KeyError::WrongLength(length))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b";

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn execution(args: &str) -> Execution {
        serde_json::from_value(serde_json::json!({"id": ID, "command": "migrate", "args": args})).unwrap()
    }

    #[test]
    fn the_canonical_message_is_sorted_compact_json() {
        let message = message(&execution(""), 1_700_000_000);
        assert_eq!(
            String::from_utf8(message).unwrap(),
            r#"{"args":"","command":"migrate","id":"3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b","issued_at":1700000000,"timeout":300,"use_metadata_only_mode":false}"#
        );
    }

    #[test]
    fn the_canonical_message_escapes_like_pythons_json_dumps_without_ensure_ascii() {
        // json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        // of these args gives exactly this text (checked with Python 3).
        let args = "--name 'é \"q\" \\ /'\n\t\u{1}\u{7f}\u{2028}";
        let mut execution = execution(args);
        execution.timeout = 60;
        execution.use_metadata_only_mode = true;
        let expected =
            "{\"args\":\"--name 'é \\\"q\\\" \\\\ /'\\n\\t\\u0001\u{7f}\u{2028}\",\"command\":\"migrate\",\
                        \"id\":\"3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b\",\"issued_at\":-5,\"timeout\":60,\
                        \"use_metadata_only_mode\":true}";
        assert_eq!(String::from_utf8(message(&execution, -5)).unwrap(), expected);
    }

    #[test]
    fn keys_are_checked() {
        let public = encode_public_key(&key().verifying_key());
        assert_eq!(parse_public_key(&public), Ok(key().verifying_key()));
        assert_eq!(parse_public_key("%%%"), Err(KeyError::NotBase64));
        assert_eq!(parse_public_key(&BASE64.encode([1u8; 31])), Err(KeyError::WrongLength(31)));
        // The identity point has small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(parse_public_key(&BASE64.encode(identity)), Err(KeyError::Weak));
        // y = 2 is not on the curve.
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        assert_eq!(parse_public_key(&BASE64.encode(off_curve)), Err(KeyError::NotAPoint));
        let seed = encode_secret_seed(&key());
        assert_eq!(parse_secret_seed(&format!("{seed}\n")).unwrap().to_bytes(), key().to_bytes());
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(256))]

        /// A key from dc.toml or `dccontrol keygen` of any text is a key or
        /// an error; any execution has a canonical message.
        #[test]
        fn any_key_text_parses_or_is_refused(text in "[A-Za-z0-9+/=]{0,48}|.{0,48}", args in ".{0,32}", issued_at in proptest::prelude::any::<i64>()) {
            let _ = parse_public_key(&text);
            let _ = parse_secret_seed(&text);
            let mut execution = execution(&args);
            execution.timeout = u64::MAX;
            message(&execution, issued_at);
        }
    }
}
