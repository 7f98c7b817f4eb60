//! One connection: handshake, then requests in their own tasks, answers through
//! one writer that owns the socket's write half.
//!
//! Per connection there is one task (reader and writer joined in it) plus one
//! task per running request or watch. An idle connection owns no timer: only a
//! partial frame (stall timeout) or a pending write (write timeout) arms one.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use kontext_broker_protocol::codec;
use kontext_broker_protocol::{
    BrokerError, ClientMessage, Error as WireError, FrameReader, FrameWriter, Request,
    RequestFrame, Response, ResponseFrame, ServerMessage, Welcome, PROTOCOL_VERSION,
};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};
use zeroize::Zeroize;

use super::{MAX_IN_FLIGHT, MAX_WATCHES, WRITE_TIMEOUT};
use crate::service::{request_name, Service};

/// Answers queued for the writer. Boxed, so an idle queue block stays small.
type Outbox = mpsc::Sender<Box<ServerMessage>>;

/// Queue depth between request tasks and the writer.
const OUTBOX_DEPTH: usize = 16;
/// A connection-level error is written best effort, then the connection closes.
const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Keeps `Stats::connections` equal to the number of live handlers, even when a
/// handler unwinds.
struct OpenConnection<'a>(&'a AtomicU64);

impl<'a> OpenConnection<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        OpenConnection(counter)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why the reader stopped; decides whether an error frame goes out first.
enum ReadEnd {
    /// Peer closed, stalled, or the socket failed: just close.
    Closed,
    /// Broker shutting down, or the writer gave up.
    Stopped,
    /// Protocol violation: send this error, then close.
    Violation(BrokerError),
}

pub(super) struct Handler {
    id: u64,
    service: Service,
    tracker: TaskTracker,
}

impl Handler {
    pub(super) fn new(id: u64, service: Service, tracker: TaskTracker) -> Self {
        Handler {
            id,
            service,
            tracker,
        }
    }

    /// Serves one connection until it closes. `_slot` is the connection-cap
    /// permit, released when the connection is fully closed.
    pub(super) async fn run(self, stream: UnixStream, _slot: OwnedSemaphorePermit) {
        let shutdown = self.service.shutdown_token();
        let (read_half, write_half) = stream.into_split();
        let mut reader = FrameReader::new(read_half);
        let mut writer = FrameWriter::new(write_half);
        // Declared after the socket halves so it drops before them: a peer that
        // sees the close also sees the count go down.
        let service = self.service.clone();
        let _open = OpenConnection::new(&service.stats().connections);

        // No complete Hello in time: the slot goes back (contract: 10 s by default).
        let deadline = Duration::from_secs(service.config().handshake_timeout_secs);
        let greeted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            ok = tokio::time::timeout(deadline, self.handshake(&mut reader, &mut writer)) => {
                ok.unwrap_or_else(|_| {
                    service.stats().handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                    debug!(conn = self.id, "no Hello in time; closing");
                    false
                })
            }
        };
        if !greeted {
            return;
        }

        let (tx, rx) = mpsc::channel(OUTBOX_DEPTH);
        // Ends this connection's watches when its reader stops or the broker stops.
        let watches_end = shutdown.child_token();
        let read = async {
            let end = self.read_loop(&mut reader, tx.clone(), &watches_end).await;
            watches_end.cancel();
            if let ReadEnd::Violation(err) = end {
                // Best effort: the outbox may be full of answers the peer is not reading.
                let _ = tokio::time::timeout(
                    ERROR_WRITE_TIMEOUT,
                    tx.send(Box::new(ServerMessage::Error(err))),
                )
                .await;
            }
            drop(tx);
        };
        tokio::join!(read, write_loop(self.id, writer, rx));
        debug!(conn = self.id, "connection closed");
    }

    /// Reads `Hello` and answers `Welcome`; false when the connection must close.
    async fn handshake(
        &self,
        reader: &mut FrameReader<OwnedReadHalf>,
        writer: &mut FrameWriter<OwnedWriteHalf>,
    ) -> bool {
        let mut frame = match reader.read_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                debug!(conn = self.id, "closed before Hello");
                return false;
            }
            Err(e) => {
                if let Some(err) = self.violation(&e) {
                    write_error(writer, err).await;
                }
                return false;
            }
        };
        let hello = match codec::peek_hello_version(&frame) {
            Some(version) if version != PROTOCOL_VERSION => Err(BrokerError::VersionMismatch {
                broker: PROTOCOL_VERSION,
                client: version,
            }),
            Some(_) => match codec::decode::<ClientMessage>(&frame) {
                Ok(ClientMessage::Hello(hello)) => Ok(hello),
                _ => Err(BrokerError::bad_request("malformed Hello")),
            },
            None => Err(BrokerError::bad_request(
                "the first frame must be Hello; see protocol/WIRE.md",
            )),
        };
        // A misplaced first request may carry a secret.
        frame.as_mut().zeroize();
        match hello {
            Ok(hello) => {
                debug!(
                    conn = self.id,
                    client = ?hello.client_name,
                    version = ?hello.client_version,
                    "handshake"
                );
                let welcome = ServerMessage::Welcome(Welcome {
                    protocol_version: PROTOCOL_VERSION,
                    broker_version: env!("CARGO_PKG_VERSION").to_owned(),
                    pid: std::process::id(),
                });
                matches!(
                    tokio::time::timeout(WRITE_TIMEOUT, writer.write_message(&welcome)).await,
                    Ok(Ok(()))
                )
            }
            Err(err) => {
                warn!(
                    conn = self.id,
                    code = err.code().as_str(),
                    "handshake refused"
                );
                write_error(writer, err).await;
                false
            }
        }
    }

    /// Reads request frames and starts a task for each, until the connection or
    /// the broker stops.
    async fn read_loop(
        &self,
        reader: &mut FrameReader<OwnedReadHalf>,
        tx: Outbox,
        watches_end: &CancellationToken,
    ) -> ReadEnd {
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let watch_slots = Arc::new(Semaphore::new(MAX_WATCHES));
        loop {
            // At the cap, stop reading: the peer's further requests wait in the socket.
            let permit = tokio::select! {
                biased;
                _ = watches_end.cancelled() => return ReadEnd::Stopped,
                _ = tx.closed() => return ReadEnd::Stopped,
                permit = in_flight.clone().acquire_owned() => {
                    permit.expect("the in-flight semaphore is never closed")
                }
            };
            let read = tokio::select! {
                biased;
                _ = watches_end.cancelled() => return ReadEnd::Stopped,
                _ = tx.closed() => return ReadEnd::Stopped,
                read = reader.read_frame() => read,
            };
            let mut frame = match read {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    debug!(conn = self.id, "peer closed");
                    return ReadEnd::Closed;
                }
                Err(e) => {
                    return match self.violation(&e) {
                        Some(err) => ReadEnd::Violation(err),
                        None => ReadEnd::Closed,
                    }
                }
            };
            let message = codec::decode::<ClientMessage>(&frame);
            // The frame may hold a passphrase or tokens.
            frame.as_mut().zeroize();
            let RequestFrame { id, request } = match message {
                Ok(ClientMessage::Request(frame)) => frame,
                Ok(ClientMessage::Hello(_)) => {
                    warn!(conn = self.id, "second Hello");
                    return ReadEnd::Violation(BrokerError::bad_request(
                        "Hello is only valid as the first frame",
                    ));
                }
                Err(e) => {
                    warn!(conn = self.id, "undecodable frame");
                    return ReadEnd::Violation(BrokerError::bad_request(e.to_string()));
                }
            };
            debug!(
                conn = self.id,
                id,
                request = request_name(&request),
                "request"
            );
            match request {
                Request::Watch { profile } => {
                    drop(permit);
                    self.start_watch(id, profile, &watch_slots, tx.clone(), watches_end);
                }
                request => self.start_request(id, request, permit, tx.clone()),
            }
        }
    }

    /// Maps a read error to the error frame owed to the peer, if any, and logs it.
    fn violation(&self, e: &WireError) -> Option<BrokerError> {
        match e {
            WireError::FrameTooLarge { len, max } => {
                warn!(conn = self.id, len, max, "oversized frame");
                Some(BrokerError::bad_request(e.to_string()))
            }
            WireError::Decode(_) => {
                warn!(conn = self.id, "undecodable frame");
                Some(BrokerError::bad_request(e.to_string()))
            }
            WireError::Stalled => {
                warn!(conn = self.id, "peer stalled mid-frame; closing");
                None
            }
            other => {
                debug!(conn = self.id, error = %other, "read ended");
                None
            }
        }
    }

    fn start_request(&self, id: u64, request: Request, permit: OwnedSemaphorePermit, tx: Outbox) {
        let service = self.service.clone();
        let conn = self.id;
        self.tracker.spawn(async move {
            let _permit = permit;
            let name = request_name(&request);
            let result = AssertUnwindSafe(service.call(request))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    error!(conn, id, request = name, "request handler panicked");
                    Err(BrokerError::internal("the request handler failed"))
                });
            if let Err(e) = &result {
                debug!(
                    conn,
                    id,
                    request = name,
                    code = e.code().as_str(),
                    "request failed"
                );
            }
            // Fails only when the connection is gone; nobody is left to tell.
            let _ = tx
                .send(Box::new(ServerMessage::Response(ResponseFrame {
                    id,
                    result,
                })))
                .await;
        });
    }

    fn start_watch(
        &self,
        id: u64,
        profile: String,
        slots: &Arc<Semaphore>,
        tx: Outbox,
        end: &CancellationToken,
    ) {
        let service = self.service.clone();
        let slot = slots.clone().try_acquire_owned();
        let end = end.clone();
        let conn = self.id;
        self.tracker.spawn(async move {
            let respond = |result| Box::new(ServerMessage::Response(ResponseFrame { id, result }));
            let Ok(_slot) = slot else {
                let err = BrokerError::bad_request(format!(
                    "too many watches on one connection (at most {MAX_WATCHES})"
                ));
                let _ = tx.send(respond(Err(err))).await;
                return;
            };
            let watched = std::panic::catch_unwind(AssertUnwindSafe(|| service.watch(&profile)))
                .unwrap_or_else(|_| {
                    error!(conn, id, "watch handler panicked");
                    Err(BrokerError::internal("the watch handler failed"))
                });
            let mut events = match watched {
                Ok(events) => events,
                Err(e) => {
                    let _ = tx.send(respond(Err(e))).await;
                    return;
                }
            };
            if tx.send(respond(Ok(Response::Watching))).await.is_err() {
                return;
            }
            loop {
                let event = tokio::select! {
                    biased;
                    _ = end.cancelled() => break,
                    _ = tx.closed() => break,
                    event = events.next() => event,
                };
                let Some(event) = event else { break };
                if tx
                    .send(Box::new(ServerMessage::Event { id, event }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            debug!(conn, id, "watch ended");
        });
    }
}

/// Writes queued answers in order until every sender is gone, a write fails or
/// times out, or a connection-level error has been written.
async fn write_loop(
    conn: u64,
    mut writer: FrameWriter<OwnedWriteHalf>,
    mut rx: mpsc::Receiver<Box<ServerMessage>>,
) {
    while let Some(message) = rx.recv().await {
        let last = matches!(*message, ServerMessage::Error(_));
        let limit = if last {
            ERROR_WRITE_TIMEOUT
        } else {
            WRITE_TIMEOUT
        };
        let written = match tokio::time::timeout(limit, writer.write_message(&*message)).await {
            Ok(Err(WireError::Encode(_))) => {
                // Too large for a frame (a huge status, say): answer the id anyway.
                let ServerMessage::Response(ResponseFrame { id, .. }) = *message else {
                    error!(conn, "cannot encode a pushed message; closing");
                    break;
                };
                error!(conn, id, "response too large to encode");
                let fallback = ServerMessage::Response(ResponseFrame {
                    id,
                    result: Err(BrokerError::internal("response too large for one frame")),
                });
                tokio::time::timeout(limit, writer.write_message(&fallback)).await
            }
            other => other,
        };
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(conn, error = %e, "write failed; closing");
                break;
            }
            Err(_) => {
                warn!(conn, "peer is not reading its answers; closing");
                break;
            }
        }
        if last {
            break;
        }
    }
    // Dropping the receiver wakes the reader and every task still holding a sender.
    drop(rx);
    let _ = writer.shutdown().await;
}

/// Writes one connection-level error, best effort.
async fn write_error(writer: &mut FrameWriter<OwnedWriteHalf>, err: BrokerError) {
    let _ = tokio::time::timeout(
        ERROR_WRITE_TIMEOUT,
        writer.write_message(&ServerMessage::Error(err)),
    )
    .await;
    let _ = writer.shutdown().await;
}
