//! A blocking client for code without an async runtime (and for one-shot
//! commands such as `broker-ctl token`, where starting a runtime would cost more
//! than the request).
//!
//! It speaks the protocol over a plain `std` Unix socket: no runtime, no
//! threads, one request at a time. It checks socket and peer ownership exactly
//! like the async client. It works inside an async runtime too, but blocks that
//! thread while a call runs; prefer the async client there.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use kontext_broker_protocol::{
    codec, paths, ClientMessage, Error as WireError, Hello, ImportRequest, ProfileStatus, Request,
    RequestFrame, Response, Secret, ServerMessage, StatusReport, Token, Welcome, MAX_FRAME_LEN,
    PROTOCOL_VERSION,
};
use zeroize::Zeroize;

use crate::conn::{check_socket_owner, done, logged_out, token};
use crate::{ClientBuilder, Error, LogoutOutcome, Result};

/// A blocking broker connection. Calls are serialized per value; use the async
/// client if you need several in flight.
pub struct BrokerClient {
    path: PathBuf,
    welcome: Welcome,
    request_timeout: Duration,
    conn: Mutex<Conn>,
}

struct Conn {
    stream: UnixStream,
    next_id: u64,
    /// Set after a timeout or a bad frame: the stream is no longer in sync.
    broken: bool,
    /// Outgoing frames; reused, zeroed after each use (frames may hold secrets).
    buf: Vec<u8>,
    /// Bytes read but not yet decoded (`in_buf[in_start..]`), so a whole answer
    /// usually takes one read.
    in_buf: Vec<u8>,
    in_start: usize,
}

impl std::fmt::Debug for BrokerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("blocking::BrokerClient")
            .field("path", &self.path)
            .field("welcome", &self.welcome)
            .finish_non_exhaustive()
    }
}

impl BrokerClient {
    /// Connects to the default socket (contract §1).
    pub fn connect() -> Result<Self> {
        Self::with_builder(ClientBuilder::default())
    }

    /// Connects to the socket at `path`.
    pub fn connect_to(path: impl AsRef<Path>) -> Result<Self> {
        Self::with_builder(ClientBuilder::default().socket(path.as_ref()))
    }

    /// Connects with explicit options: checks that socket and peer belong to
    /// us, then performs the handshake within the connect timeout.
    pub fn with_builder(builder: ClientBuilder) -> Result<Self> {
        let (path, mut conn) = open(&builder)?;
        conn.send(&hello(&builder))?;
        let welcome = conn.welcome()?;
        let request_timeout = builder.request_timeout_value();
        conn.set_timeout(request_timeout)?;
        Ok(BrokerClient {
            path,
            welcome,
            request_timeout,
            conn: Mutex::new(conn),
        })
    }

    /// The broker's handshake answer.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The socket path this client is connected to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Sends any request and waits for its response (at most the request timeout).
    pub fn request(&self, request: Request) -> Result<Response> {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if conn.broken {
            return Err(Error::Disconnected);
        }
        let id = conn.next_id;
        conn.next_id += 1;
        let answer = conn
            .send(&ClientMessage::Request(RequestFrame { id, request }))
            .and_then(|()| conn.receive());
        let answer = match answer {
            Ok(ServerMessage::Response(frame)) if frame.id == id => {
                return frame.result.map_err(Error::from)
            }
            Ok(ServerMessage::Error(e)) => Err(e.into()),
            Ok(_) => Err(Error::unexpected("a response to this request")),
            Err(e @ Error::BadRequest { .. }) => return Err(e),
            Err(e) => Err(e),
        };
        // A timeout or a broken frame leaves the stream at an unknown place.
        conn.broken = true;
        answer
    }

    /// Round trip with no side effect.
    pub fn ping(&self) -> Result<()> {
        match self.request(Request::Ping)? {
            Response::Pong => Ok(()),
            _ => Err(Error::unexpected("Pong")),
        }
    }

    /// Broker and profile status, every profile (all pages, like
    /// [`crate::BrokerClient::status`]).
    pub fn status(&self) -> Result<StatusReport> {
        let mut report = self.status_page(Request::Status)?;
        while let Some(after) = report.next_after.take() {
            let page = self.status_page(Request::StatusPage {
                after: after.clone(),
            })?;
            // Pages move forward by name; anything else would loop forever.
            if page.profiles.first().is_some_and(|p| p.name <= after) {
                return Err(Error::unexpected("a status page after the previous one"));
            }
            report.profiles.extend(page.profiles);
            report.next_after = page.next_after;
        }
        Ok(report)
    }

    fn status_page(&self, request: Request) -> Result<StatusReport> {
        match self.request(request)? {
            Response::Status(s) => Ok(s),
            _ => Err(Error::unexpected("Status")),
        }
    }

    /// See [`crate::BrokerClient::get_token`].
    pub fn get_token(&self, profile: &str, min_valid: Duration) -> Result<Token> {
        token(self.request(Request::GetToken {
            profile: profile.to_owned(),
            min_valid_secs: min_valid.as_secs(),
        })?)
    }

    /// See [`crate::BrokerClient::invalidate`].
    pub fn invalidate(&self, profile: &str, stale: &Token) -> Result<Token> {
        token(self.request(Request::Invalidate {
            profile: profile.to_owned(),
            generation: stale.generation,
        })?)
    }

    /// See [`crate::BrokerClient::refresh`].
    pub fn refresh(&self, profile: &str) -> Result<Token> {
        token(self.request(Request::Refresh {
            profile: profile.to_owned(),
        })?)
    }

    /// See [`crate::BrokerClient::import`].
    pub fn import(&self, req: ImportRequest) -> Result<ProfileStatus> {
        match self.request(Request::Import(req))? {
            Response::Imported(p) => Ok(p),
            _ => Err(Error::unexpected("Imported")),
        }
    }

    /// See [`crate::BrokerClient::logout`].
    pub fn logout(&self, profile: &str, revoke: bool) -> Result<LogoutOutcome> {
        logged_out(self.request(Request::Logout {
            profile: profile.to_owned(),
            revoke,
        })?)
    }

    /// See [`crate::BrokerClient::unlock`].
    pub fn unlock(&self, passphrase: Secret) -> Result<()> {
        done(self.request(Request::Unlock { passphrase })?)
    }

    /// See [`crate::BrokerClient::lock`].
    pub fn lock(&self) -> Result<()> {
        done(self.request(Request::Lock)?)
    }

    /// See [`crate::BrokerClient::shutdown`].
    pub fn shutdown(&self) -> Result<()> {
        done(self.request(Request::Shutdown)?)
    }

    /// The time allowed for each request.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }
}

/// Connects, checks that the socket and the peer belong to us, and sends
/// `request` right behind the `Hello`, in one write: a one-shot command (such as
/// `broker-ctl token`) then costs one round trip instead of two. Nothing is sent
/// before the peer check; a broker that refuses the `Hello` discards the request.
pub fn request_once(builder: &ClientBuilder, request: Request) -> Result<Response> {
    let (_, mut conn) = open(builder)?;
    conn.send_pair(
        &hello(builder),
        &ClientMessage::Request(RequestFrame { id: 1, request }),
    )?;
    conn.welcome()?;
    conn.set_timeout(builder.request_timeout_value())?;
    match conn.receive()? {
        ServerMessage::Response(frame) if frame.id == 1 => frame.result.map_err(Error::from),
        ServerMessage::Error(e) => Err(e.into()),
        _ => Err(Error::unexpected("a response to this request")),
    }
}

/// Connects to the builder's socket and checks socket and peer ownership; the
/// connection's timeouts are the connect timeout until changed.
fn open(builder: &ClientBuilder) -> Result<(PathBuf, Conn)> {
    let path = builder.socket_path();
    let me = paths::euid();
    check_socket_owner(&path, me)?;
    let stream = UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            Error::BrokerNotRunning { path: path.clone() }
        }
        _ => Error::Io(std::io::Error::new(
            e.kind(),
            format!("cannot connect to {}: {e}", path.display()),
        )),
    })?;
    let (uid, pid) = peer_credentials(&stream)?;
    if uid != me {
        return Err(Error::PeerRejected {
            path: path.clone(),
            reason: format!(
                "the process serving socket {} runs as uid {uid} (pid {}), not you (uid {me})",
                path.display(),
                pid.map_or_else(|| "?".to_owned(), |p| p.to_string()),
            ),
        });
    }
    let conn = Conn {
        stream,
        next_id: 1,
        broken: false,
        buf: Vec::with_capacity(512),
        in_buf: Vec::with_capacity(READ_ROOM),
        in_start: 0,
    };
    conn.set_timeout(builder.connect_timeout_value())?;
    Ok((path, conn))
}

fn hello(builder: &ClientBuilder) -> ClientMessage {
    ClientMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        client_name: builder.client_name_value().to_owned(),
        client_version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

impl Conn {
    /// Reads the broker's answer to `Hello`.
    fn welcome(&mut self) -> Result<Welcome> {
        let welcome = match self.receive()? {
            ServerMessage::Welcome(w) => w,
            ServerMessage::Error(e) => return Err(e.into()),
            _ => return Err(Error::unexpected("Welcome")),
        };
        if welcome.protocol_version != PROTOCOL_VERSION {
            return Err(Error::VersionMismatch {
                broker: welcome.protocol_version,
                client: PROTOCOL_VERSION,
            });
        }
        Ok(welcome)
    }

    /// Sends two frames with one write.
    fn send_pair(&mut self, first: &ClientMessage, second: &ClientMessage) -> Result<()> {
        use std::io::Write;
        let mut tail = Vec::new();
        let encoded = codec::encode_frame_into(second, &mut tail)
            .and_then(|()| codec::encode_frame_into(first, &mut self.buf));
        let written = match encoded {
            Ok(()) => {
                self.buf.extend_from_slice(&tail);
                (&self.stream).write_all(&self.buf).map_err(io_error)
            }
            Err(e) => Err(Error::from(
                kontext_broker_protocol::BrokerError::bad_request(e.to_string()),
            )),
        };
        tail.zeroize();
        self.buf.zeroize();
        written
    }

    fn set_timeout(&self, d: Duration) -> Result<()> {
        // A zero timeout means "none" to the socket; keep a floor instead.
        let d = Some(d.max(Duration::from_millis(1)));
        self.stream.set_read_timeout(d)?;
        self.stream.set_write_timeout(d)?;
        Ok(())
    }

    fn send(&mut self, msg: &ClientMessage) -> Result<()> {
        use std::io::Write;
        let encoded = codec::encode_frame_into(msg, &mut self.buf);
        let written = match encoded {
            Ok(()) => (&self.stream).write_all(&self.buf).map_err(io_error),
            Err(e) => Err(Error::from(
                kontext_broker_protocol::BrokerError::bad_request(e.to_string()),
            )),
        };
        self.buf.zeroize();
        written
    }

    /// The next message. Reads whatever the socket has (at least the rest of
    /// one frame), so a small answer costs one `read`.
    fn receive(&mut self) -> Result<ServerMessage> {
        loop {
            let pending = &self.in_buf[self.in_start..];
            if let Some(header) = pending.get(..4) {
                let len = u32::from_be_bytes(header.try_into().expect("4 bytes")) as usize;
                if len > MAX_FRAME_LEN {
                    return Err(Error::Protocol(WireError::FrameTooLarge {
                        len,
                        max: MAX_FRAME_LEN,
                    }));
                }
                if let Some(payload) = pending.get(4..4 + len) {
                    let result = codec::decode::<ServerMessage>(payload).map_err(Error::Protocol);
                    self.in_start += 4 + len;
                    if self.in_start == self.in_buf.len() {
                        // The frame may hold a token.
                        self.in_buf.as_mut_slice().zeroize();
                        self.in_buf.clear();
                        self.in_start = 0;
                    }
                    return result;
                }
                // Room for the whole frame.
                self.in_buf.reserve(4 + len - pending.len());
            }
            self.fill()?;
        }
    }

    /// Appends what the socket has to `in_buf` (blocking until something arrives).
    fn fill(&mut self) -> Result<()> {
        use std::io::Read;
        if self.in_start > 0 {
            // Keep the unread tail at the front, so the buffer never grows without bound.
            self.in_buf.copy_within(self.in_start.., 0);
            let tail = self.in_buf.len() - self.in_start;
            self.in_buf[tail..].zeroize();
            self.in_buf.truncate(tail);
            self.in_start = 0;
        }
        if self.in_buf.capacity() - self.in_buf.len() < READ_ROOM {
            self.in_buf.reserve(READ_ROOM);
        }
        let filled = self.in_buf.len();
        let room = self.in_buf.capacity() - filled;
        self.in_buf.resize(filled + room, 0);
        let read = loop {
            match (&self.stream).read(&mut self.in_buf[filled..]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        let n = *read.as_ref().unwrap_or(&0);
        self.in_buf.truncate(filled + n);
        match read {
            // The broker closed (between frames or mid-frame).
            Ok(0) => Err(Error::Disconnected),
            Ok(_) => Ok(()),
            Err(e) => Err(io_error(e)),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.in_buf.zeroize();
        self.buf.zeroize();
    }
}

/// Free buffer space before each read: room for a typical answer in one read.
const READ_ROOM: usize = 4096;

/// A read or write timeout is [`Error::Timeout`]; a broken connection is
/// [`Error::Disconnected`].
fn io_error(e: std::io::Error) -> Error {
    use std::io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut => Error::Timeout,
        BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof => Error::Disconnected,
        _ => Error::Io(e),
    }
}

/// The uid (and pid, where the OS tells) of the process at the other end.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn peer_credentials(stream: &UnixStream) -> Result<(u32, Option<u32>)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given, and the
    // descriptor stays open for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    Ok((cred.uid, u32::try_from(cred.pid).ok().filter(|&p| p != 0)))
}

/// The uid (and pid, where the OS tells) of the process at the other end.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn peer_credentials(stream: &UnixStream) -> Result<(u32, Option<u32>)> {
    let mut uid: libc::uid_t = 0;
    let mut gid: libc::gid_t = 0;
    // SAFETY: both out-pointers are valid, and the descriptor stays open.
    let rc = unsafe { libc::getpeereid(stream.as_raw_fd(), &mut uid, &mut gid) };
    if rc != 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    Ok((uid, None))
}
