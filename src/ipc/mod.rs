//! The supervisor ⇄ worker protocol: the messages (`messages`) and how they
//! travel over the Unix socket the two processes share (`frame`).
//! See `docs/ipc.md` for the wire format.

mod frame;
mod messages;

pub use frame::{
    decode_payload, encode_frame, encode_payload, FrameError, FrameReader, FrameWriter, MAX_FRAME_LEN,
};
pub use messages::*;
