//! The write side of one connection: one frame on the wire at a time, written
//! with non-blocking `try_write` from the connection's own task, so an answer
//! that fits in the socket buffer costs one syscall and no task hop.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use kontext_broker_protocol::codec::{self, EncodedToken};
use kontext_broker_protocol::{BrokerError, FrameWriter, ResponseFrame, ServerMessage};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::error;
use zeroize::Zeroize;

use super::WRITE_TIMEOUT;

/// How a connection's writing ended.
#[derive(Debug)]
pub(super) enum WriteEnd {
    /// Everything owed was written (or nothing more can be).
    Done,
    /// The socket failed (peer gone).
    Failed(io::Error),
    /// The peer did not take the frame within the write timeout.
    TimedOut,
    /// A pushed message could not be encoded; nothing sensible can follow.
    Unencodable,
}

/// The frame being written and how far it got. Invariant: `written < frame.len()`
/// exactly while a frame is pending; then nothing else may be written.
pub(super) struct Output {
    half: OwnedWriteHalf,
    /// The frame on the wire; reused, so steady-state writes allocate nothing.
    frame: Vec<u8>,
    written: usize,
    /// Time the pending frame may take once the socket is full.
    limit: Duration,
    /// Armed the first time the socket refuses bytes of the pending frame.
    deadline: Option<Instant>,
}

impl Output {
    pub(super) fn new(half: OwnedWriteHalf) -> Self {
        Output {
            half,
            frame: Vec::with_capacity(1024),
            written: 0,
            limit: Duration::ZERO,
            deadline: None,
        }
    }

    /// True while a frame is partly written.
    pub(super) fn is_pending(&self) -> bool {
        self.written < self.frame.len()
    }

    /// Starts the pre-encoded token answer for request `id`. Only when idle.
    pub(super) fn start_token(&mut self, id: u64, answer: &EncodedToken, limit: Duration) {
        debug_assert!(!self.is_pending());
        answer.write_frame(id, &mut self.frame);
        self.begin(limit);
    }

    /// Starts `msg`. Only when idle. A response too large for a frame is
    /// replaced by an `Internal` error for its id.
    pub(super) fn start_message(
        &mut self,
        conn: u64,
        msg: &ServerMessage,
        limit: Duration,
    ) -> Result<(), WriteEnd> {
        debug_assert!(!self.is_pending());
        if codec::encode_frame_into(msg, &mut self.frame).is_err() {
            // Too large for a frame (a huge status, say): answer the id anyway.
            let ServerMessage::Response(ResponseFrame { id, .. }) = msg else {
                error!(conn, "cannot encode a pushed message; closing");
                return Err(WriteEnd::Unencodable);
            };
            error!(conn, id, "response too large to encode");
            let fallback = ServerMessage::Response(ResponseFrame {
                id: *id,
                result: Err(BrokerError::internal("response too large for one frame")),
            });
            codec::encode_frame_into(&fallback, &mut self.frame)
                .map_err(|_| WriteEnd::Unencodable)?;
        }
        self.begin(limit);
        Ok(())
    }

    fn begin(&mut self, limit: Duration) {
        self.written = 0;
        self.limit = limit;
        self.deadline = None;
    }

    /// Shortens the time the pending frame may take to at most `limit` from now.
    pub(super) fn cap_deadline(&mut self, limit: Duration) {
        self.limit = self.limit.min(limit);
        let cap = Instant::now() + limit;
        if let Some(deadline) = &mut self.deadline {
            *deadline = (*deadline).min(cap);
        }
    }

    /// Writes as much of the pending frame as the socket takes now, without
    /// waiting. `Ok(true)` when the frame is complete (or none was pending).
    pub(super) fn advance(&mut self) -> Result<bool, WriteEnd> {
        while self.written < self.frame.len() {
            match self.half.try_write(&self.frame[self.written..]) {
                Ok(0) => return Err(WriteEnd::Failed(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let limit = self.limit;
                    self.deadline.get_or_insert_with(|| Instant::now() + limit);
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WriteEnd::Failed(e)),
            }
        }
        // The frame may hold a token: zero what was used, keep the capacity.
        self.frame.as_mut_slice().zeroize();
        self.frame.clear();
        self.written = 0;
        self.deadline = None;
        Ok(true)
    }

    /// Waits until the socket takes more bytes, or fails at the pending frame's deadline.
    pub(super) async fn writable(&self) -> Result<(), WriteEnd> {
        let wait = self.half.writable();
        match self.deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, wait).await {
                Ok(r) => r.map_err(WriteEnd::Failed),
                Err(_) => Err(WriteEnd::TimedOut),
            },
            None => wait.await.map_err(WriteEnd::Failed),
        }
    }

    /// Shuts the write side down, so the peer reads end-of-stream.
    pub(super) async fn shutdown(mut self) {
        let _ = self.half.shutdown().await;
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        self.frame.zeroize();
    }
}

/// A connection-level error is written best effort, then the connection closes.
pub(super) const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// A cached `GetToken` answer waiting for the socket (it is written at once
/// when the socket is free).
pub(super) struct Queued {
    pub(super) id: u64,
    pub(super) answer: Arc<EncodedToken>,
    pub(super) _permit: OwnedSemaphorePermit,
}

/// Writes the pending frame, then inline answers, as far as the socket takes them now.
pub(super) fn flush(out: &mut Output, queued: &mut VecDeque<Queued>) -> Result<(), WriteEnd> {
    loop {
        if !out.advance()? {
            return Ok(());
        }
        let Some(next) = queued.pop_front() else {
            return Ok(());
        };
        // Its permit is released here, once the answer is on its way.
        out.start_token(next.id, &next.answer, WRITE_TIMEOUT);
    }
}

/// Writes one connection-level error, best effort.
pub(super) async fn write_error(writer: &mut FrameWriter<OwnedWriteHalf>, err: BrokerError) {
    let _ = tokio::time::timeout(
        ERROR_WRITE_TIMEOUT,
        writer.write_message(&ServerMessage::Error(err)),
    )
    .await;
    let _ = writer.shutdown().await;
}
