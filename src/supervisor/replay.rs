//! Turning an execution's log into the messages the control plane gets.
//!
//! The same records always give the same chunks (numbers, cut points,
//! contents up to the redactor's configuration): reads carry their own time
//! and cuts are records too. That is what lets delivery follow the log
//! instead of keeping messages in memory, and lets a restarted runner replay
//! a log, skip what the control plane had acknowledged and send the rest.

use std::sync::Arc;

use super::delivery::Message;
use super::output::{OutputCap, StreamBuffer};
use super::redact::Redactor;
use super::wal::{Checkpoint, Meta, Record};
use crate::protocol::api::{CompleteRequest, OutputRequest, Segment};

/// How an execution's output is shaped into chunks.
#[derive(Debug, Clone)]
pub struct Shaping {
    pub chunk_max_bytes: usize,
    pub output_cap: Option<usize>,
    pub redactor: Option<Arc<Redactor>>,
}

impl Default for Shaping {
    fn default() -> Self {
        Self { chunk_max_bytes: 64 * 1024, output_cap: None, redactor: None }
    }
}

/// Replays records into numbered chunks and the completion.
pub struct Pipeline {
    shaping: Shaping,
    stdout: StreamBuffer,
    stderr: StreamBuffer,
    cap: Option<OutputCap>,
    next_chunk: u64,
}

impl Pipeline {
    pub fn new(shaping: Shaping) -> Self {
        Self::resume(shaping, &Checkpoint { next_chunk: 1, ..Checkpoint::default() })
    }

    /// Goes on from where a compacted log starts.
    pub fn resume(shaping: Shaping, from: &Checkpoint) -> Self {
        let redactor = shaping.redactor.clone();
        Self {
            stdout: StreamBuffer::resume(redactor.clone(), from.stdout.clone()),
            stderr: StreamBuffer::resume(redactor, from.stderr.clone()),
            cap: shaping.output_cap.map(|limit| OutputCap::resume(limit, from.cap_sent as usize)),
            next_chunk: from.next_chunk,
            shaping,
        }
    }

    /// The messages `record` produces, in order.
    pub fn apply(&mut self, record: Record) -> Vec<Message> {
        let mut out = Vec::new();
        match record {
            Record::Read { stderr, at, bytes } => {
                self.buffer(stderr).push(&bytes, at);
                while !self.buffer(stderr).is_empty()
                    && self.buffer(stderr).len() >= self.shaping.chunk_max_bytes
                {
                    self.cut(stderr, &mut out);
                }
            }
            Record::Meta(Meta::Eof { stderr, at }) => self.buffer(stderr).finish(at),
            Record::Meta(Meta::Flush { stderr: Some(stderr) }) => self.flush(stderr, &mut out),
            Record::Meta(Meta::Flush { stderr: None }) => {
                self.flush(false, &mut out);
                self.flush(true, &mut out);
            }
            Record::Meta(Meta::Note { stderr, at, text }) => {
                self.send_as_is(stderr, vec![Segment { timestamp: Some(at), content: text }], &mut out)
            }
            Record::Meta(Meta::Dropped { bytes }) => {
                self.flush(false, &mut out);
                self.flush(true, &mut out);
                let text = format!(
                    "\n[dcsupervisor: {bytes} bytes of output left out here (the disk was full or the output log reached its cap)]\n"
                );
                self.send_as_is(true, vec![Segment { timestamp: None, content: text }], &mut out);
            }
            Record::Meta(Meta::End { completion, at }) => self.end(completion, at, &mut out),
            Record::Meta(Meta::Acked { .. } | Meta::AckedEnd | Meta::Checkpoint(_)) => {}
        }
        out
    }

    /// Nothing waiting in a buffer or held by the cap: a checkpoint here
    /// captures the whole state.
    pub fn is_clean(&self) -> bool {
        self.stdout.is_empty()
            && self.stderr.is_empty()
            && self.cap.as_ref().is_none_or(OutputCap::holds_nothing)
    }

    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            next_chunk: self.next_chunk,
            cap_sent: self.cap.as_ref().map_or(0, |cap| cap.sent() as u64),
            stdout: self.stdout.carry(),
            stderr: self.stderr.carry(),
        }
    }

    fn buffer(&mut self, stderr: bool) -> &mut StreamBuffer {
        if stderr {
            &mut self.stderr
        } else {
            &mut self.stdout
        }
    }

    fn flush(&mut self, stderr: bool, out: &mut Vec<Message>) {
        while !self.buffer(stderr).is_empty() {
            self.cut(stderr, out);
        }
    }

    /// One chunk of at most `chunk_max_bytes` from a stream's buffer.
    fn cut(&mut self, stderr: bool, out: &mut Vec<Message>) {
        let max = self.shaping.chunk_max_bytes;
        let segments = self.buffer(stderr).take_up_to(max);
        let segments = match &mut self.cap {
            Some(cap) => cap.admit(stderr, segments),
            None => segments,
        };
        self.send_as_is(stderr, segments, out);
    }

    fn send_as_is(&mut self, stderr: bool, segments: Vec<Segment>, out: &mut Vec<Message>) {
        if segments.is_empty() {
            return;
        }
        out.push(Message::Output(OutputRequest {
            chunk_number: self.next_chunk,
            segments,
            is_stderr: stderr,
        }));
        // A checkpoint read from a log holds at most MAX_CHECKPOINT_NUMBER
        // (wal::Checkpoint::check): 2^64 chunks away from overflowing.
        self.next_chunk += 1;
    }

    fn end(&mut self, completion: CompleteRequest, at: f64, out: &mut Vec<Message>) {
        for stderr in [false, true] {
            self.buffer(stderr).finish(at);
            self.flush(stderr, out);
        }
        if let Some(mut cap) = self.cap.take() {
            for (stderr, segments) in cap.finish(at) {
                // The tail may be larger than one chunk.
                let mut buffer = StreamBuffer::default();
                buffer.extend(segments);
                while !buffer.is_empty() {
                    let part = buffer.take_up_to(self.shaping.chunk_max_bytes);
                    self.send_as_is(stderr, part, out);
                }
            }
        }
        out.push(Message::Complete(completion));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::api::CompletionStatus;

    fn read(stderr: bool, text: &[u8]) -> Record {
        Record::Read { stderr, at: 1.0, bytes: text.to_vec() }
    }

    fn end() -> Record {
        Record::meta(Meta::End {
            completion: CompleteRequest { exit_code: 0, status: CompletionStatus::Success },
            at: 2.0,
        })
    }

    fn run(shaping: Shaping, records: &[Record]) -> Vec<Message> {
        let mut pipeline = Pipeline::new(shaping);
        records.iter().flat_map(|r| pipeline.apply(r.clone())).collect()
    }

    fn text(messages: &[Message]) -> String {
        messages
            .iter()
            .filter_map(|m| match m {
                Message::Output(chunk) => {
                    Some(chunk.segments.iter().map(|s| s.content.as_str()).collect::<String>())
                }
                Message::Complete(_) => None,
            })
            .collect()
    }

    #[test]
    fn chunks_never_exceed_chunk_max_bytes_and_are_numbered_in_order() {
        let shaping = Shaping { chunk_max_bytes: 10, ..Shaping::default() };
        let messages = run(shaping, &[read(false, "héllo wörld ✓ and more\n".as_bytes()), end()]);
        for (number, message) in (1..).zip(&messages[..messages.len() - 1]) {
            let Message::Output(chunk) = message else { panic!("chunks first") };
            assert_eq!(chunk.chunk_number, number);
            assert!(chunk.segments.iter().map(|s| s.content.len()).sum::<usize>() <= 10, "{chunk:?}");
        }
        assert_eq!(text(&messages), "héllo wörld ✓ and more\n");
        assert!(matches!(messages.last(), Some(Message::Complete(_))));
    }

    #[test]
    fn a_checkpoint_carries_a_split_character_and_the_numbering() {
        let flush = Record::meta(Meta::Flush { stderr: None });
        let records = [read(false, b"one\n"), flush.clone(), read(false, b"caf\xc3"), flush];
        let mut first = Pipeline::new(Shaping::default());
        let sent: Vec<Message> = records.iter().flat_map(|r| first.apply(r.clone())).collect();
        assert_eq!(text(&sent), "one\ncaf");
        assert!(first.is_clean());
        let mut second = Pipeline::resume(Shaping::default(), &first.checkpoint());
        let rest =
            [read(false, b"\xa9\n"), end()].into_iter().flat_map(|r| second.apply(r)).collect::<Vec<_>>();
        assert_eq!(text(&rest), "\u{e9}\n");
        let Message::Output(chunk) = &rest[0] else { panic!() };
        assert_eq!(chunk.segments[0].timestamp, None, "the line began in chunk 2");
        assert_eq!(chunk.chunk_number, 3);
    }

    /// Failed before the fix: a tampered log's checkpoint made the next
    /// chunk overflow its number (u64::MAX + 1) or the output cap its count.
    #[test]
    fn a_tampered_checkpoint_is_not_replayed() {
        let tampered = Checkpoint { next_chunk: u64::MAX, cap_sent: u64::MAX, ..Checkpoint::default() };
        let bytes: Vec<u8> = [Record::meta(Meta::Checkpoint(tampered)), read(false, b"after\n"), end()]
            .iter()
            .flat_map(Record::frame)
            .collect();
        let mut reader = crate::supervisor::wal::WalReader::new(&bytes[..], 0);
        assert!(matches!(
            reader.next_record(),
            Err(crate::supervisor::wal::TornRecord::Impossible { offset: 0, .. })
        ));
        // The output cap's own count saturates too (a checkpoint from an older runner).
        let shaping = Shaping { output_cap: Some(1024), ..Shaping::default() };
        let mut pipeline = Pipeline::resume(
            shaping,
            &Checkpoint { next_chunk: 1, cap_sent: u64::MAX, ..Checkpoint::default() },
        );
        let mut messages = pipeline.apply(read(false, b"held for the tail\n"));
        messages.extend(pipeline.apply(end()));
        assert_eq!(text(&messages), "held for the tail\n");
    }

    fn shaping() -> impl proptest::strategy::Strategy<Value = Shaping> {
        use proptest::prelude::*;
        let redactor = proptest::option::of(prop::collection::vec("[a-zé✓\n]{6,14}", 1..3))
            .prop_map(|secrets| secrets.and_then(Redactor::new).map(Arc::new));
        let cap = proptest::option::of(prop_oneof![0usize..300, Just(usize::MAX), Just(1024)]);
        (1usize..300, cap, redactor).prop_map(|(chunk_max_bytes, output_cap, redactor)| Shaping {
            chunk_max_bytes,
            output_cap,
            redactor,
        })
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(384))]

        /// Whatever records a log holds (a tampered one included: any
        /// numbers in a checkpoint, any carried bytes, NaN times), replaying
        /// it as the delivery task does gives numbered chunks, never a panic.
        #[test]
        fn any_records_replay_into_numbered_chunks(
            shaping in shaping(),
            records in proptest::collection::vec(crate::supervisor::wal::strategies::hostile_record(), 0..24),
        ) {
            // Through the file format, as recovery reads them: a log ends
            // at the first impossible record.
            let bytes: Vec<u8> = records.iter().flat_map(Record::frame).collect();
            let mut reader = crate::supervisor::wal::WalReader::new(&bytes[..], 0);
            let records = std::iter::from_fn(|| reader.next_record().ok().flatten());
            let mut pipeline = Pipeline::new(shaping.clone());
            let mut last: Option<u64> = None;
            for record in records {
                if let Record::Meta(Meta::Checkpoint(checkpoint)) = &record {
                    pipeline = Pipeline::resume(shaping.clone(), checkpoint);
                    last = None;
                }
                for message in pipeline.apply(record) {
                    if let Message::Output(chunk) = message {
                        proptest::prop_assert!(last.is_none_or(|last| chunk.chunk_number > last), "{:?} after {:?}", chunk.chunk_number, last);
                        last = Some(chunk.chunk_number);
                    }
                }
            }
        }
    }
}
