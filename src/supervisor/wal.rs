//! The output log's file format: one file per execution in the state
//! directory, a sequence of framed, checksummed records.
//!
//! A frame is `length (u32 LE) | CRC-32 of the payload (u32 LE) | payload`.
//! Records are read back as bytes, so invalid UTF-8 in the output never
//! makes a record (let alone the file) unreadable; a frame that is cut short
//! or fails its checksum ends the readable log (it can only be the tail: the
//! writer truncates a failed write before appending anything else).
//!
//! The log holds what was *read* from the command (raw bytes with their
//! time), where chunks were cut, notes, the real completion, and what the
//! control plane acknowledged; [`super::replay`] turns it into messages.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use crate::protocol::api::CompleteRequest;

/// A frame longer than this is corruption, not a record (reads are 64 KiB).
pub const MAX_PAYLOAD: usize = 4 * 1024 * 1024;
const HEADER: usize = 8;
const KIND_READ: u8 = 1;
const KIND_META: u8 = 2;

/// One entry of an execution's log.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Bytes read from the command's stdout or stderr at `at` (unix seconds).
    Read { stderr: bool, at: f64, bytes: Vec<u8> },
    /// Everything else: small, and JSON is good enough for those.
    Meta(Meta),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Meta {
    /// The stream reached its end.
    Eof { stderr: bool, at: f64 },
    /// Cut the buffered text of a stream (both when `stderr` is None) into chunks.
    Flush { stderr: Option<bool> },
    /// A line of the runner's own, sent as a chunk of its own.
    Note { stderr: bool, at: f64, text: String },
    /// Output that could not be kept (disk full or log over its cap).
    Dropped { bytes: u64 },
    /// The command's real completion.
    End { completion: CompleteRequest, at: f64 },
    /// The control plane acknowledged every chunk up to this number.
    Acked { chunk: u64 },
    /// The control plane acknowledged the completion.
    AckedEnd,
    /// Starts a compacted log: everything before was delivered.
    Checkpoint(Checkpoint),
}

/// Where delivery stood when the log was compacted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub next_chunk: u64,
    /// Bytes the output cap had already let through.
    pub cap_sent: u64,
    pub stdout: Carry,
    pub stderr: Carry,
}

/// The largest chunk number (and count of bytes) a checkpoint may hold:
/// 2^53, the largest integer every JSON reader keeps exact. A runner
/// sending a chunk every millisecond would need 285 000 years to reach it.
pub const MAX_CHECKPOINT_NUMBER: u64 = 1 << 53;

/// Why a well-framed checkpoint cannot have been written by a runner (the
/// log was tampered with, or written by a bug): replayed, its numbers would
/// overflow or send chunk 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImpossibleCheckpoint {
    #[error("next chunk {0} is not between 1 and {MAX_CHECKPOINT_NUMBER}")]
    ChunkNumber(u64),
    #[error("{0} bytes let through the output cap, above {MAX_CHECKPOINT_NUMBER}")]
    CapSent(u64),
    #[error("{0} bytes of an unfinished character carried, but a character has at most 4")]
    Incomplete(usize),
}

impl Checkpoint {
    /// Whether a runner can have written this checkpoint.
    pub fn check(&self) -> Result<(), ImpossibleCheckpoint> {
        if !(1..=MAX_CHECKPOINT_NUMBER).contains(&self.next_chunk) {
            return Err(ImpossibleCheckpoint::ChunkNumber(self.next_chunk));
        }
        if self.cap_sent > MAX_CHECKPOINT_NUMBER {
            return Err(ImpossibleCheckpoint::CapSent(self.cap_sent));
        }
        for carry in [&self.stdout, &self.stderr] {
            // The start of a UTF-8 character is at most 3 of its 4 bytes.
            if carry.incomplete.len() > 3 {
                return Err(ImpossibleCheckpoint::Incomplete(carry.incomplete.len()));
            }
        }
        Ok(())
    }
}

/// What a stream's decoder carries from one chunk to the next.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Carry {
    pub continues_line: bool,
    /// The start of a UTF-8 character whose other bytes had not arrived.
    pub incomplete: Vec<u8>,
    /// Text the redactor held back.
    pub held: String,
}

impl Record {
    pub fn meta(meta: Meta) -> Self {
        Record::Meta(meta)
    }

    /// Bytes of output this record holds (what memory limits count).
    pub fn weight(&self) -> usize {
        match self {
            Record::Read { bytes, .. } => 32 + bytes.len(),
            Record::Meta(Meta::Note { text, .. }) => 64 + text.len(),
            Record::Meta(_) => 64,
        }
    }

    fn payload(&self) -> Vec<u8> {
        match self {
            Record::Read { stderr, at, bytes } => {
                let mut payload = Vec::with_capacity(10 + bytes.len());
                payload.push(KIND_READ);
                payload.push(u8::from(*stderr));
                payload.extend_from_slice(&at.to_le_bytes());
                payload.extend_from_slice(bytes);
                payload
            }
            Record::Meta(meta) => {
                let mut payload = vec![KIND_META];
                // Serializing these plain types cannot fail.
                payload.extend(serde_json::to_vec(meta).unwrap_or_default());
                payload
            }
        }
    }

    fn from_payload(payload: &[u8]) -> Option<Self> {
        match payload.split_first()? {
            (&KIND_READ, rest) if rest.len() >= 9 => {
                let at = f64::from_le_bytes(rest[1..9].try_into().ok()?);
                Some(Record::Read { stderr: rest[0] != 0, at, bytes: rest[9..].to_vec() })
            }
            (&KIND_META, rest) => serde_json::from_slice(rest).ok().map(Record::Meta),
            _ => None,
        }
    }

    /// The record as a frame, ready to append.
    pub fn frame(&self) -> Vec<u8> {
        let payload = self.payload();
        let mut frame = Vec::with_capacity(HEADER + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        frame
    }
}

/// Why reading stopped before the end of the file.
#[derive(Debug, thiserror::Error)]
pub enum TornRecord {
    #[error("a record at byte {offset} is cut short")]
    Short { offset: u64 },
    #[error("a record at byte {offset} fails its checksum or length check")]
    Corrupt { offset: u64 },
    #[error("cannot read the log at byte {offset}: {error}")]
    Io { offset: u64, error: io::Error },
    #[error("the checkpoint at byte {offset} is impossible: {reason}")]
    Impossible { offset: u64, reason: ImpossibleCheckpoint },
}

/// Reads records one at a time (memory: one record), tracking the offset of
/// the end of the last good one.
pub struct WalReader<R> {
    source: R,
    offset: u64,
}

impl<R: Read> WalReader<R> {
    pub fn new(source: R, offset: u64) -> Self {
        Self { source, offset }
    }

    /// Bytes of good records read so far (plus the starting offset).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next record; `Ok(None)` at a clean end of file.
    pub fn next_record(&mut self) -> Result<Option<Record>, TornRecord> {
        loop {
            let offset = self.offset;
            let Some(payload) = self.next_payload()? else { return Ok(None) };
            // A well-framed record this version cannot decode is skipped, not fatal.
            match Record::from_payload(&payload) {
                Some(Record::Meta(Meta::Checkpoint(checkpoint))) => {
                    if let Err(reason) = checkpoint.check() {
                        // Damage like a bad checksum: the log ends before it.
                        self.offset = offset;
                        return Err(TornRecord::Impossible { offset, reason });
                    }
                    return Ok(Some(Record::Meta(Meta::Checkpoint(checkpoint))));
                }
                Some(record) => return Ok(Some(record)),
                None => tracing::warn!("skipped an unknown record at byte {offset} of an output log"),
            }
        }
    }

    fn next_payload(&mut self) -> Result<Option<Vec<u8>>, TornRecord> {
        let offset = self.offset;
        let mut header = [0u8; HEADER];
        match read_full(&mut self.source, &mut header) {
            Ok(0) => return Ok(None),
            Ok(HEADER) => {}
            Ok(_) => return Err(TornRecord::Short { offset }),
            Err(error) => return Err(TornRecord::Io { offset, error }),
        }
        let length = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let checksum = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        // Every record has a kind byte: a zero length is a hole, not a record.
        if length == 0 || length > MAX_PAYLOAD {
            return Err(TornRecord::Corrupt { offset });
        }
        let mut payload = vec![0u8; length];
        match read_full(&mut self.source, &mut payload) {
            Ok(read) if read == length => {}
            Ok(_) => return Err(TornRecord::Short { offset }),
            Err(error) => return Err(TornRecord::Io { offset, error }),
        }
        if crc32fast::hash(&payload) != checksum {
            return Err(TornRecord::Corrupt { offset });
        }
        self.offset += (HEADER + length) as u64;
        Ok(Some(payload))
    }
}

/// Reads until `buffer` is full or the end of the file; the bytes read.
fn read_full(source: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match source.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::api::CompletionStatus;

    fn records() -> Vec<Record> {
        vec![
            Record::Read { stderr: false, at: 1.5, bytes: b"caf\xc3".to_vec() },
            Record::Read { stderr: true, at: 2.0, bytes: b"\xff\xfe not utf-8\n".to_vec() },
            Record::meta(Meta::Flush { stderr: None }),
            Record::meta(Meta::End {
                completion: CompleteRequest { exit_code: 0, status: CompletionStatus::Success },
                at: 3.0,
            }),
        ]
    }

    fn read_all(bytes: &[u8]) -> (Vec<Record>, Option<TornRecord>, u64) {
        let mut reader = WalReader::new(bytes, 0);
        let mut read = Vec::new();
        loop {
            match reader.next_record() {
                Ok(Some(record)) => read.push(record),
                Ok(None) => return (read, None, reader.offset()),
                Err(torn) => return (read, Some(torn), reader.offset()),
            }
        }
    }

    #[test]
    fn records_round_trip_as_bytes_whatever_their_encoding() {
        let bytes: Vec<u8> = records().iter().flat_map(Record::frame).collect();
        let (read, torn, offset) = read_all(&bytes);
        assert_eq!(read, records());
        assert!(torn.is_none());
        assert_eq!(offset, bytes.len() as u64);
    }

    #[test]
    fn a_torn_tail_is_detected_and_everything_before_it_kept() {
        let good: Vec<u8> = records()[..3].iter().flat_map(Record::frame).collect();
        let last = records()[3].frame();
        for cut in 1..last.len() {
            let mut bytes = good.clone();
            bytes.extend_from_slice(&last[..cut]);
            let (read, torn, offset) = read_all(&bytes);
            assert_eq!(read, records()[..3], "cut at {cut}");
            assert!(torn.is_some(), "cut at {cut}");
            assert_eq!(offset, good.len() as u64, "the good length to truncate to");
        }
    }

    #[test]
    fn a_flipped_bit_or_an_absurd_length_is_caught() {
        let mut bytes = records()[0].frame();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        assert!(matches!(read_all(&bytes).1, Some(TornRecord::Corrupt { .. })));
        let mut huge = vec![0xff; 8];
        huge.extend_from_slice(b"rest");
        assert!(matches!(read_all(&huge).1, Some(TornRecord::Corrupt { .. })));
        let hole = vec![0u8; 64];
        assert!(matches!(read_all(&hole).1, Some(TornRecord::Corrupt { offset: 0 })), "zeros are no records");
    }

    /// Failed before the fix (replayed, such a checkpoint overflowed the
    /// chunk numbers or the output cap's count, see replay's tests).
    #[test]
    fn an_impossible_checkpoint_ends_the_log_before_it() {
        let good = records()[0].frame();
        let sound = Checkpoint { next_chunk: 1, ..Checkpoint::default() };
        let impossible = [
            (Checkpoint { next_chunk: 0, ..sound.clone() }, ImpossibleCheckpoint::ChunkNumber(0)),
            (
                Checkpoint { next_chunk: u64::MAX, ..sound.clone() },
                ImpossibleCheckpoint::ChunkNumber(u64::MAX),
            ),
            (Checkpoint { cap_sent: u64::MAX, ..sound.clone() }, ImpossibleCheckpoint::CapSent(u64::MAX)),
            (
                Checkpoint {
                    stderr: Carry { incomplete: vec![0xe2; 4], ..Carry::default() },
                    ..sound.clone()
                },
                ImpossibleCheckpoint::Incomplete(4),
            ),
        ];
        for (checkpoint, reason) in impossible {
            let mut bytes = good.clone();
            bytes.extend(Record::meta(Meta::Checkpoint(checkpoint)).frame());
            bytes.extend(records()[1].frame());
            let (read, torn, offset) = read_all(&bytes);
            assert_eq!(read, records()[..1]);
            let expected = TornRecord::Impossible { offset: good.len() as u64, reason };
            assert_eq!(torn.map(|t| t.to_string()), Some(expected.to_string()));
            assert_eq!(offset, good.len() as u64, "the log is cut before it");
        }
        let mut bytes = good.clone();
        bytes.extend(Record::meta(Meta::Checkpoint(sound)).frame());
        assert!(read_all(&bytes).1.is_none(), "a sound checkpoint is read");
    }

    fn read_all_of(bytes: &[u8]) -> (Vec<Record>, Option<TornRecord>, u64) {
        read_all(bytes)
    }

    /// The offset after each record of `records`, framed back to back.
    fn boundaries(records: &[Record]) -> Vec<u64> {
        let mut end = 0;
        let mut ends = vec![0];
        for record in records {
            end += record.frame().len() as u64;
            ends.push(end);
        }
        ends
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(384))]

        /// A file of any bytes (tampering, another program's file): records
        /// or an error, an offset inside the file, never a panic.
        #[test]
        fn any_bytes_are_read_up_to_the_damage(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let (_, _, offset) = read_all_of(&bytes);
            proptest::prop_assert!(offset <= bytes.len() as u64);
        }

        /// A log cut anywhere (a crash mid-write) gives back every whole
        /// record before the cut, says it is torn unless the cut falls
        /// between records, and the offset to truncate to is that boundary.
        #[test]
        fn a_log_cut_anywhere_keeps_every_whole_record(
            records in proptest::collection::vec(strategies::record(), 1..8),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let bytes: Vec<u8> = records.iter().flat_map(Record::frame).collect();
            let cut = cut.index(bytes.len() + 1);
            let (read, torn, offset) = read_all_of(&bytes[..cut]);
            let ends = boundaries(&records);
            let whole = ends.iter().filter(|end| **end <= cut as u64).count() - 1;
            proptest::prop_assert_eq!(&read[..], &records[..whole]);
            proptest::prop_assert_eq!(offset, ends[whole]);
            proptest::prop_assert_eq!(torn.is_some(), ends[whole] != cut as u64);
        }

        /// Flipped bits, changed lengths, inserted or removed bytes: what is
        /// read is the records before the damage, unchanged.
        #[test]
        fn a_damaged_log_is_read_up_to_the_damage(
            records in proptest::collection::vec(strategies::record(), 1..8),
            changes in crate::proptest_support::mutations(),
        ) {
            let bytes: Vec<u8> = records.iter().flat_map(Record::frame).collect();
            let damaged = crate::proptest_support::mutate(bytes, &changes);
            let (read, _, offset) = read_all_of(&damaged);
            proptest::prop_assert!(offset <= damaged.len() as u64);
            proptest::prop_assert!(read.len() <= records.len() + 1);
        }
    }
}

/// Any record, including those only tampering can write (any number in a
/// checkpoint, any bytes in a carry, NaN times): what the readers of a log
/// must survive.
#[cfg(test)]
pub(crate) mod strategies {
    use super::*;
    use crate::protocol::api::CompletionStatus;
    use proptest::prelude::*;

    fn number() -> impl Strategy<Value = u64> {
        prop_oneof![any::<u64>(), Just(0u64), Just(1), Just(u64::MAX), Just(u64::MAX - 1), 0u64..100]
    }

    /// Times as the writer writes them (finite; a non-finite one in a
    /// JSON record reads back as no record) or, `hostile`, any.
    fn time(hostile: bool) -> BoxedStrategy<f64> {
        if hostile {
            prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), Just(-1.0)].boxed()
        } else {
            prop_oneof![-1e12f64..1e12, Just(1_750_000_000.5), Just(0.0)].boxed()
        }
    }

    /// What a runner carries, or (`hostile`) any bytes.
    fn carry(hostile: bool) -> impl Strategy<Value = Carry> {
        let incomplete = if hostile { 0..6 } else { 0..4 };
        (any::<bool>(), prop::collection::vec(any::<u8>(), incomplete), ".{0,8}")
            .prop_map(|(continues_line, incomplete, held)| Carry { continues_line, incomplete, held })
    }

    /// A checkpoint a runner writes, or (`hostile`) any numbers.
    pub fn checkpoint(hostile: bool) -> BoxedStrategy<Checkpoint> {
        let numbers = if hostile {
            (number(), number()).boxed()
        } else {
            (1..=MAX_CHECKPOINT_NUMBER, 0..=MAX_CHECKPOINT_NUMBER).boxed()
        };
        (numbers, carry(hostile), carry(hostile))
            .prop_map(|((next_chunk, cap_sent), stdout, stderr)| Checkpoint {
                next_chunk,
                cap_sent,
                stdout,
                stderr,
            })
            .boxed()
    }

    fn completion() -> impl Strategy<Value = CompleteRequest> {
        let status = prop_oneof![
            Just(CompletionStatus::Success),
            Just(CompletionStatus::Failed),
            Just(CompletionStatus::Cancelled),
            Just(CompletionStatus::TimedOut),
        ];
        (any::<i32>(), status).prop_map(|(exit_code, status)| CompleteRequest { exit_code, status })
    }

    pub fn meta(hostile: bool) -> impl Strategy<Value = Meta> {
        let time = || time(hostile);
        prop_oneof![
            (any::<bool>(), time()).prop_map(|(stderr, at)| Meta::Eof { stderr, at }),
            proptest::option::of(any::<bool>()).prop_map(|stderr| Meta::Flush { stderr }),
            (any::<bool>(), time(), ".{0,16}").prop_map(|(stderr, at, text)| Meta::Note { stderr, at, text }),
            number().prop_map(|bytes| Meta::Dropped { bytes }),
            (completion(), time()).prop_map(|(completion, at)| Meta::End { completion, at }),
            number().prop_map(|chunk| Meta::Acked { chunk }),
            Just(Meta::AckedEnd),
            checkpoint(hostile).prop_map(Meta::Checkpoint),
        ]
    }

    /// Output bytes: text, split characters, invalid UTF-8.
    pub fn output_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..48),
            ".{0,24}".prop_map(String::into_bytes),
            prop::collection::vec(prop::sample::select(&b"ab\n\xc3\xa9\xe2\x9c\x93\xff"[..]), 0..32),
        ]
    }

    /// A record as this runner writes it.
    pub fn record() -> impl Strategy<Value = Record> {
        any_record(false)
    }

    /// Also what only tampering writes: non-finite times.
    pub fn hostile_record() -> impl Strategy<Value = Record> {
        any_record(true)
    }

    fn any_record(hostile: bool) -> impl Strategy<Value = Record> {
        prop_oneof![
            3 => (any::<bool>(), time(hostile), output_bytes())
                .prop_map(|(stderr, at, bytes)| Record::Read { stderr, at, bytes }),
            2 => meta(hostile).prop_map(Record::Meta),
        ]
    }
}
