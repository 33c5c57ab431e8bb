//! The command catalog as the control plane sees it, and its hash.
//!
//! The hash must equal what the published Python runner computes:
//! `"sha256:" + sha256(json.dumps(sorted(cmds, key=name), sort_keys=True,
//! separators=(",", ":")))`, where `json.dumps` escapes every non-ASCII
//! character (and DEL) as `\uXXXX`. serde_json leaves those as UTF-8, so the
//! canonical text is written through [`PythonAsciiFormatter`].

use std::io;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One command as the control plane sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncedCommand {
    pub name: String,
    pub app_label: String,
    pub help_text: String,
    /// Present only for commands restricted to listed argument sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_args: Option<Vec<BoundArgs>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundArgs {
    pub args: String,
    pub label: String,
}

/// `sha256:<hex>` of the canonical JSON of `commands`.
pub fn commands_hash(commands: &[SyncedCommand]) -> String {
    let digest = Sha256::digest(canonical_json(commands));
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The bytes Python's `json.dumps(sorted_cmds, sort_keys=True, separators=(",", ":"))` gives.
pub fn canonical_json(commands: &[SyncedCommand]) -> Vec<u8> {
    let mut sorted: Vec<&SyncedCommand> = commands.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    // Going through `Value` sorts object keys (serde_json's map is a BTreeMap),
    // and byte order of UTF-8 equals Python's code-point order.
    let value = serde_json::to_value(&sorted).expect("commands serialize");
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, PythonAsciiFormatter);
    value.serialize(&mut serializer).expect("writing to a Vec cannot fail");
    out
}

/// Compact JSON that escapes like Python's `ensure_ascii=True`.
struct PythonAsciiFormatter;

impl serde_json::ser::Formatter for PythonAsciiFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        for ch in fragment.chars() {
            if (' '..='~').contains(&ch) {
                writer.write_all(&[ch as u8])?;
            } else {
                let mut units = [0u16; 2];
                for unit in ch.encode_utf16(&mut units) {
                    write!(writer, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(name: &str, help: &str) -> SyncedCommand {
        SyncedCommand {
            name: name.into(),
            app_label: "demo".into(),
            help_text: help.into(),
            bound_args: None,
        }
    }

    #[test]
    fn canonical_json_matches_python_escaping() {
        let json = canonical_json(&[command("b", "tab\t é ✓ 😀 \u{7f}"), command("a", "\"q\"\\")]);
        assert_eq!(
            String::from_utf8(json).unwrap(),
            r#"[{"app_label":"demo","help_text":"\"q\"\\","name":"a"},{"app_label":"demo","help_text":"tab\t \u00e9 \u2713 \ud83d\ude00 \u007f","name":"b"}]"#
        );
    }

    #[test]
    fn bound_args_appear_only_when_set() {
        let mut bound = command("migrate", "");
        bound.bound_args = Some(vec![BoundArgs { args: "--plan".into(), label: "Plan".into() }]);
        let json = String::from_utf8(canonical_json(&[bound])).unwrap();
        assert!(json.contains(r#""bound_args":[{"args":"--plan","label":"Plan"}]"#));
    }
}
