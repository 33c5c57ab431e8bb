//! Masking secrets before output leaves the host.
//!
//! Each stream's decoded text goes through a [`Redactor`] before it is cut
//! into lines and chunks, so a secret is found even when its halves arrive in
//! different reads or would have gone in different chunks, and a secret
//! containing line breaks is matched whole. The price is a small delay: the
//! end of a stream that could be the beginning of a secret is held back
//! until more output (or the end of the stream) shows whether it is one;
//! anything else goes out at once.
//!
//! Commands rarely print a secret only as it is: `diffsettings` prints
//! `repr()`s, APIs print JSON, database URLs are URL-encoded, tokens travel
//! in base64. Each secret is therefore masked in every form of
//! [`printed_forms`]: literal; Python-`repr` escaped (either quote);
//! JSON-escaped (with and without `ensure_ascii`); URL-encoded (Python's
//! `quote` with `safe=""` and `safe="/"`, and `quote_plus`); and, for
//! secrets of at least [`MIN_BASE64_LEN`] bytes, base64 (standard and
//! URL-safe alphabets, at each of the three alignments it can have inside
//! a longer encoded text). Other encodings (hex, double escaping, a
//! secret cut in pieces by the command itself) are not recognised.

use aho_corasick::{AhoCorasick, MatchKind};
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// What every secret is replaced with.
pub const MASK: &str = "[REDACTED]";

/// Shorter values would mask ordinary words in the output.
pub const MIN_SECRET_LEN: usize = 6;

/// Secrets at least this long are masked in base64 too: their encoded
/// fragments (15 characters or more) do not occur by chance.
pub const MIN_BASE64_LEN: usize = 12;

/// What Python's `urllib.parse.quote(s, safe="")` leaves as it is.
const URL_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
/// `quote(s)`'s default also keeps `/`.
const URL_PATH: &AsciiSet = &URL_UNRESERVED.remove(b'/');

pub struct Redactor {
    matcher: AhoCorasick,
    /// Every form of every secret, to tell what may be the start of one.
    patterns: Vec<String>,
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
        let mut secrets: Vec<String> =
            secrets.into_iter().filter(|s| !s.is_empty()).flat_map(|s| printed_forms(&s)).collect();
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
        if secrets.is_empty() {
            return None;
        }
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&secrets)
            .expect("plain literal patterns always build");
        Some(Self { matcher, patterns: secrets })
    }

    /// Masks what in `pending` can be decided now and returns it; what might
    /// still be the beginning of a secret stays in `pending`. At the end of
    /// the stream nothing is held back.
    pub fn take_safe(&self, pending: &mut String, at_end: bool) -> String {
        let hold = if at_end { 0 } else { self.unfinished_secret(pending) };
        let mut cut = pending.len().saturating_sub(hold);
        while !pending.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut safe = String::with_capacity(cut);
        let mut done = 0;
        // A match starting before `cut` lies wholly in `pending`: had a
        // longer secret started there, its beginning would be held back.
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

    /// The length of the longest end of `text` that is the beginning of a
    /// secret (in any of its forms), which must wait for more output.
    fn unfinished_secret(&self, text: &str) -> usize {
        let text = text.as_bytes();
        let Some(&last) = text.last() else {
            return 0;
        };
        let longest_start = |pattern: &String| {
            let pattern = pattern.as_bytes();
            let most = (pattern.len() - 1).min(text.len());
            // Cheap first: the candidate beginning must end with the text's last byte.
            (1..=most).rev().find(|&n| pattern[n - 1] == last && text.ends_with(&pattern[..n])).unwrap_or(0)
        };
        self.patterns.iter().map(longest_start).max().unwrap_or(0)
    }
}

/// The forms in which a command is likely to print `secret` (see the
/// module's documentation), the literal one first.
pub fn printed_forms(secret: &str) -> Vec<String> {
    let mut forms = vec![
        secret.to_string(),
        python_escaped(secret, Some('\'')),
        python_escaped(secret, None),
        json_escaped(secret, true),
        json_escaped(secret, false),
        utf8_percent_encode(secret, URL_UNRESERVED).to_string(),
        utf8_percent_encode(secret, URL_PATH).to_string(),
        utf8_percent_encode(secret, URL_UNRESERVED).to_string().replace("%20", "+"),
    ];
    if secret.len() >= MIN_BASE64_LEN {
        forms.extend(base64_fragments(secret.as_bytes()));
    }
    forms.sort();
    forms.dedup();
    forms
}

/// The inside of Python's `repr()` of `text`; `quote` is the quote
/// character escaped (repr escapes `'` only when the text has both quotes).
fn python_escaped(text: &str, quote: Option<char>) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if Some(c) == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// The inside of a JSON string holding `text`, as Python's `json.dumps`
/// writes it (`ensure_ascii`: non-ASCII as `\uXXXX`).
fn json_escaped(text: &str, ensure_ascii: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// The base64 characters that encode `secret` whatever precedes and follows
/// it: for each of the three alignments, the characters made only of the
/// secret's own bits.
fn base64_fragments(secret: &[u8]) -> Vec<String> {
    let mut fragments = Vec::new();
    for offset in 0..3 {
        let mut shifted = vec![0u8; offset];
        shifted.extend_from_slice(secret);
        let first = (8 * offset).div_ceil(6);
        let end = 8 * (offset + secret.len()) / 6;
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            let encoded = engine.encode(&shifted);
            fragments.push(encoded[first..end].to_string());
        }
    }
    fragments
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

    #[test]
    fn only_what_may_start_a_secret_is_held_back() {
        let redactor = Redactor::new(["hunter2-secret".to_string()]).unwrap();
        let mut pending = "sleeping 3\n".to_string();
        assert_eq!(redactor.take_safe(&mut pending, false), "sleeping 3\n");
        let mut pending = "password: hunt".to_string();
        assert_eq!(redactor.take_safe(&mut pending, false), "password: ");
        assert_eq!(pending, "hunt");
    }

    #[test]
    fn escaped_encoded_and_base64_forms_are_masked() {
        let secret = "pa'ss\\wo\"rd-é 42/x";
        let redactor = Redactor::new([secret.to_string()]).unwrap();
        let printed = [
            r#"'PASSWORD': 'pa\'ss\\wo"rd-é 42/x'"#, // repr() with both quotes
            r#"{"password": "pa'ss\\wo\"rd-\u00e9 42/x"}"#, // json.dumps
            r#"{"password": "pa'ss\\wo\"rd-é 42/x"}"#, // ensure_ascii=False
            "postgres://u:pa%27ss%5Cwo%22rd-%C3%A9%2042%2Fx@db/x", // quote(safe="")
            "postgres://u:pa%27ss%5Cwo%22rd-%C3%A9%2042/x@db/x", // quote()
            "form=pa%27ss%5Cwo%22rd-%C3%A9+42%2Fx",  // quote_plus()
        ];
        for line in printed {
            let masked = feed(&redactor, &[line]);
            assert!(masked.contains(MASK), "{line} -> {masked}");
            assert!(!masked.contains("42"), "{line} -> {masked}");
        }
        // Base64 of a text holding the secret, at every alignment.
        for prefix in ["", "a", "ab", "abc"] {
            let blob = STANDARD_NO_PAD.encode(format!("{prefix}user:{secret}:end"));
            let masked = feed(&redactor, &[&blob]);
            assert!(masked.contains(MASK), "{prefix:?}: {blob} -> {masked}");
        }
        // Short secrets are not looked for in base64 (fragments would be ambiguous).
        assert_eq!(printed_forms("abcdef").len(), 1);
    }

    /// A piece of output: noise, or (a prefix of) one form of one secret.
    #[derive(Debug, Clone)]
    enum Piece {
        Noise(String),
        Form {
            secret: proptest::sample::Index,
            form: proptest::sample::Index,
            prefix: proptest::sample::Index,
        },
    }

    fn pieces() -> impl proptest::strategy::Strategy<Value = Vec<Piece>> {
        use proptest::prelude::*;
        let piece = prop_oneof![
            "[a-z \n'\\%✓]{0,6}".prop_map(Piece::Noise),
            (
                any::<proptest::sample::Index>(),
                any::<proptest::sample::Index>(),
                any::<proptest::sample::Index>()
            )
                .prop_map(|(secret, form, prefix)| Piece::Form { secret, form, prefix }),
        ];
        prop::collection::vec(piece, 0..10)
    }

    /// The text the pieces make: whole forms, and forms cut short.
    fn text_of(secrets: &[String], pieces: &[Piece]) -> String {
        let mut text = String::new();
        for piece in pieces {
            match piece {
                Piece::Noise(noise) => text.push_str(noise),
                Piece::Form { secret, form, prefix } => {
                    let forms = printed_forms(secret.get::<String>(secrets));
                    let form = form.get(&forms);
                    let mut cut = prefix.index(form.len() * 2).min(form.len());
                    while !form.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.push_str(&form[..cut]);
                }
            }
        }
        text
    }

    /// `text` cut at the character boundaries nearest `cuts`.
    fn split_at<'t>(text: &'t str, cuts: &[proptest::sample::Index]) -> Vec<&'t str> {
        let mut points: Vec<usize> = cuts
            .iter()
            .map(|cut| {
                let mut at = cut.index(text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                at
            })
            .collect();
        points.push(0);
        points.push(text.len());
        points.sort_unstable();
        points.windows(2).map(|pair| &text[pair[0]..pair[1]]).collect()
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(384))]

        /// The module's promise: a secret is masked however the output is
        /// cut into reads, so masking in pieces equals masking the whole.
        #[test]
        fn masking_output_in_pieces_equals_masking_it_whole(
            secrets in proptest::collection::vec("[a-z0-9é✓'\"\\/ %+\n]{1,14}", 1..4),
            pieces in pieces(),
            cuts in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..8),
        ) {
            let Some(redactor) = Redactor::new(secrets.clone()) else { return Ok(()) };
            let text = text_of(&secrets, &pieces);
            let whole = feed(&redactor, &[&text]);
            let pieced = feed(&redactor, &split_at(&text, &cuts));
            proptest::prop_assert_eq!(&pieced, &whole);
        }

        /// No secret of letters and digits survives whole in what leaves.
        #[test]
        fn no_whole_secret_leaves(
            secrets in proptest::collection::vec("[a-c0-2]{6,10}", 1..4),
            pieces in pieces(),
            cuts in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..8),
        ) {
            let Some(redactor) = Redactor::new(secrets.clone()) else { return Ok(()) };
            let text = text_of(&secrets, &pieces);
            let masked = feed(&redactor, &split_at(&text, &cuts));
            for secret in &secrets {
                proptest::prop_assert!(!masked.contains(secret.as_str()), "{:?} in {:?}", secret, masked);
            }
        }
    }
}
