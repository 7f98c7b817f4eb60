//! Runs the real `kontext-broker` binary for integration tests, plus a minimal
//! raw-protocol client so tests can speak the wire format directly.
//!
//! The binary is `$KONTEXT_BROKER_BIN`, else `kontext-broker` in the cargo target
//! directory of the running test (`target/debug/deps/<test>` → `target/debug/`).
//! Cargo builds it for integration tests of the `kontext-broker` package; if it
//! is missing, run `cargo build --workspace --bins`.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kontext_broker_protocol::{
    codec, ClientMessage, FrameReader, FrameWriter, Hello, Request, RequestFrame, Response,
    ResponseFrame, ServerMessage, StatusReport, Welcome, PROTOCOL_VERSION,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// How long [`BrokerProcess::start`] waits for the broker to answer `Hello`.
/// A safety net for a loaded machine, not a budget.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Safety net for one answer from the broker in [`RawClient`].
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The `kontext-broker` binary to run.
pub fn broker_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KONTEXT_BROKER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    dir.join("kontext-broker")
}

/// How to start a broker. Unset paths get fresh temp locations: the socket in a
/// 0700 directory `run/` the broker creates, the state dir in `state/`.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Written to the config file passed with `--config`.
    pub config_toml: String,
    /// `RUST_LOG` for the broker.
    pub rust_log: String,
    /// Socket path; default `<tmp>/run/broker.sock`.
    pub socket: Option<PathBuf>,
    /// State dir; default `<tmp>/state`.
    pub state_dir: Option<PathBuf>,
    /// Extra environment for the broker.
    pub env: Vec<(OsString, OsString)>,
    /// A command prefix, e.g. `systemd-socket-activate -l PATH`.
    pub launcher: Vec<OsString>,
    /// Pass socket, state dir and config through `KONTEXT_BROKER_*` variables
    /// instead of flags.
    pub paths_via_env: bool,
    /// Extra command-line arguments.
    pub args: Vec<OsString>,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            config_toml: String::new(),
            rust_log: "info,kontext_broker=debug".into(),
            socket: None,
            state_dir: None,
            env: Vec::new(),
            launcher: Vec::new(),
            paths_via_env: false,
            args: Vec::new(),
        }
    }
}

/// A running (or exited) broker process. Killed on drop; its stderr is printed
/// when the test is failing.
pub struct BrokerProcess {
    opts: BrokerOptions,
    _tmp: Arc<tempfile::TempDir>,
    socket: PathBuf,
    state_dir: PathBuf,
    config: PathBuf,
    child: Child,
    exit: Option<ExitStatus>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_thread: Option<JoinHandle<()>>,
}

impl BrokerProcess {
    /// Starts a broker and waits until it answers `Hello`. Panics (with the
    /// broker's stderr) if it exits or does not answer within [`START_TIMEOUT`].
    pub fn start(opts: BrokerOptions) -> BrokerProcess {
        let mut broker = Self::spawn(opts);
        broker.wait_ready();
        broker
    }

    /// Starts a broker without waiting for it (for brokers expected to fail).
    pub fn spawn(opts: BrokerOptions) -> BrokerProcess {
        let tmp = tempfile::tempdir().expect("tempdir");
        let socket = opts
            .socket
            .clone()
            .unwrap_or_else(|| tmp.path().join("run").join("broker.sock"));
        let state_dir = opts
            .state_dir
            .clone()
            .unwrap_or_else(|| tmp.path().join("state"));
        let config = tmp.path().join("broker.toml");
        std::fs::write(&config, &opts.config_toml).expect("writing config");
        let tmp = Arc::new(tmp);
        let (child, stderr, stderr_thread) = launch(&opts, &socket, &state_dir, &config);
        BrokerProcess {
            opts,
            _tmp: tmp,
            socket,
            state_dir,
            config,
            child,
            exit: None,
            stderr,
            stderr_thread: Some(stderr_thread),
        }
    }

    /// Waits until the broker answers `Hello` on its socket.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(status) = self.try_exit() {
                panic!(
                    "broker exited with {status} before serving\n--- broker stderr ---\n{}",
                    self.stderr()
                );
            }
            if probe(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not answer on {} within {START_TIMEOUT:?}\n--- broker stderr ---\n{}",
                self.socket.display(),
                self.stderr()
            );
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// The broker's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Everything the broker wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Sends `signal` to the broker.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).expect("kill");
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        self.signal(Signal::SIGTERM);
    }

    /// Sends SIGKILL.
    pub fn sigkill(&self) {
        self.signal(Signal::SIGKILL);
    }

    /// The exit status if the broker has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait");
            if self.exit.is_some() {
                if let Some(t) = self.stderr_thread.take() {
                    let _ = t.join();
                }
            }
        }
        self.exit
    }

    /// Waits for the broker to exit; panics (with stderr) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not exit within {timeout:?}\n--- broker stderr ---\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the broker (SIGTERM, then SIGKILL if needed) and starts it again
    /// with the same options, socket, state dir and config.
    pub fn restart(&mut self) {
        if self.try_exit().is_none() {
            self.sigterm();
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.try_exit().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if self.try_exit().is_none() {
                self.sigkill();
                self.wait_exit(Duration::from_secs(30));
            }
        }
        let (child, stderr, thread) =
            launch(&self.opts, &self.socket, &self.state_dir, &self.config);
        self.child = child;
        self.exit = None;
        self.stderr = stderr;
        self.stderr_thread = Some(thread);
        self.wait_ready();
    }

    /// The broker's resident set size in KiB (`VmRSS`), Linux only.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// A connected, greeted raw client.
    pub async fn client(&self) -> RawClient {
        RawClient::connect(&self.socket).await
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- broker {} stderr ---\n{}",
                self.child.id(),
                self.stderr()
            );
        }
    }
}

type Launched = (Child, Arc<Mutex<Vec<u8>>>, JoinHandle<()>);

fn launch(opts: &BrokerOptions, socket: &Path, state_dir: &Path, config: &Path) -> Launched {
    let bin = broker_binary();
    assert!(
        bin.exists(),
        "{} not found; run `cargo build --workspace --bins` or set KONTEXT_BROKER_BIN",
        bin.display()
    );
    let mut cmd = match opts.launcher.split_first() {
        Some((first, rest)) => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(&bin);
            cmd
        }
        None => Command::new(&bin),
    };
    cmd.env_remove("KONTEXT_BROKER_SOCKET")
        .env_remove("KONTEXT_BROKER_STATE_DIR")
        .env_remove("KONTEXT_BROKER_CONFIG");
    if opts.paths_via_env {
        cmd.env("KONTEXT_BROKER_SOCKET", socket)
            .env("KONTEXT_BROKER_STATE_DIR", state_dir)
            .env("KONTEXT_BROKER_CONFIG", config);
    } else {
        cmd.arg("--socket")
            .arg(socket)
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--config")
            .arg(config);
    }
    cmd.args(&opts.args)
        .env("RUST_LOG", &opts.rust_log)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("NOTIFY_SOCKET")
        .envs(opts.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning kontext-broker");
    let mut pipe = child.stderr.take().expect("stderr pipe");
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    let thread = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (child, buf, thread)
}

/// Our `Hello`.
pub fn hello() -> ClientMessage {
    ClientMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        client_name: "kontext-broker-tests".into(),
        client_version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// Connects with blocking I/O, sends `Hello`, and returns the `Welcome`.
pub fn probe(socket: &Path) -> std::io::Result<Welcome> {
    let mut s = StdUnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&codec::encode_frame(&hello()).expect("encode"))?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut payload)?;
    match codec::decode::<ServerMessage>(&payload) {
        Ok(ServerMessage::Welcome(w)) => Ok(w),
        other => Err(std::io::Error::other(format!(
            "unexpected answer {other:?}"
        ))),
    }
}

/// How a connection ended, seen from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// Clean end of stream.
    Eof,
    /// `ECONNRESET`: the broker closed with our bytes unread (also a close).
    Reset,
}

/// A minimal protocol client for tests: raw bytes or typed messages.
pub struct RawClient {
    reader: FrameReader<OwnedReadHalf>,
    writer: FrameWriter<OwnedWriteHalf>,
}

impl RawClient {
    /// Connects without sending anything.
    pub async fn connect_raw(socket: &Path) -> RawClient {
        let stream = UnixStream::connect(socket)
            .await
            .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        let (r, w) = stream.into_split();
        RawClient {
            reader: FrameReader::new(r),
            writer: FrameWriter::new(w),
        }
    }

    /// Connects and completes the handshake; panics unless `Welcome` comes back.
    pub async fn connect(socket: &Path) -> RawClient {
        let mut client = Self::connect_raw(socket).await;
        client.send(&hello()).await;
        match client.recv().await {
            Some(ServerMessage::Welcome(w)) => assert_eq!(w.protocol_version, PROTOCOL_VERSION),
            other => panic!("expected Welcome, got {other:?}"),
        }
        client
    }

    /// The frame reader and writer, for tests that drive each side alone.
    pub fn into_parts(self) -> (FrameReader<OwnedReadHalf>, FrameWriter<OwnedWriteHalf>) {
        (self.reader, self.writer)
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &ClientMessage) {
        self.writer.write_message(msg).await.expect("send");
    }

    /// Sends raw bytes (malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_raw(bytes).await.expect("send_raw");
    }

    /// Sends a request frame.
    pub async fn send_request(&mut self, id: u64, request: Request) {
        self.send(&ClientMessage::Request(RequestFrame { id, request }))
            .await;
    }

    /// The next message, or `None` at a clean end of stream. Panics on a read
    /// error or after [`ANSWER_TIMEOUT`].
    pub async fn recv(&mut self) -> Option<ServerMessage> {
        tokio::time::timeout(ANSWER_TIMEOUT, self.reader.read_message())
            .await
            .expect("no answer from the broker in time")
            .expect("reading from the broker")
    }

    /// The next response frame; panics on anything else.
    pub async fn recv_response(&mut self) -> ResponseFrame {
        match self.recv().await {
            Some(ServerMessage::Response(r)) => r,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    /// Sends `request` with `id` and returns its result.
    pub async fn call(
        &mut self,
        id: u64,
        request: Request,
    ) -> Result<Response, kontext_broker_protocol::BrokerError> {
        self.send_request(id, request).await;
        let r = self.recv_response().await;
        assert_eq!(r.id, id, "response id");
        r.result
    }

    /// Ping → Pong, asserted.
    pub async fn ping(&mut self, id: u64) {
        assert_eq!(self.call(id, Request::Ping).await, Ok(Response::Pong));
    }

    /// The broker's status.
    pub async fn status(&mut self, id: u64) -> StatusReport {
        match self.call(id, Request::Status).await {
            Ok(Response::Status(s)) => s,
            other => panic!("expected Status, got {other:?}"),
        }
    }

    /// Waits until the broker closes the connection, asserting it sends nothing
    /// more. `within` is a safety net.
    pub async fn expect_closed(&mut self, within: Duration) -> Closed {
        let read = tokio::time::timeout(within, self.reader.read_frame())
            .await
            .expect("connection was not closed in time");
        match read {
            Ok(None) => Closed::Eof,
            Err(kontext_broker_protocol::Error::Io(e))
                if e.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                Closed::Reset
            }
            other => panic!("expected the connection to close, got {other:?}"),
        }
    }
}
