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
}
