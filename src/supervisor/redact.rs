//! Masking secrets before output leaves the host.
//!
//! Each stream's decoded text goes through a [`Redactor`] before it is cut
//! into lines and chunks, so a secret is found even when its halves arrive in
//! different reads or would have gone in different chunks, and a secret
//! containing line breaks is matched whole. The price is a small delay: the
//! last `longest secret − 1` bytes of a stream are held back until more
//! output (or the end of the stream) shows they do not start a secret.

use aho_corasick::{AhoCorasick, MatchKind};

/// What every secret is replaced with.
pub const MASK: &str = "[REDACTED]";

/// Shorter values would mask ordinary words in the output.
pub const MIN_SECRET_LEN: usize = 6;

pub struct Redactor {
    matcher: AhoCorasick,
    longest: usize,
}

/// Never shows the secrets.
impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.matcher.patterns_len())
    }
}

impl Redactor {
    /// `None` when there is nothing to mask.
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Option<Self> {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        // A multi-line secret printed line by line must not leak either.
        let lines: Vec<String> = secrets
            .iter()
            .filter(|s| s.contains('\n'))
            .flat_map(|s| {
                s.lines().map(str::trim).filter(|l| l.len() >= 8).map(String::from).collect::<Vec<_>>()
            })
            .collect();
        secrets.extend(lines);
        secrets.sort();
        secrets.dedup();
        let longest = secrets.iter().map(String::len).max()?;
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&secrets)
            .expect("plain literal patterns always build");
        Some(Self { matcher, longest })
    }

    /// Masks what in `pending` can be decided now and returns it; what might
    /// still be the beginning of a secret stays in `pending`. At the end of
    /// the stream nothing is held back.
    pub fn take_safe(&self, pending: &mut String, at_end: bool) -> String {
        let hold = if at_end { 0 } else { self.longest - 1 };
        let mut cut = pending.len().saturating_sub(hold);
        while !pending.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut safe = String::with_capacity(cut);
        let mut done = 0;
        // A match starting before `cut` lies wholly in `pending`: it is at
        // most `longest` bytes long.
        for found in self.matcher.find_iter(pending.as_str()) {
            if found.start() >= cut {
                break;
            }
            safe.push_str(&pending[done..found.start()]);
            safe.push_str(MASK);
            done = found.end();
        }
        let emit_to = cut.max(done);
        safe.push_str(&pending[done..emit_to]);
        pending.drain(..emit_to);
        safe
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(redactor: &Redactor, pieces: &[&str]) -> String {
        let mut pending = String::new();
        let mut out = String::new();
        for piece in pieces {
            pending.push_str(piece);
            out.push_str(&redactor.take_safe(&mut pending, false));
        }
        out + &redactor.take_safe(&mut pending, true)
    }

    #[test]
    fn a_secret_split_across_pieces_is_masked() {
        let redactor = Redactor::new(["hunter2-secret".to_string()]).unwrap();
        assert_eq!(feed(&redactor, &["pass=hun", "ter2-se", "cret done"]), "pass=[REDACTED] done");
        assert_eq!(feed(&redactor, &["hunter2-secret", "hunter2-secret"]), "[REDACTED][REDACTED]");
        assert_eq!(feed(&redactor, &["nothing ", "to hide"]), "nothing to hide");
    }

    #[test]
    fn multi_line_secrets_are_masked_whole_and_by_line() {
        let key = "-----BEGIN KEY-----\nAAAABBBBCCCCDDDD\n-----END KEY-----".to_string();
        let redactor = Redactor::new([key]).unwrap();
        assert_eq!(
            feed(&redactor, &["k: -----BEGIN KEY-----\nAAAA", "BBBBCCCCDDDD\n-----END KEY-----\n"]),
            "k: [REDACTED]\n"
        );
        assert_eq!(feed(&redactor, &["only AAAABBBBCCCCDDDD here"]), "only [REDACTED] here");
    }

    #[test]
    fn non_ascii_text_is_never_cut_inside_a_character() {
        let redactor = Redactor::new(["ünïcødé-sécret".to_string()]).unwrap();
        assert_eq!(feed(&redactor, &["✓✓✓ ünïcø", "dé-sécret ✓"]), "✓✓✓ [REDACTED] ✓");
    }
}
