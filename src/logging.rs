//! Log lines that cannot be forged: every line the process writes has its
//! control characters escaped, so data from the control plane or the worker
//! (a command's arguments, a reason, a line of the worker's output) can
//! neither start a fake log line with a newline, nor hide text with a
//! carriage return, nor drive the terminal with escape sequences. Only the
//! line's final newline stays, and, when colours are on, the colour codes
//! the formatter itself writes (`ESC [ digits ; m`), which are harmless.

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// A [`MakeWriter`] whose writers escape control characters.
pub struct Escaping<M> {
    inner: M,
    keep_colours: bool,
}

impl<M> Escaping<M> {
    pub fn new(inner: M, keep_colours: bool) -> Self {
        Self { inner, keep_colours }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Escaping<M> {
    type Writer = EscapingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter { inner: self.inner.make_writer(), keep_colours: self.keep_colours }
    }
}

pub struct EscapingWriter<W> {
    inner: W,
    keep_colours: bool,
}

impl<W: Write> Write for EscapingWriter<W> {
    /// The formatter writes each event as one buffer ending in its newline.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write_all(&escape(buf, self.keep_colours))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `line` with its control characters (C0, DEL, C1) written as `\n`,
/// `\x1b`, `\u{9b}`…, except a final newline and, if `keep_colours`, SGR
/// colour codes.
pub fn escape(line: &[u8], keep_colours: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        let byte = line[i];
        let next = line.get(i + 1).copied();
        match byte {
            b'\n' if i + 1 == line.len() => out.push(byte),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x1b if keep_colours && colour_code_len(&line[i..]).is_some() => {
                let len = colour_code_len(&line[i..]).unwrap_or(1);
                out.extend_from_slice(&line[i..i + len]);
                i += len;
                continue;
            }
            0x00..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{byte:02x}").as_bytes()),
            // C1 controls, UTF-8 encoded (U+0080..U+009F); some terminals obey them.
            0xc2 if next.is_some_and(|b| (0x80..=0x9f).contains(&b)) => {
                out.extend_from_slice(format!("\\u{{{:x}}}", next.unwrap_or_default()).as_bytes());
                i += 2;
                continue;
            }
            _ => out.push(byte),
        }
        i += 1;
    }
    out
}

/// The length of the SGR sequence (`ESC [ 0-9 ; … m`) `text` starts with.
fn colour_code_len(text: &[u8]) -> Option<usize> {
    let rest = text.strip_prefix(b"\x1b[")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit() || **b == b';').count();
    (rest.get(digits) == Some(&b'm')).then_some(2 + digits + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_but_the_final_newline_stays() {
        let line = "args=\"a\nFAKE LINE\r\u{0}\u{1b}]0;title\u{7}\u{9b}31m\" done\n";
        let escaped = String::from_utf8(escape(line.as_bytes(), false)).unwrap();
        assert_eq!(escaped, "args=\"a\\nFAKE LINE\\r\\x00\\x1b]0;title\\x07\\u{9b}31m\" done\n");
        assert_eq!(escape("café ✓\n".as_bytes(), false), "café ✓\n".as_bytes());
    }

    #[test]
    fn the_formatters_colours_survive_when_on() {
        let line = "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x\u{1b}[1Ay\n";
        let escaped = String::from_utf8(escape(line.as_bytes(), true)).unwrap();
        assert_eq!(escaped, "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x\\x1b[1Ay\n");
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(512))]

        /// Any bytes a log line may carry: escaped, never a panic, and no
        /// control character left but the final newline (and, with colours
        /// on, the formatter's own SGR codes).
        #[test]
        fn any_line_is_escaped(
            line in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::any::<u8>(),
                    proptest::sample::select(&b"\x1b[;m0\n\r\xc2\x9b"[..]),
                ],
                0..64,
            ),
            colours in proptest::prelude::any::<bool>(),
        ) {
            let escaped = escape(&line, colours);
            let body = escaped.strip_suffix(b"\n").unwrap_or(&escaped);
            let mut i = 0;
            while i < body.len() {
                if colours {
                    if let Some(len) = colour_code_len(&body[i..]) {
                        i += len;
                        continue;
                    }
                }
                proptest::prop_assert!(body[i] >= 0x20 && body[i] != 0x7f, "{:?}", String::from_utf8_lossy(&escaped));
                let c1 = body[i] == 0xc2 && body.get(i + 1).is_some_and(|b| (0x80..=0x9f).contains(b));
                proptest::prop_assert!(!c1, "{:?}", String::from_utf8_lossy(&escaped));
                i += 1;
            }
        }
    }
}
