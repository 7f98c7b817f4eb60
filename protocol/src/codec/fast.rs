//! The cached-`GetToken` fast path: read a `GetToken` request in place and answer
//! it from a token encoded once, with no allocation per request.
//!
//! Both functions produce or accept exactly the bytes of the general codec (the
//! tests compare them with [`super::encode`] and [`super::decode`]), so a peer
//! cannot tell which path served it.

use std::fmt;

use zeroize::Zeroizing;

use super::{encode_frame_into, Error};
use crate::{Response, ResponseFrame, ServerMessage, Token, MAX_FRAME_LEN};

/// `ClientMessage::Request` is variant 1, `Request::GetToken` variant 0.
const CLIENT_REQUEST: u32 = 1;
const REQUEST_GET_TOKEN: u32 = 0;
/// Frame bytes before the request id of a `ServerMessage::Response`:
/// length prefix (4) and the `ServerMessage` variant (4).
const ID_OFFSET: usize = 8;

/// A `GetToken` request borrowed from its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetTokenRef<'a> {
    /// The request id the answer must echo.
    pub id: u64,
    /// The profile name (not yet checked against the name rules).
    pub profile: &'a str,
    /// The validity the caller asks for, in seconds.
    pub min_valid_secs: u64,
}

/// Reads `payload` as `Request { id, GetToken { profile, min_valid_secs } }`
/// without allocating. `None` for anything else, including malformed bytes:
/// decode those with [`super::decode`], which reports the error.
pub fn peek_get_token(payload: &[u8]) -> Option<GetTokenRef<'_>> {
    let mut r = Cursor(payload);
    if r.u32()? != CLIENT_REQUEST {
        return None;
    }
    let id = r.u64()?;
    if r.u32()? != REQUEST_GET_TOKEN {
        return None;
    }
    let len = usize::try_from(r.u64()?).ok()?;
    let profile = std::str::from_utf8(r.take(len)?).ok()?;
    let min_valid_secs = r.u64()?;
    // The general decoder rejects trailing bytes; so does this one.
    r.0.is_empty().then_some(GetTokenRef {
        id,
        profile,
        min_valid_secs,
    })
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// The complete answer frame for one token, encoded once; each request only
/// copies it and stamps its own id. The bytes hold the access token, so they
/// are zeroed on drop and never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct EncodedToken {
    /// `ServerMessage::Response(ResponseFrame { id: 0, result: Ok(Response::Token(..)) })`
    /// with its length prefix.
    frame: Zeroizing<Vec<u8>>,
    generation: u64,
}

impl EncodedToken {
    /// Encodes the answer to a `GetToken` that returns `token`. Fails only when
    /// the token does not fit in one frame.
    pub fn new(token: &Token) -> Result<Self, Error> {
        let mut frame = Zeroizing::new(Vec::new());
        // Once per token, not per request, so the clone is fine.
        encode_frame_into(
            &ServerMessage::Response(ResponseFrame {
                id: 0,
                result: Ok(Response::Token(token.clone())),
            }),
            &mut frame,
        )?;
        debug_assert!(frame.len() <= MAX_FRAME_LEN + 4);
        Ok(EncodedToken {
            frame,
            generation: token.generation,
        })
    }

    /// Replaces `out` with the frame answering request `id`.
    pub fn write_frame(&self, id: u64, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.frame);
        out[ID_OFFSET..ID_OFFSET + 8].copy_from_slice(&id.to_le_bytes());
    }

    /// Length of the answer frame, prefix included.
    pub fn frame_len(&self) -> usize {
        self.frame.len()
    }

    /// The generation of the encoded token.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl fmt::Debug for EncodedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncodedToken")
            .field("generation", &self.generation)
            .field("frame", &"[redacted]")
            .finish()
    }
}
