//! Framing: every message travels as a `u32` little-endian payload length
//! followed by the bincode payload. This is the only module that knows about
//! bincode, so its configuration is fixed in one place.
//!
//! Reading uses tokio-util's length-delimited codec, which refuses an
//! announced length above [`MAX_FRAME_LEN`] before allocating anything.
//! Writing goes through `sendmsg(2)` because a `Run` request must carry the
//! job's stdout/stderr descriptors (SCM_RIGHTS), which tokio cannot send.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use bincode::config::{Configuration, Fixint, Limit, LittleEndian};
use bincode::{Decode, Encode};
use futures_util::StreamExt;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::{AsyncRead, Interest};
use tokio::net::unix::OwnedWriteHalf;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

/// Largest payload either side accepts. Command discovery of a big project
/// (hundreds of commands with their help) stays far below it.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Fixed-width little-endian integers keep the Python codec trivial; the
/// limit caps what a hostile length inside a payload can make us allocate.
const CONFIG: Configuration<LittleEndian, Fixint, Limit<MAX_FRAME_LEN>> =
    bincode::config::standard().with_little_endian().with_fixed_int_encoding().with_limit::<MAX_FRAME_LEN>();

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame is {len} bytes, above the {MAX_FRAME_LEN}-byte limit")]
    TooLarge { len: usize },
    #[error("peer announced a frame above the {MAX_FRAME_LEN}-byte limit")]
    LengthAboveLimit,
    #[error("undecodable frame: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("frame has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
    #[error("message cannot be encoded: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// The bincode payload of `message`, without the length prefix.
pub fn encode_payload<T: Encode>(message: &T) -> Result<Vec<u8>, FrameError> {
    let payload = bincode::encode_to_vec(message, CONFIG)?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len: payload.len() });
    }
    Ok(payload)
}

/// `message` as a complete frame: length prefix and payload.
pub fn encode_frame<T: Encode>(message: &T) -> Result<Vec<u8>, FrameError> {
    let payload = encode_payload(message)?;
    let len = u32::try_from(payload.len()).expect("payload length is capped far below u32::MAX");
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Decodes one payload; any byte left over is an error, not ignored.
pub fn decode_payload<T: Decode<()>>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len: payload.len() });
    }
    let (message, used) = bincode::decode_from_slice(payload, CONFIG)?;
    match payload.len() - used {
        0 => Ok(message),
        extra => Err(FrameError::TrailingBytes(extra)),
    }
}

/// Reads decoded messages from a byte stream.
pub struct FrameReader<R> {
    frames: FramedRead<R, LengthDelimitedCodec>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(reader: R) -> Self {
        let codec = LengthDelimitedCodec::builder()
            .little_endian()
            .length_field_length(4)
            .max_frame_length(MAX_FRAME_LEN)
            .new_codec();
        Self { frames: FramedRead::new(reader, codec) }
    }

    /// The next message, or `None` on a clean end of stream.
    pub async fn next<T: Decode<()>>(&mut self) -> Result<Option<T>, FrameError> {
        match self.frames.next().await {
            None => Ok(None),
            Some(Ok(payload)) => decode_payload(&payload).map(Some),
            // The codec's only InvalidData error is an announced length above the limit.
            Some(Err(err)) if err.kind() == io::ErrorKind::InvalidData => Err(FrameError::LengthAboveLimit),
            Some(Err(err)) => Err(err.into()),
        }
    }
}

/// Writes frames, optionally with file descriptors attached.
pub struct FrameWriter {
    socket: OwnedWriteHalf,
}

impl FrameWriter {
    pub fn new(socket: OwnedWriteHalf) -> Self {
        Self { socket }
    }

    /// Sends `message`; `fds` (possibly empty) ride with its first byte.
    pub async fn send<T: Encode>(&mut self, message: &T, fds: &[BorrowedFd<'_>]) -> Result<(), FrameError> {
        let frame = encode_frame(message)?;
        let raw_fds: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let mut sent = 0;
        while sent < frame.len() {
            // Descriptors go with the first sendmsg only; a partial write
            // leaves the rest of the bytes to plain follow-up writes.
            let attach: &[RawFd] = if sent == 0 { &raw_fds } else { &[] };
            let stream = self.socket.as_ref();
            sent += stream
                .async_io(Interest::WRITABLE, || send_with_fds(stream.as_raw_fd(), &frame[sent..], attach))
                .await?;
        }
        Ok(())
    }
}

impl FrameWriter {
    /// Shuts our sending direction: the worker reads EOF and exits, killing
    /// its jobs, even while other handles to the connection remain.
    pub async fn close(&mut self) -> io::Result<()> {
        tokio::io::AsyncWriteExt::shutdown(&mut self.socket).await
    }
}

fn send_with_fds(socket: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &[ControlMessage::ScmRights(fds)] };
    sendmsg::<()>(socket, &[IoSlice::new(bytes)], cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::ipc::strategies::{event, request};
    use crate::ipc::{Event, Request};
    use crate::proptest_support::{config, mutate, mutations};
    use proptest::prelude::*;

    /// Every message a stream of frames holds, up to the first error or
    /// the end; at most `limit` (each frame is at least 4 bytes).
    fn read_all(bytes: &[u8], limit: usize) -> (Vec<Event>, Option<FrameError>) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
        runtime.block_on(async {
            let mut reader = FrameReader::new(bytes);
            let mut events = Vec::new();
            for _ in 0..=limit {
                match reader.next::<Event>().await {
                    Ok(Some(event)) => events.push(event),
                    Ok(None) => return (events, None),
                    Err(error) => return (events, Some(error)),
                }
            }
            panic!("more messages than frames in {} bytes", bytes.len())
        })
    }

    proptest! {
        #![proptest_config(config(512))]

        #[test]
        fn random_payloads_decode_or_are_refused(payload in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_payload::<Event>(&payload);
            let _ = decode_payload::<Request>(&payload);
        }

        #[test]
        fn every_message_round_trips(event in event(), request in request()) {
            prop_assert_eq!(decode_payload::<Event>(&encode_payload(&event).unwrap()).unwrap(), event);
            prop_assert_eq!(decode_payload::<Request>(&encode_payload(&request).unwrap()).unwrap(), request);
        }

        /// Valid frames, cut, flipped, spliced or given absurd lengths: the
        /// reader yields messages and then an error or the end, never a panic.
        #[test]
        fn mutated_streams_of_frames_never_panic_the_reader(
            events in prop::collection::vec(event(), 1..4),
            changes in mutations(),
        ) {
            let stream: Vec<u8> = events.iter().flat_map(|e| encode_frame(e).unwrap()).collect();
            let damaged = mutate(stream, &changes);
            let (read, _) = read_all(&damaged, damaged.len() / 4 + 1);
            prop_assert!(read.len() <= damaged.len() / 4);
        }

        #[test]
        fn random_streams_never_panic_the_reader(stream in prop::collection::vec(any::<u8>(), 0..256)) {
            read_all(&stream, stream.len() / 4 + 1);
        }

        /// A length above the limit is refused from the prefix alone:
        /// nothing of that size is allocated or waited for.
        #[test]
        fn lengths_above_the_limit_are_refused_before_reading_the_payload(
            len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX,
        ) {
            let (read, error) = read_all(&len.to_le_bytes(), 1);
            prop_assert!(read.is_empty());
            prop_assert!(matches!(error, Some(FrameError::LengthAboveLimit)), "{:?}", error);
        }
    }

    /// A collection inside a payload announcing 2^62 elements fails on the
    /// decoder's byte limit, before anything of that size is allocated.
    #[test]
    fn huge_lengths_inside_a_payload_are_refused_without_allocating() {
        // Event::Commands is variant 2 (u32), then its Vec length (u64).
        let mut payload = 2u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(matches!(decode_payload::<Event>(&payload), Err(FrameError::Decode(_))));
        // A string (the error of StartupFailed, variant 1) as long as the address space.
        let mut payload = 1u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&5u32.to_le_bytes());
        payload.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode_payload::<Event>(&payload), Err(FrameError::Decode(_))));
    }
}
