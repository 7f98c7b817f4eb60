//! Framing and encoding: the only module that knows about bincode.
//!
//! A frame is a 4-byte big-endian length prefix (tokio-util's `LengthDelimitedCodec`)
//! followed by a payload of at most [`MAX_FRAME_LEN`] bytes. The payload is bincode
//! 1.3 with fixed-width little-endian integers, a size limit equal to the frame cap,
//! and no trailing bytes allowed. `WIRE.md` spells out the bytes; golden tests pin them.
//!
//! bincode is pinned at 1.3.3 because upstream has stopped (3.0.0 is a tombstone).
//! Keeping it behind [`WireCodec`] means a replacement touches this file only, and
//! the golden tests will say whether the bytes moved (which would need a
//! [`crate::PROTOCOL_VERSION`] bump).

use std::pin::Pin;
use std::time::Duration;

use bincode::Options;
use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};
use zeroize::Zeroize;

use crate::{Error, MAX_FRAME_LEN, STALL_TIMEOUT};

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_FRAME_LEN as u64)
        .reject_trailing_bytes()
}

/// The payload codec, usable wherever tokio-serde expects one.
#[derive(Debug, Default, Clone, Copy)]
pub struct WireCodec;

impl<T: Serialize> tokio_serde::Serializer<T> for WireCodec {
    type Error = Error;

    fn serialize(self: Pin<&mut Self>, item: &T) -> Result<Bytes, Error> {
        encode(item).map(Bytes::from)
    }
}

impl<T: DeserializeOwned> tokio_serde::Deserializer<T> for WireCodec {
    type Error = Error;

    fn deserialize(self: Pin<&mut Self>, src: &BytesMut) -> Result<T, Error> {
        decode(src)
    }
}

/// Encodes one message payload (no length prefix).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, Error> {
    options()
        .serialize(msg)
        .map_err(|e| Error::Encode(e.to_string()))
}

/// Decodes one message payload (no length prefix).
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Error> {
    options()
        .deserialize(payload)
        .map_err(|e| Error::Decode(e.to_string()))
}

/// Encodes one complete frame: length prefix and payload.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    encode_frame_into(msg, &mut out)?;
    Ok(out)
}

/// Replaces `out` with one complete frame, reusing its capacity: no allocation
/// once `out` is large enough. On error `out` is left empty.
pub fn encode_frame_into<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), Error> {
    out.clear();
    out.extend_from_slice(&[0; 4]);
    if let Err(e) = options().serialize_into(&mut *out, msg) {
        out.zeroize();
        return Err(Error::Encode(e.to_string()));
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Reads the protocol version from a `Hello` payload without decoding the rest.
///
/// `Hello` is variant 0 of `ClientMessage` and starts with `protocol_version` in
/// every version, so this works even for a newer client whose `Hello` grew fields.
pub fn peek_hello_version(payload: &[u8]) -> Option<u32> {
    let tag = u32::from_le_bytes(payload.get(0..4)?.try_into().ok()?);
    let version = u32::from_le_bytes(payload.get(4..8)?.try_into().ok()?);
    (tag == 0).then_some(version)
}

/// The length-prefix codec with our frame cap.
pub fn length_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

/// Free buffer space kept before each read: more than a `GetToken` request or a
/// typical token answer, so each arrives in one read (and a short read tells
/// tokio the socket is drained, which saves a `EAGAIN` read). Small enough that
/// thousands of idle connections cost little.
const READ_ROOM: usize = 512;

/// Reads frames from a byte stream.
///
/// Invariants: a single frame never makes it buffer more than the frame cap plus
/// one header; an idle connection (no partial frame) may wait forever, but once
/// the first byte of a frame has arrived the rest must follow within the stall
/// timeout. `read_frame` is cancel-safe: all progress lives in `self`.
pub struct FrameReader<R> {
    inner: R,
    codec: LengthDelimitedCodec,
    wire: WireCodec,
    buf: BytesMut,
    stall: Duration,
    deadline: Option<Instant>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader with the default [`STALL_TIMEOUT`].
    pub fn new(inner: R) -> Self {
        Self::with_stall_timeout(inner, STALL_TIMEOUT)
    }

    /// A reader that gives up on a partial frame after `stall`.
    pub fn with_stall_timeout(inner: R, stall: Duration) -> Self {
        FrameReader {
            inner,
            codec: length_codec(),
            wire: WireCodec,
            buf: BytesMut::new(),
            stall,
            deadline: None,
        }
    }

    /// The next frame's payload, or `None` on a clean end of stream between frames.
    pub async fn read_frame(&mut self) -> Result<Option<BytesMut>, Error> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(frame)) => {
                    self.deadline = None;
                    return Ok(Some(frame));
                }
                Ok(None) => {}
                Err(_) => {
                    // The only decode error of LengthDelimitedCodec is an oversized header.
                    let len = self.buf.get(0..4).map_or(0, |h| {
                        u32::from_be_bytes(h.try_into().expect("4 bytes")) as usize
                    });
                    return Err(Error::FrameTooLarge {
                        len,
                        max: MAX_FRAME_LEN,
                    });
                }
            }
            if !self.buf.is_empty() && self.deadline.is_none() {
                self.deadline = Some(Instant::now() + self.stall);
            }
            // Room for a whole small frame, so it arrives in one read; the
            // allocation is reused once the earlier frames are dropped.
            if self.buf.capacity() - self.buf.len() < READ_ROOM {
                self.buf.reserve(READ_ROOM);
            }
            let read = self.inner.read_buf(&mut self.buf);
            let n = match self.deadline {
                None => read.await?,
                Some(deadline) => tokio::time::timeout_at(deadline, read)
                    .await
                    .map_err(|_| Error::Stalled)??,
            };
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Error::Truncated)
                };
            }
        }
    }

    /// The next decoded message, or `None` on a clean end of stream.
    ///
    /// The frame bytes are zeroed after decoding, since they may hold a token.
    pub async fn read_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, Error> {
        let Some(mut frame) = self.read_frame().await? else {
            return Ok(None);
        };
        let result = tokio_serde::Deserializer::<T>::deserialize(Pin::new(&mut self.wire), &frame);
        frame.zeroize_bytes();
        result.map(Some)
    }
}

/// Writes frames to a byte stream, zeroing its buffers after each write.
pub struct FrameWriter<W> {
    inner: W,
    codec: LengthDelimitedCodec,
    wire: WireCodec,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer over `inner`.
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            codec: length_codec(),
            wire: WireCodec,
            buf: BytesMut::new(),
        }
    }

    /// Encodes and writes one message, then flushes.
    pub async fn write_message<T: Serialize>(&mut self, msg: &T) -> Result<(), Error> {
        let payload = tokio_serde::Serializer::<T>::serialize(Pin::new(&mut self.wire), msg)?;
        self.buf.clear();
        let framed = self.codec.encode(payload.clone(), &mut self.buf);
        if let Ok(mut unique) = payload.try_into_mut() {
            unique.zeroize_bytes();
        }
        framed.map_err(|e| Error::Encode(e.to_string()))?;
        let written = self.inner.write_all(&self.buf).await;
        self.buf.zeroize_bytes();
        written?;
        self.inner.flush().await?;
        Ok(())
    }

    /// The underlying stream, for callers that take over the writing.
    pub fn into_inner(self) -> W {
        self.inner
    }

    /// Writes raw bytes (tests use it to send malformed input).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.inner.write_all(bytes).await?;
        self.inner.flush().await?;
        Ok(())
    }

    /// Shuts down the write side.
    pub async fn shutdown(&mut self) -> Result<(), Error> {
        self.inner.shutdown().await?;
        Ok(())
    }
}

trait ZeroizeBytes {
    fn zeroize_bytes(&mut self);
}

impl ZeroizeBytes for BytesMut {
    fn zeroize_bytes(&mut self) {
        self.as_mut().zeroize();
    }
}

mod fast;
pub use fast::{peek_get_token, EncodedToken, GetTokenRef};

#[cfg(test)]
mod tests;
