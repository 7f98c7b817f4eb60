//! One connection: handshake, then one task that reads requests and writes
//! answers itself.
//!
//! A `GetToken` that the profile's cached token serves is answered inline, from
//! the engine's pre-encoded frame, with one non-blocking write: no task, no
//! channel, no allocation. Every other request runs in a task of its own and
//! hands its answer back through the outbox, so one slow request never blocks
//! another. At most [`MAX_IN_FLIGHT`] requests per connection are running or
//! waiting for the socket; past that the connection stops reading.
//!
//! An idle connection owns no timer: only a partial frame (stall timeout) or a
//! pending write (write timeout) arms one.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
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

use super::output::{flush, write_error, Output, Queued, WriteEnd, ERROR_WRITE_TIMEOUT};
use super::{MAX_IN_FLIGHT, MAX_WATCHES, WRITE_TIMEOUT};
use crate::service::Service;

/// Answers queued for the writer. Boxed, so an idle queue block stays small.
type Outbox = mpsc::Sender<Box<ServerMessage>>;

/// Queue depth between request tasks and the writer.
const OUTBOX_DEPTH: usize = 16;

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

/// Why the reading stopped; decides whether an error frame goes out first.
enum ReadEnd {
    /// Peer closed, stalled, or the socket failed: finish the answers, then close.
    Closed,
    /// Protocol violation: send this error, then close.
    Violation(BrokerError),
}

/// Where a connection is in its life.
enum Phase {
    /// Reading requests (holding the outbox sender) and writing answers.
    Serving(Outbox),
    /// No more reading; answers of running requests are still written.
    Draining,
    /// A protocol violation: finish the frame on the wire, write this error
    /// (taken once started), close.
    Failing(Option<BrokerError>),
}

/// What woke the connection.
enum Step {
    /// The broker is stopping.
    Stop,
    /// Room for one more request.
    Permit(OwnedSemaphorePermit),
    /// A request frame, the end of the stream, or a read error.
    Frame(Result<Option<BytesMut>, WireError>),
    /// An answer or event from a request or watch task; `None` once all are done.
    Outgoing(Option<Box<ServerMessage>>),
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

        self.serve(reader, Output::new(writer.into_inner())).await;
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

    /// Reads requests and writes answers until the connection ends.
    async fn serve(&self, mut reader: FrameReader<OwnedReadHalf>, mut out: Output) {
        let (tx, mut rx) = mpsc::channel::<Box<ServerMessage>>(OUTBOX_DEPTH);
        // Ends this connection's watches when it stops reading or the broker stops.
        let watches_end = self.service.shutdown_token().child_token();
        let _end_watches = watches_end.clone().drop_guard();
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let watch_slots = Arc::new(Semaphore::new(MAX_WATCHES));
        // Inline answers waiting for the socket, each holding its in-flight permit.
        let mut queued: VecDeque<Queued> = VecDeque::new();
        let mut permit: Option<OwnedSemaphorePermit> = None;
        let mut outbox_open = true;
        let mut phase = Phase::Serving(tx);
        // Registered once, not once per request.
        let stopping = watches_end.cancelled();
        tokio::pin!(stopping);
        let end = loop {
            if let Err(end) = flush(&mut out, &mut queued) {
                break end;
            }
            match &mut phase {
                Phase::Failing(error) if !out.is_pending() => match error.take() {
                    Some(err) => {
                        if let Err(end) = out.start_message(
                            self.id,
                            &ServerMessage::Error(err),
                            ERROR_WRITE_TIMEOUT,
                        ) {
                            break end;
                        }
                        continue;
                    }
                    None => break WriteEnd::Done,
                },
                Phase::Draining if !outbox_open && !out.is_pending() => break WriteEnd::Done,
                _ => {}
            }
            let writing = out.is_pending();
            let serving = matches!(phase, Phase::Serving(_));
            let failing = matches!(phase, Phase::Failing(_));
            if serving && permit.is_none() {
                // Usually free: no wait, and no extra turn of this loop.
                permit = in_flight.clone().try_acquire_owned().ok();
            }
            let step = tokio::select! {
                biased;
                r = out.writable(), if writing => match r {
                    Ok(()) => continue,
                    Err(end) => break end,
                },
                _ = &mut stopping, if serving => Step::Stop,
                m = rx.recv(), if !writing && !failing && outbox_open => Step::Outgoing(m),
                p = async { in_flight.clone().acquire_owned().await }, if serving && permit.is_none() => {
                    Step::Permit(p.expect("the in-flight semaphore is never closed"))
                }
                f = reader.read_frame(), if serving && permit.is_some() => Step::Frame(f),
                else => break WriteEnd::Done,
            };
            match step {
                Step::Permit(p) => permit = Some(p),
                Step::Outgoing(Some(message)) => {
                    if let Err(end) = out.start_message(self.id, &message, WRITE_TIMEOUT) {
                        break end;
                    }
                }
                Step::Outgoing(None) => outbox_open = false,
                Step::Stop => phase = Phase::Draining,
                Step::Frame(read) => {
                    let permit = permit.take().expect("a frame is read only with a permit");
                    let Phase::Serving(tx) = &phase else {
                        unreachable!("frames are read only while serving")
                    };
                    match self.on_frame(read, permit, tx, &watch_slots, &watches_end) {
                        Ok(None) => {}
                        Ok(Some(answer)) => queued.push_back(answer),
                        Err(ReadEnd::Closed) => phase = Phase::Draining,
                        Err(ReadEnd::Violation(err)) => {
                            queued.clear();
                            out.cap_deadline(ERROR_WRITE_TIMEOUT);
                            phase = Phase::Failing(Some(err));
                        }
                    }
                }
            }
            if !matches!(phase, Phase::Serving(_)) {
                // No more requests: end the watches and release our sender, so
                // the outbox closes once the running requests have answered.
                watches_end.cancel();
                permit = None;
            }
        };
        match end {
            WriteEnd::Done => {}
            WriteEnd::TimedOut => warn!(conn = self.id, "peer is not reading its answers; closing"),
            WriteEnd::Failed(e) => debug!(conn = self.id, error = %e, "write failed; closing"),
            WriteEnd::Unencodable => {}
        }
        // Dropping the receiver wakes every task still holding a sender.
        drop(rx);
        out.shutdown().await;
    }

    /// Handles one read result: a cached `GetToken` becomes an inline answer,
    /// any other request starts its task; errors end the reading.
    fn on_frame(
        &self,
        read: Result<Option<BytesMut>, WireError>,
        permit: OwnedSemaphorePermit,
        tx: &Outbox,
        watch_slots: &Arc<Semaphore>,
        watches_end: &CancellationToken,
    ) -> Result<Option<Queued>, ReadEnd> {
        let mut frame = match read {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                debug!(conn = self.id, "peer closed");
                return Err(ReadEnd::Closed);
            }
            Err(e) => {
                return Err(match self.violation(&e) {
                    Some(err) => ReadEnd::Violation(err),
                    None => ReadEnd::Closed,
                })
            }
        };
        if let Some(req) = codec::peek_get_token(&frame) {
            if let Some(answer) = self
                .service
                .cached_token_frame(req.profile, req.min_valid_secs)
            {
                debug!(conn = self.id, id = req.id, "request GetToken (cached)");
                return Ok(Some(Queued {
                    id: req.id,
                    answer,
                    _permit: permit,
                }));
            }
        }
        let message = codec::decode::<ClientMessage>(&frame);
        // The frame may hold a passphrase or tokens.
        frame.as_mut().zeroize();
        let RequestFrame { id, request } = match message {
            Ok(ClientMessage::Request(frame)) => frame,
            Ok(ClientMessage::Hello(_)) => {
                warn!(conn = self.id, "second Hello");
                return Err(ReadEnd::Violation(BrokerError::bad_request(
                    "Hello is only valid as the first frame",
                )));
            }
            Err(e) => {
                warn!(conn = self.id, "undecodable frame");
                return Err(ReadEnd::Violation(BrokerError::bad_request(e.to_string())));
            }
        };
        debug!(conn = self.id, id, request = request.name(), "request");
        match request {
            Request::Watch { profile } => {
                drop(permit);
                self.start_watch(id, profile, watch_slots, tx.clone(), watches_end);
            }
            request => self.start_request(id, request, permit, tx.clone()),
        }
        Ok(None)
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
            let name = request.name();
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
