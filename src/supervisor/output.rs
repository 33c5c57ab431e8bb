//! Turning a command's raw output into the protocol's chunks.
//!
//! Each stream is decoded as UTF-8 incrementally: a character split across
//! two reads is held until it is complete (so it is never split across
//! chunks), and invalid bytes become U+FFFD instead of ending the capture.
//! Text is cut into line segments stamped with the time their first
//! character arrived; a line still open when a chunk is cut goes out with its
//! timestamp, and its continuation in a later chunk has none.
//!
//! [`OutputCap`] optionally bounds what one execution sends: the head goes
//! out as it comes, the tail is kept in a ring and sent at the end after a
//! line saying how much was left out in between.

use std::collections::VecDeque;
use std::sync::Arc;

use super::redact::Redactor;
use super::wal::Carry;
use crate::protocol::api::Segment;

/// One stream's text not yet sent.
#[derive(Debug, Default)]
pub struct StreamBuffer {
    /// Masks secrets before the text becomes segments.
    redactor: Option<Arc<Redactor>>,
    /// Text the redactor holds back: it may be the start of a secret.
    held: String,
    /// The start of a UTF-8 sequence whose remaining bytes have not arrived.
    incomplete: Vec<u8>,
    segments: Vec<Segment>,
    bytes: usize,
    /// The last segment handed out ended mid-line.
    continues_line: bool,
}

impl StreamBuffer {
    pub fn new(redactor: Option<Arc<Redactor>>) -> Self {
        Self { redactor, ..Self::default() }
    }

    /// Adds bytes read at `now` (unix seconds).
    pub fn push(&mut self, data: &[u8], now: f64) {
        let mut bytes = std::mem::take(&mut self.incomplete);
        bytes.extend_from_slice(data);
        let mut rest = bytes.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    self.accept(text, now);
                    break;
                }
                Err(error) => {
                    let (valid, after) = rest.split_at(error.valid_up_to());
                    self.accept(std::str::from_utf8(valid).expect("checked by valid_up_to"), now);
                    match error.error_len() {
                        Some(bad) => {
                            self.accept("\u{FFFD}", now);
                            rest = &after[bad..];
                        }
                        None => {
                            // Possibly completed by the next read.
                            self.incomplete = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
    }

    /// End of stream: an unfinished character can no longer complete.
    pub fn finish(&mut self, now: f64) {
        if !self.incomplete.is_empty() {
            self.incomplete.clear();
            self.accept("\u{FFFD}", now);
        }
        if let Some(redactor) = self.redactor.clone() {
            let rest = redactor.take_safe(&mut self.held, true);
            self.push_text(&rest, now);
        }
    }

    /// Decoded text, through the redactor when there is one.
    fn accept(&mut self, text: &str, now: f64) {
        match self.redactor.clone() {
            None => self.push_text(text, now),
            Some(redactor) => {
                self.held.push_str(text);
                let safe = redactor.take_safe(&mut self.held, false);
                self.push_text(&safe, now);
            }
        }
    }

    /// Bytes of text waiting to be sent.
    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Everything waiting, as segments for one chunk.
    pub fn take(&mut self) -> Vec<Segment> {
        let segments = std::mem::take(&mut self.segments);
        self.bytes = 0;
        if let Some(last) = segments.last() {
            self.continues_line = !last.content.ends_with('\n');
        }
        segments
    }

    /// At most `max` bytes of what is waiting (at least one character, so
    /// any `max` makes progress): a line cut here continues, without a
    /// timestamp, in the next take.
    pub fn take_up_to(&mut self, max: usize) -> Vec<Segment> {
        if self.bytes <= max {
            return self.take();
        }
        let mut taken = Vec::new();
        let mut room = max;
        while let Some(first) = self.segments.first_mut() {
            if first.content.len() <= room {
                room -= first.content.len();
                self.bytes -= first.content.len();
                taken.push(self.segments.remove(0));
                continue;
            }
            let mut cut = room;
            while !first.content.is_char_boundary(cut) {
                cut -= 1;
            }
            if cut == 0 && taken.is_empty() {
                cut = first.content.chars().next().map_or(0, char::len_utf8);
            }
            if cut > 0 {
                let rest = first.content.split_off(cut);
                let head = std::mem::replace(first, Segment { timestamp: None, content: rest });
                self.bytes -= head.content.len();
                taken.push(head);
            }
            break;
        }
        taken
    }

    /// Adds segments already decoded (the output cap's tail).
    pub fn extend(&mut self, segments: Vec<Segment>) {
        self.bytes += segments.iter().map(|s| s.content.len()).sum::<usize>();
        self.segments.extend(segments);
    }

    /// What the decoder carries over once everything waiting was taken.
    pub fn carry(&self) -> Carry {
        Carry {
            continues_line: self.continues_line,
            incomplete: self.incomplete.clone(),
            held: self.held.clone(),
        }
    }

    /// A buffer that goes on from `carry`.
    pub fn resume(redactor: Option<Arc<Redactor>>, carry: Carry) -> Self {
        Self {
            redactor,
            held: carry.held,
            incomplete: carry.incomplete,
            continues_line: carry.continues_line,
            ..Self::default()
        }
    }

    fn push_text(&mut self, text: &str, now: f64) {
        for piece in text.split_inclusive('\n') {
            self.bytes += piece.len();
            match self.segments.last_mut() {
                Some(open) if !open.content.ends_with('\n') => open.content.push_str(piece),
                _ => {
                    let timestamp = if std::mem::take(&mut self.continues_line) { None } else { Some(now) };
                    self.segments.push(Segment { timestamp, content: piece.to_string() });
                }
            }
        }
    }
}

/// Keeps an execution's output within a byte budget: head and tail.
#[derive(Debug)]
pub struct OutputCap {
    head_budget: usize,
    tail_budget: usize,
    sent: usize,
    tail: VecDeque<(bool, Segment)>,
    tail_bytes: usize,
    omitted: usize,
}

impl OutputCap {
    pub fn new(limit: usize) -> Self {
        Self {
            head_budget: limit / 2,
            tail_budget: limit - limit / 2,
            sent: 0,
            tail: VecDeque::new(),
            tail_bytes: 0,
            omitted: 0,
        }
    }

    /// A cap that already let `sent` bytes through (going on from a checkpoint).
    pub fn resume(limit: usize, sent: usize) -> Self {
        Self { sent, ..Self::new(limit) }
    }

    pub fn sent(&self) -> usize {
        self.sent
    }

    /// Nothing held back for the end.
    pub fn holds_nothing(&self) -> bool {
        self.tail.is_empty() && self.omitted == 0
    }

    /// Returns the part of `segments` that may be sent now; the rest is held
    /// for the tail (or dropped from the middle).
    pub fn admit(&mut self, is_stderr: bool, segments: Vec<Segment>) -> Vec<Segment> {
        let mut now = Vec::new();
        for segment in segments {
            let len = segment.content.len();
            // Saturating: `sent` may come from a checkpoint on disk.
            if self.tail.is_empty() && self.sent.saturating_add(len) <= self.head_budget {
                self.sent += len;
                now.push(segment);
            } else {
                self.tail_bytes += len;
                self.tail.push_back((is_stderr, segment));
                while self.tail_bytes > self.tail_budget && self.tail.len() > 1 {
                    let (_, dropped) = self.tail.pop_front().expect("len > 1");
                    self.tail_bytes -= dropped.content.len();
                    self.omitted += dropped.content.len();
                }
            }
        }
        now
    }

    /// At the end: a notice of what was left out (if anything) and the tail,
    /// grouped into runs of the same stream, in order.
    pub fn finish(&mut self, now: f64) -> Vec<(bool, Vec<Segment>)> {
        let mut runs: Vec<(bool, Vec<Segment>)> = Vec::new();
        if self.omitted > 0 {
            let notice = format!(
                "\n[dcsupervisor: {} bytes of output left out here (output cap reached); the end of the output follows]\n",
                self.omitted
            );
            runs.push((true, vec![Segment { timestamp: Some(now), content: notice }]));
        }
        for (is_stderr, segment) in self.tail.drain(..) {
            match runs.last_mut() {
                Some((stream, segments)) if *stream == is_stderr => segments.push(segment),
                _ => runs.push((is_stderr, vec![segment])),
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(segments: &[Segment]) -> Vec<(&str, bool)> {
        segments.iter().map(|s| (s.content.as_str(), s.timestamp.is_some())).collect()
    }

    #[test]
    fn lines_are_stamped_when_their_first_character_arrives() {
        let mut buffer = StreamBuffer::default();
        buffer.push(b"one\ntw", 1.0);
        buffer.push(b"o\nthree", 2.0);
        let segments = buffer.take();
        assert_eq!(contents(&segments), [("one\n", true), ("two\n", true), ("three", true)]);
        assert_eq!(segments.iter().map(|s| s.timestamp.unwrap()).collect::<Vec<_>>(), [1.0, 1.0, 2.0]);
        buffer.push(b" continued\nfour\n", 3.0);
        assert_eq!(contents(&buffer.take()), [(" continued\n", false), ("four\n", true)]);
    }

    #[test]
    fn a_character_split_across_reads_is_never_split_across_chunks() {
        let mut buffer = StreamBuffer::default();
        let check = "✓".as_bytes();
        buffer.push(&check[..1], 1.0);
        assert!(buffer.is_empty());
        buffer.push(&check[1..], 1.0);
        assert_eq!(buffer.take()[0].content, "✓");
    }

    #[test]
    fn invalid_bytes_are_replaced_and_the_rest_kept() {
        let mut buffer = StreamBuffer::default();
        buffer.push(b"bad \xff\xfe bytes\nafter\n", 1.0);
        buffer.push(b"\xe2\x9c", 1.0);
        buffer.finish(1.0);
        let text: String = buffer.take().into_iter().map(|s| s.content).collect();
        assert_eq!(text, "bad \u{FFFD}\u{FFFD} bytes\nafter\n\u{FFFD}");
    }

    #[test]
    fn take_up_to_is_a_real_maximum_and_never_splits_a_character() {
        let mut buffer = StreamBuffer::default();
        buffer.push("ab✓✓\nxyz\n".as_bytes(), 1.0);
        let first = buffer.take_up_to(4);
        assert_eq!(contents(&first), [("ab", true)], "✓ is 3 bytes: it waits");
        let second = buffer.take_up_to(4);
        assert_eq!(contents(&second), [("✓", false)]);
        let rest = buffer.take_up_to(100);
        assert_eq!(contents(&rest), [("✓\n", false), ("xyz\n", true)]);
        buffer.push("✓".as_bytes(), 2.0);
        assert_eq!(buffer.take_up_to(1)[0].content, "✓", "one character at least");
    }

    #[test]
    fn the_cap_keeps_head_and_tail() {
        let mut cap = OutputCap::new(20);
        let line = |n: usize| Segment { timestamp: Some(0.0), content: format!("line {n:02}\n") };
        let mut sent: Vec<Segment> = Vec::new();
        for n in 0..10 {
            sent.extend(cap.admit(false, vec![line(n)]));
        }
        assert_eq!(sent.len(), 1, "8-byte lines: one fits the 10-byte head");
        let end = cap.finish(1.0);
        assert!(end[0].1[0].content.contains("bytes of output left out"), "{end:?}");
        let tail: Vec<String> = end[1].1.iter().map(|s| s.content.clone()).collect();
        assert_eq!(tail, ["line 09\n"]);
    }

    /// `bytes` cut at `cuts` (any byte, inside a character too).
    fn split_bytes<'b>(bytes: &'b [u8], cuts: &[proptest::sample::Index]) -> Vec<&'b [u8]> {
        let mut points: Vec<usize> = cuts.iter().map(|cut| cut.index(bytes.len() + 1)).collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        points.windows(2).map(|pair| &bytes[pair[0]..pair[1]]).collect()
    }

    /// Everything a buffer fed `reads` sends, taken `max` bytes at a time.
    fn drained(redactor: Option<Arc<Redactor>>, reads: &[&[u8]], max: usize) -> (String, Vec<usize>) {
        let mut buffer = StreamBuffer::new(redactor);
        let mut text = String::new();
        let mut sizes = Vec::new();
        let mut take = |buffer: &mut StreamBuffer| {
            while !buffer.is_empty() {
                let taken = buffer.take_up_to(max);
                sizes.push(taken.iter().map(|s| s.content.len()).sum());
                text.extend(taken.into_iter().map(|s| s.content));
            }
        };
        for read in reads {
            buffer.push(read, 1.0);
            take(&mut buffer);
        }
        buffer.finish(2.0);
        take(&mut buffer);
        (text, sizes)
    }

    fn output() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            "[a-z✓é\n\r]{0,24}".prop_map(String::into_bytes),
            prop::collection::vec(
                prop::sample::select(&b"a\n\xc3\xa9\xe2\x9c\x93\xf0\x9f\x98\x80\xff"[..]),
                0..40
            ),
        ]
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(384))]

        /// Any bytes, read in any pieces (characters split across reads),
        /// taken in chunks of any size: the same text as read whole, lossy
        /// UTF-8 decoding included, secrets masked, and no chunk over its
        /// maximum unless it is one character.
        #[test]
        fn output_read_in_any_pieces_gives_the_text_read_whole(
            bytes in output(),
            cuts in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..8),
            max in 1usize..32,
            secret in proptest::option::of("[a✓é\n]{6,9}"),
        ) {
            let redactor = secret.and_then(|secret| Redactor::new([secret])).map(Arc::new);
            let (whole, _) = drained(redactor.clone(), &[&bytes], usize::MAX);
            let (pieced, sizes) = drained(redactor.clone(), &split_bytes(&bytes, &cuts), max);
            proptest::prop_assert_eq!(&pieced, &whole);
            if redactor.is_none() {
                proptest::prop_assert_eq!(&whole, &String::from_utf8_lossy(&bytes));
            }
            proptest::prop_assert!(sizes.iter().all(|size| *size <= max.max(4)), "{:?}", sizes);
        }

        /// The output cap with any limit, any segments and any count
        /// already sent (a checkpoint): never a panic, never more than
        /// the head budget sent before the end.
        #[test]
        fn the_cap_takes_any_segments(
            limit in proptest::prop_oneof![0usize..64, proptest::strategy::Just(usize::MAX)],
            sent in proptest::prop_oneof![0usize..64, proptest::strategy::Just(usize::MAX)],
            lines in proptest::collection::vec(("[a-z✓]{0,12}\n?", proptest::prelude::any::<bool>()), 0..12),
        ) {
            let mut cap = OutputCap::resume(limit, sent);
            let mut passed = 0usize;
            for (content, stderr) in lines {
                let now = cap.admit(stderr, vec![Segment { timestamp: Some(1.0), content }]);
                passed = passed.saturating_add(now.iter().map(|s| s.content.len()).sum());
            }
            proptest::prop_assert!(passed <= limit / 2);
            cap.finish(2.0);
        }
    }
}
