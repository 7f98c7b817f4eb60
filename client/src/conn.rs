//! One multiplexed connection to the broker.
//!
//! The calling task writes its own request frame, with a non-blocking write
//! under a short lock (never held across an await), so a request costs no task
//! hop on the way out. A frame the socket does not take at once goes to a
//! backlog that a writer task finishes, in order; a cancelled caller therefore
//! never leaves half a frame on the wire. A reader task routes each
//! `ResponseFrame` to the caller waiting on its id (the one wake per answer)
//! and each `Event` to the watch subscribed under its id. When the reader sees
//! the connection end, it fails every pending call with [`Error::Disconnected`]
//! and ends every watch.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use kontext_broker_protocol::{
    codec, paths, BrokerError, ClientMessage, FrameReader, FrameWriter, Hello, ImportRequest,
    ProfileStatus, Request, RequestFrame, Response, Secret, ServerMessage, StatusReport, Token,
    WatchEvent, Welcome, PROTOCOL_VERSION,
};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use zeroize::Zeroize;

use crate::{Error, Result};

/// Default time allowed for connecting and the Hello/Welcome handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time allowed for one request. `GetToken` may wait for a refresh, and
/// the broker's IdP timeout is 15 s, so this leaves room for one full IdP call.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

type Reply = std::result::Result<Response, BrokerError>;

/// Where the reader sends what arrives under one request id.
enum Slot {
    /// A plain call: one response, then the slot is gone.
    Call(oneshot::Sender<Reply>),
    /// A watch: the first response acknowledges it, then events follow.
    Watch {
        ack: Option<oneshot::Sender<Reply>>,
        events: mpsc::UnboundedSender<Result<WatchEvent>>,
    },
}

/// The routing table, shared by callers and the reader task.
enum Routes {
    Open(HashMap<u64, Slot>),
    /// The connection ended; new calls fail at once.
    Closed,
}

struct Shared {
    routes: Mutex<Routes>,
    /// The socket's write half. Callers write with `try_write` while holding
    /// `backlog`'s lock, so frames never interleave.
    half: OwnedWriteHalf,
    backlog: Mutex<Backlog>,
    /// Wakes the writer task when the backlog gets bytes.
    backlog_ready: Notify,
}

/// Bytes callers could not write at once, oldest first. While it is not empty,
/// callers append instead of writing, so the order of frames is kept.
#[derive(Default)]
struct Backlog {
    bytes: Vec<u8>,
    /// Bytes of `bytes` already written.
    sent: usize,
    /// The write side failed; nothing more is sent.
    failed: bool,
}

impl Backlog {
    fn is_empty(&self) -> bool {
        self.sent == self.bytes.len()
    }

    /// Writes as much as the socket takes now; `Ok(true)` when empty.
    fn drain(&mut self, half: &OwnedWriteHalf) -> io::Result<bool> {
        while !self.is_empty() {
            match half.try_write(&self.bytes[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Frames may hold secrets (a passphrase, a token response).
        self.bytes.zeroize();
        self.sent = 0;
        Ok(true)
    }
}

impl Shared {
    /// Writes one frame now if the socket takes it; what it does not take goes
    /// to the backlog for the writer task. Never waits.
    fn write_frame(&self, frame: &[u8]) -> std::result::Result<(), ()> {
        let mut backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        if backlog.failed {
            return Err(());
        }
        let mut rest = frame;
        if backlog.is_empty() {
            while !rest.is_empty() {
                match self.half.try_write(rest) {
                    Ok(0) => break,
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "broker connection write failed");
                        return Err(());
                    }
                }
            }
            if rest.is_empty() {
                return Ok(());
            }
        }
        backlog.bytes.extend_from_slice(rest);
        drop(backlog);
        self.backlog_ready.notify_one();
        Ok(())
    }

    fn remove(&self, id: u64) -> Option<Slot> {
        match &mut *self.routes.lock().unwrap_or_else(|p| p.into_inner()) {
            Routes::Open(map) => map.remove(&id),
            Routes::Closed => None,
        }
    }

    /// Marks the connection closed and wakes everyone waiting on it.
    fn close(&self) {
        let old = std::mem::replace(
            &mut *self.routes.lock().unwrap_or_else(|p| p.into_inner()),
            Routes::Closed,
        );
        if let Routes::Open(map) = old {
            for (_, slot) in map {
                if let Slot::Watch { events, .. } = slot {
                    let _ = events.send(Err(Error::Disconnected));
                }
                // Dropping a Call's sender wakes its caller with Disconnected.
            }
        }
    }
}

struct Inner {
    path: PathBuf,
    welcome: Welcome,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    request_timeout: Duration,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: stop the tasks, which closes the socket.
        self.reader.abort();
        self.writer.abort();
    }
}

/// A connection to the broker. Cheap to clone; all clones share one socket,
/// and any number of calls may be in flight at once.
#[derive(Clone)]
pub struct BrokerClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BrokerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerClient")
            .field("path", &self.inner.path)
            .field("welcome", &self.inner.welcome)
            .finish_non_exhaustive()
    }
}

/// Options for [`BrokerClient`]; start with [`BrokerClient::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    socket: Option<PathBuf>,
    client_name: String,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            socket: None,
            client_name: "kontext-broker-client".to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

impl ClientBuilder {
    /// Connect to this socket instead of the resolved default (contract §1).
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// The name sent in `Hello`, shown in broker logs.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }

    /// Time allowed for connect plus handshake (default 2 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Time allowed for each request (default 30 s).
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    /// The socket path this builder will use.
    pub fn socket_path(&self) -> PathBuf {
        paths::socket_path(self.socket.as_deref())
    }

    #[cfg(feature = "blocking")]
    pub(crate) fn client_name_value(&self) -> &str {
        &self.client_name
    }

    #[cfg(feature = "blocking")]
    pub(crate) fn connect_timeout_value(&self) -> Duration {
        self.connect_timeout
    }

    #[cfg(feature = "blocking")]
    pub(crate) fn request_timeout_value(&self) -> Duration {
        self.request_timeout
    }

    /// Connects, checks that socket and peer belong to us, and performs the handshake.
    pub async fn connect(self) -> Result<BrokerClient> {
        let path = self.socket_path();
        match tokio::time::timeout(self.connect_timeout, self.open(&path)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout),
        }
    }

    async fn open(&self, path: &Path) -> Result<BrokerClient> {
        let me = paths::euid();
        check_socket_owner(path, me)?;
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    Error::BrokerNotRunning {
                        path: path.to_owned(),
                    }
                }
                _ => Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("cannot connect to {}: {e}", path.display()),
                )),
            })?;
        let peer = stream.peer_cred()?;
        if peer.uid() != me {
            return Err(Error::PeerRejected {
                path: path.to_owned(),
                reason: format!(
                    "the process serving socket {} runs as uid {} (pid {}), not you (uid {me})",
                    path.display(),
                    peer.uid(),
                    peer.pid().map_or_else(|| "?".to_owned(), |p| p.to_string()),
                ),
            });
        }
        let (read, write) = stream.into_split();
        let mut reader = FrameReader::new(read);
        let mut writer = FrameWriter::new(write);
        writer
            .write_message(&ClientMessage::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                client_name: self.client_name.clone(),
                client_version: env!("CARGO_PKG_VERSION").to_owned(),
            }))
            .await
            .map_err(disconnect_on_io)?;
        let welcome = match reader.read_message::<ServerMessage>().await {
            Ok(Some(ServerMessage::Welcome(w))) => w,
            Ok(Some(ServerMessage::Error(e))) => return Err(e.into()),
            Ok(Some(_)) => return Err(Error::unexpected("Welcome")),
            Ok(None) => return Err(Error::Disconnected),
            Err(e) => return Err(disconnect_on_io(e)),
        };
        if welcome.protocol_version != PROTOCOL_VERSION {
            return Err(Error::VersionMismatch {
                broker: welcome.protocol_version,
                client: PROTOCOL_VERSION,
            });
        }
        Ok(BrokerClient::start(
            path.to_owned(),
            welcome,
            reader,
            writer,
            self.request_timeout,
        ))
    }
}

/// The socket file (and, through a symlink, its target) must be ours.
pub(crate) fn check_socket_owner(path: &Path, me: u32) -> Result<()> {
    let not_running = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => Error::BrokerNotRunning {
            path: path.to_owned(),
        },
        _ => Error::Io(std::io::Error::new(
            e.kind(),
            format!("cannot inspect socket {}: {e}", path.display()),
        )),
    };
    let link = std::fs::symlink_metadata(path).map_err(not_running)?;
    let target = std::fs::metadata(path).map_err(not_running)?;
    for uid in [link.uid(), target.uid()] {
        if uid != me {
            return Err(Error::PeerRejected {
                path: path.to_owned(),
                reason: format!(
                    "socket {} is owned by uid {uid}, not you (uid {me})",
                    path.display()
                ),
            });
        }
    }
    Ok(())
}

/// A broken pipe or reset while talking means the broker went away.
fn disconnect_on_io(e: kontext_broker_protocol::Error) -> Error {
    match e {
        kontext_broker_protocol::Error::Io(_) | kontext_broker_protocol::Error::Truncated => {
            Error::Disconnected
        }
        other => Error::Protocol(other),
    }
}

/// Finishes what callers could not write at once, in order.
async fn write_loop(shared: Arc<Shared>) {
    loop {
        shared.backlog_ready.notified().await;
        loop {
            let drained = {
                let mut backlog = shared.backlog.lock().unwrap_or_else(|p| p.into_inner());
                match backlog.drain(&shared.half) {
                    Ok(done) => done,
                    Err(e) => {
                        tracing::debug!(error = %e, "broker connection write failed");
                        backlog.failed = true;
                        backlog.bytes.zeroize();
                        backlog.sent = 0;
                        drop(backlog);
                        shared.close();
                        return;
                    }
                }
            };
            if drained {
                break;
            }
            if let Err(e) = shared.half.writable().await {
                tracing::debug!(error = %e, "broker connection write failed");
                shared.close();
                return;
            }
        }
    }
}

async fn read_loop(mut reader: FrameReader<OwnedReadHalf>, shared: Arc<Shared>) {
    loop {
        let msg = match reader.read_message::<ServerMessage>().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "broker connection read failed");
                break;
            }
        };
        match msg {
            ServerMessage::Response(frame) => route_response(&shared, frame.id, frame.result),
            ServerMessage::Event { id, event } => {
                let mut routes = shared.routes.lock().unwrap_or_else(|p| p.into_inner());
                if let Routes::Open(map) = &mut *routes {
                    if let Some(Slot::Watch { events, .. }) = map.get(&id) {
                        if events.send(Ok(event)).is_err() {
                            // The WatchStream is gone; stop routing to it.
                            map.remove(&id);
                        }
                    }
                }
            }
            ServerMessage::Error(e) => {
                tracing::warn!(error = %e, "broker closed the connection with an error");
                break;
            }
            ServerMessage::Welcome(_) => {
                tracing::warn!("broker sent a second Welcome; closing");
                break;
            }
        }
    }
    shared.close();
}

fn route_response(shared: &Shared, id: u64, result: Reply) {
    let mut routes = shared.routes.lock().unwrap_or_else(|p| p.into_inner());
    let Routes::Open(map) = &mut *routes else {
        return;
    };
    match map.remove(&id) {
        Some(Slot::Call(tx)) => {
            let _ = tx.send(result);
        }
        Some(Slot::Watch { ack, events }) => {
            let ok = result.is_ok();
            if let Some(tx) = ack {
                let _ = tx.send(result);
            }
            if ok {
                // Keep routing events; the acknowledgement has been delivered.
                map.insert(id, Slot::Watch { ack: None, events });
            }
        }
        None => {} // The caller timed out or gave up; drop the late answer.
    }
}

/// Removes a pending call's slot when the call ends for any reason
/// (answer, timeout, or the caller's future being dropped).
struct SlotGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.shared.remove(self.id);
    }
}

impl BrokerClient {
    fn start(
        path: PathBuf,
        welcome: Welcome,
        reader: FrameReader<OwnedReadHalf>,
        writer: FrameWriter<OwnedWriteHalf>,
        request_timeout: Duration,
    ) -> Self {
        let shared = Arc::new(Shared {
            routes: Mutex::new(Routes::Open(HashMap::new())),
            half: writer.into_inner(),
            backlog: Mutex::new(Backlog::default()),
            backlog_ready: Notify::new(),
        });
        let reader = tokio::spawn(read_loop(reader, shared.clone()));
        let writer = tokio::spawn(write_loop(shared.clone()));
        BrokerClient {
            inner: Arc::new(Inner {
                path,
                welcome,
                shared,
                next_id: AtomicU64::new(1),
                request_timeout,
                reader,
                writer,
            }),
        }
    }

    /// Connects to the socket resolved as in contract §1 (`KONTEXT_BROKER_SOCKET`, XDG, tmp).
    pub async fn connect() -> Result<Self> {
        ClientBuilder::default().connect().await
    }

    /// Connects to the socket at `path`.
    pub async fn connect_to(path: impl AsRef<Path>) -> Result<Self> {
        ClientBuilder::default()
            .socket(path.as_ref())
            .connect()
            .await
    }

    /// Options: socket, client name, timeouts.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The broker's handshake answer.
    pub fn welcome(&self) -> &Welcome {
        &self.inner.welcome
    }

    /// The socket path this client is connected to.
    pub fn socket_path(&self) -> &Path {
        &self.inner.path
    }

    /// True once the connection has ended; every further call fails with `Disconnected`.
    pub fn is_closed(&self) -> bool {
        matches!(
            *self
                .inner
                .shared
                .routes
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
            Routes::Closed
        )
    }

    /// Calls and watches currently routed on this connection (for tests and metrics).
    #[doc(hidden)]
    pub fn pending_routes(&self) -> usize {
        match &*self
            .inner
            .shared
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
        {
            Routes::Open(map) => map.len(),
            Routes::Closed => 0,
        }
    }

    /// Registers `slot` under a fresh id and writes the request from the
    /// calling task. Fails with `Disconnected` when the connection is closed,
    /// and with `BadRequest` when the request cannot be encoded.
    fn send(&self, request: Request, slot: Slot) -> Result<u64> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = codec::encode_frame(&ClientMessage::Request(RequestFrame { id, request }))
            .map_err(|e| Error::from(BrokerError::bad_request(e.to_string())))?;
        let shared = &self.inner.shared;
        {
            let mut routes = shared.routes.lock().unwrap_or_else(|p| p.into_inner());
            match &mut *routes {
                Routes::Open(map) => {
                    map.insert(id, slot);
                }
                Routes::Closed => {
                    frame.zeroize();
                    return Err(Error::Disconnected);
                }
            }
        }
        let sent = shared.write_frame(&frame);
        frame.zeroize();
        if sent.is_err() {
            shared.remove(id);
            return Err(Error::Disconnected);
        }
        Ok(id)
    }

    async fn await_reply(&self, id: u64, rx: oneshot::Receiver<Reply>) -> Result<Response> {
        let _guard = SlotGuard {
            shared: &self.inner.shared,
            id,
        };
        match tokio::time::timeout(self.inner.request_timeout, rx).await {
            Ok(Ok(Ok(resp))) => Ok(resp),
            Ok(Ok(Err(e))) => Err(e.into()),
            Ok(Err(_)) => Err(Error::Disconnected),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Sends any request and waits for its response (raw access; `Watch` is
    /// better served by [`BrokerClient::watch`]).
    pub async fn request(&self, request: Request) -> Result<Response> {
        let (tx, rx) = oneshot::channel();
        let id = self.send(request, Slot::Call(tx))?;
        self.await_reply(id, rx).await
    }

    /// Round trip with no side effect.
    pub async fn ping(&self) -> Result<()> {
        match self.request(Request::Ping).await? {
            Response::Pong => Ok(()),
            _ => Err(Error::unexpected("Pong")),
        }
    }

    /// Broker and profile status, every profile: the broker answers in pages
    /// that each fit one frame, and this fetches them all (`StatusPage`) and
    /// returns one report whose `next_after` is `None`.
    pub async fn status(&self) -> Result<StatusReport> {
        let mut report = self.status_page(Request::Status).await?;
        while let Some(after) = report.next_after.take() {
            let page = self
                .status_page(Request::StatusPage {
                    after: after.clone(),
                })
                .await?;
            // Pages move forward by name; anything else would loop forever.
            if page.profiles.first().is_some_and(|p| p.name <= after) {
                return Err(Error::unexpected("a status page after the previous one"));
            }
            report.profiles.extend(page.profiles);
            report.next_after = page.next_after;
        }
        Ok(report)
    }

    async fn status_page(&self, request: Request) -> Result<StatusReport> {
        match self.request(request).await? {
            Response::Status(s) => Ok(s),
            _ => Err(Error::unexpected("Status")),
        }
    }

    /// An access token valid for at least `min_valid` (capped by the broker, contract §5).
    pub async fn get_token(&self, profile: &str, min_valid: Duration) -> Result<Token> {
        token(
            self.request(Request::GetToken {
                profile: profile.to_owned(),
                min_valid_secs: min_valid.as_secs(),
            })
            .await?,
        )
    }

    /// Reports `stale` as rejected; the broker refreshes if it is still current,
    /// and otherwise returns the newer token it already has.
    pub async fn invalidate(&self, profile: &str, stale: &Token) -> Result<Token> {
        token(
            self.request(Request::Invalidate {
                profile: profile.to_owned(),
                generation: stale.generation,
            })
            .await?,
        )
    }

    /// Forces a refresh now.
    pub async fn refresh(&self, profile: &str) -> Result<Token> {
        token(
            self.request(Request::Refresh {
                profile: profile.to_owned(),
            })
            .await?,
        )
    }

    /// Subscribes to `profile`'s new tokens and state changes.
    ///
    /// The stream ends with `Err(Disconnected)` when the connection drops.
    /// Dropping the stream stops routing its events (the broker keeps sending
    /// until the connection closes; they are discarded).
    pub async fn watch(&self, profile: &str) -> Result<WatchStream> {
        let (ack_tx, ack_rx) = oneshot::channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let id = self.send(
            Request::Watch {
                profile: profile.to_owned(),
            },
            Slot::Watch {
                ack: Some(ack_tx),
                events: ev_tx,
            },
        )?;
        // From here until the stream exists, a failure must remove the slot.
        let stream = WatchStream {
            client: self.clone(),
            id,
            events: ev_rx,
            done: false,
        };
        let ack = match tokio::time::timeout(self.inner.request_timeout, ack_rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err(Error::Disconnected),
            Err(_) => return Err(Error::Timeout),
        };
        match ack {
            Ok(Response::Watching) => Ok(stream),
            Ok(_) => Err(Error::unexpected("Watching")),
            Err(e) => Err(e.into()),
        }
    }

    /// Adds or replaces a profile from a token endpoint response.
    pub async fn import(&self, req: ImportRequest) -> Result<ProfileStatus> {
        match self.request(Request::Import(req)).await? {
            Response::Imported(p) => Ok(p),
            _ => Err(Error::unexpected("Imported")),
        }
    }

    /// Deletes a profile, revoking its refresh token first when `revoke`.
    pub async fn logout(&self, profile: &str, revoke: bool) -> Result<LogoutOutcome> {
        logged_out(
            self.request(Request::Logout {
                profile: profile.to_owned(),
                revoke,
            })
            .await?,
        )
    }

    /// Unlocks a passphrase-protected store.
    pub async fn unlock(&self, passphrase: Secret) -> Result<()> {
        done(self.request(Request::Unlock { passphrase }).await?)
    }

    /// Drops all decrypted secrets from the broker's memory.
    pub async fn lock(&self) -> Result<()> {
        done(self.request(Request::Lock).await?)
    }

    /// Asks the broker to exit cleanly.
    pub async fn shutdown(&self) -> Result<()> {
        done(self.request(Request::Shutdown).await?)
    }
}

/// The token of a `Token` answer; any other answer is unexpected.
pub(crate) fn token(r: Response) -> Result<Token> {
    match r {
        Response::Token(t) => Ok(t),
        _ => Err(Error::unexpected("Token")),
    }
}

/// The outcome of a `LoggedOut` answer; any other answer is unexpected.
pub(crate) fn logged_out(r: Response) -> Result<LogoutOutcome> {
    match r {
        Response::LoggedOut {
            revoked,
            revoke_error,
        } => Ok(LogoutOutcome {
            revoked,
            revoke_error,
        }),
        _ => Err(Error::unexpected("LoggedOut")),
    }
}

/// A `Done` answer; any other answer is unexpected.
pub(crate) fn done(r: Response) -> Result<()> {
    match r {
        Response::Done => Ok(()),
        _ => Err(Error::unexpected("Done")),
    }
}

/// The result of [`BrokerClient::logout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutOutcome {
    /// True when the IdP confirmed revocation of the refresh token.
    pub revoked: bool,
    /// Why revocation was skipped or failed, if it was.
    pub revoke_error: Option<String>,
}

/// Events of one `Watch` subscription. Ends after yielding `Err(Disconnected)`
/// (connection lost) or a broker error.
pub struct WatchStream {
    client: BrokerClient,
    id: u64,
    events: mpsc::UnboundedReceiver<Result<WatchEvent>>,
    done: bool,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream").field("id", &self.id).finish()
    }
}

impl WatchStream {
    /// The next event, or `None` after the stream has ended.
    pub async fn next_event(&mut self) -> Option<Result<WatchEvent>> {
        futures::StreamExt::next(self).await
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.events.poll_recv(cx) {
            Poll::Ready(Some(Ok(ev))) => Poll::Ready(Some(Ok(ev))),
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                // Every sender is gone without a final error: the connection closed.
                self.done = true;
                Poll::Ready(Some(Err(Error::Disconnected)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.client.inner.shared.remove(self.id);
    }
}
