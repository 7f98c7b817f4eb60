//! A scriptable in-test broker speaking the real wire protocol: the one mock
//! that the client's and `broker-ctl`'s tests share.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use kontext_broker_protocol::{
    BrokerError, ClientMessage, FrameReader, FrameWriter, Request, Response, ResponseFrame,
    ServerMessage, Token, WatchEvent, Welcome, PROTOCOL_VERSION,
};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What the mock does with one request.
pub enum Action {
    /// Answer with this result.
    Reply(Result<Response, BrokerError>),
    /// Never answer.
    Silent,
    /// Close the connection.
    Disconnect,
    /// Reply, then signal (after the reply is queued for the wire, in order).
    ReplyThen(
        Result<Response, BrokerError>,
        tokio::sync::oneshot::Sender<()>,
    ),
}

/// Decides the [`Action`] for each request (other than `Watch`, which the mock
/// serves itself from [`Mock::set_initial`] and [`Mock::push`]).
pub type Handler = Arc<dyn Fn(Request) -> BoxFuture<'static, Action> + Send + Sync>;

/// A [`Handler`] from an async closure.
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Action> + Send + 'static,
{
    Arc::new(move |r| Box::pin(f(r)))
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<Request>>,
    watchers: Mutex<Vec<(mpsc::UnboundedSender<Out>, u64, String)>>,
    /// Events sent to every new watcher right after `Watching`.
    initial: Mutex<Vec<WatchEvent>>,
    /// Close a watcher's connection once its initial events are written.
    hang_up_after_initial: Mutex<bool>,
    conns: Mutex<Vec<JoinHandle<()>>>,
    hellos: Mutex<usize>,
}

/// What a connection writes next, in order.
enum Out {
    Message(Box<ServerMessage>),
    /// Close the connection after everything queued before it.
    Close,
}

impl Out {
    fn message(m: ServerMessage) -> Out {
        Out::Message(Box::new(m))
    }
}

/// A running mock broker; dropping it stops the listener and every connection.
pub struct Mock {
    /// The socket path clients connect to.
    pub path: PathBuf,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
    /// The temp dir holding the socket, when the mock made one.
    _dir: Option<tempfile::TempDir>,
}

/// A token of `generation` that expires `lifetime` seconds from now.
pub fn token(generation: u64, lifetime: u64) -> Token {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    Token {
        access_token: format!("at-{generation}").into(),
        token_type: "Bearer".into(),
        expires_at: now + lifetime,
        issued_at: now,
        generation,
        scopes: vec!["openid".into()],
    }
}

impl Mock {
    /// A mock in a fresh temp dir.
    pub fn start(h: Handler) -> Mock {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.sock");
        let mut m = Mock::start_at(&path, h, Some(PROTOCOL_VERSION));
        m._dir = Some(dir);
        m
    }

    /// A mock at `path` (removing a stale socket file first). `version: None`
    /// answers every Hello with a VersionMismatch error.
    pub fn start_at(path: &Path, h: Handler, version: Option<u32>) -> Mock {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let conn = tokio::spawn(serve(stream, h.clone(), s.clone(), version));
                s.conns.lock().unwrap().push(conn);
            }
        });
        Mock {
            path: path.to_owned(),
            shared,
            accept,
            _dir: None,
        }
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// How many requests received so far match `pred`.
    pub fn count(&self, pred: impl Fn(&Request) -> bool) -> usize {
        self.shared
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| pred(r))
            .count()
    }

    /// How many `Hello`s (connections that reached the handshake) so far.
    pub fn hellos(&self) -> usize {
        *self.shared.hellos.lock().unwrap()
    }

    /// Events sent to every new watcher of their profile right after `Watching`.
    pub fn set_initial(&self, events: Vec<WatchEvent>) {
        *self.shared.initial.lock().unwrap() = events;
    }

    /// Makes every later watcher's connection close once its initial events
    /// are written: a broker that goes away in the middle of a watch.
    pub fn hang_up_after_initial(&self) {
        *self.shared.hang_up_after_initial.lock().unwrap() = true;
    }

    /// Pushes `event` to every watcher; returns how many received it.
    pub fn push(&self, event: WatchEvent) -> usize {
        let mut ws = self.shared.watchers.lock().unwrap();
        ws.retain(|(tx, _, _)| !tx.is_closed());
        let mut n = 0;
        for (tx, id, profile) in ws.iter() {
            if profile == event.profile()
                && tx
                    .send(Out::message(ServerMessage::Event {
                        id: *id,
                        event: event.clone(),
                    }))
                    .is_ok()
            {
                n += 1;
            }
        }
        n
    }

    /// How many watch streams are open.
    pub fn watchers(&self) -> usize {
        let mut ws = self.shared.watchers.lock().unwrap();
        ws.retain(|(tx, _, _)| !tx.is_closed());
        ws.len()
    }

    /// Closes every open connection (the listener keeps accepting).
    pub fn drop_connections(&self) {
        for c in self.shared.conns.lock().unwrap().drain(..) {
            c.abort();
        }
        self.shared.watchers.lock().unwrap().clear();
    }

    /// Stops listening, closes all connections and removes the socket file.
    pub fn stop(self) -> PathBuf {
        self.accept.abort();
        self.drop_connections();
        let _ = std::fs::remove_file(&self.path);
        self.path.clone()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.shared.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

async fn serve(
    stream: tokio::net::UnixStream,
    h: Handler,
    shared: Arc<Shared>,
    version: Option<u32>,
) {
    let (r, w) = stream.into_split();
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(w);
    match reader.read_message::<ClientMessage>().await {
        Ok(Some(ClientMessage::Hello(hello))) => {
            *shared.hellos.lock().unwrap() += 1;
            let reply = match version {
                Some(v) => ServerMessage::Welcome(Welcome {
                    protocol_version: v,
                    broker_version: "mock".into(),
                    pid: std::process::id(),
                }),
                None => ServerMessage::Error(BrokerError::VersionMismatch {
                    broker: hello.protocol_version + 1,
                    client: hello.protocol_version,
                }),
            };
            if writer.write_message(&reply).await.is_err() || version.is_none() {
                return;
            }
        }
        _ => return,
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    let (kill_tx, mut kill_rx) = mpsc::unbounded_channel::<()>();
    // Handler tasks die with this connection (JoinSet aborts on drop).
    let mut handlers = tokio::task::JoinSet::new();
    loop {
        let msg = tokio::select! {
            m = reader.read_message::<ClientMessage>() => m,
            Some(out) = rx.recv() => {
                let Out::Message(out) = out else { break };
                if writer.write_message(&out).await.is_err() {
                    break;
                }
                continue;
            }
            _ = kill_rx.recv() => break,
        };
        let frame = match msg {
            Ok(Some(ClientMessage::Request(f))) => f,
            _ => break,
        };
        shared.requests.lock().unwrap().push(frame.request.clone());
        if let Request::Watch { profile } = &frame.request {
            let _ = tx.send(Out::message(ServerMessage::Response(ResponseFrame {
                id: frame.id,
                result: Ok(Response::Watching),
            })));
            for ev in shared
                .initial
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.profile() == profile)
            {
                let _ = tx.send(Out::message(ServerMessage::Event {
                    id: frame.id,
                    event: ev.clone(),
                }));
            }
            if *shared.hang_up_after_initial.lock().unwrap() {
                let _ = tx.send(Out::Close);
            }
            shared
                .watchers
                .lock()
                .unwrap()
                .push((tx.clone(), frame.id, profile.clone()));
            continue;
        }
        let fut = h(frame.request);
        let tx = tx.clone();
        let kill = kill_tx.clone();
        handlers.spawn(async move {
            match fut.await {
                Action::Reply(result) => {
                    let _ = tx.send(Out::message(ServerMessage::Response(ResponseFrame {
                        id: frame.id,
                        result,
                    })));
                }
                Action::ReplyThen(result, done) => {
                    let _ = tx.send(Out::message(ServerMessage::Response(ResponseFrame {
                        id: frame.id,
                        result,
                    })));
                    let _ = done.send(());
                }
                Action::Silent => {}
                Action::Disconnect => {
                    let _ = kill.send(());
                }
            }
        });
    }
}
