//! Frame decoding plus request dispatch: the bytes a client could send.
//!
//! Each input becomes a byte stream. It is decoded in-process exactly as the
//! broker's reader does (length prefix, frame cap, bincode), and every message
//! that decodes must re-encode to the same bytes. Then the same stream is sent
//! to a real broker server (listener, handler, service, engines and store) in
//! this process, whose token endpoint answers instantly and whose HTTP clients
//! cannot reach any network. The broker must answer and close the connection,
//! never panic, hang or stop serving.
//!
//! Input layout: byte 0 is the mode. Even: the harness sends a valid `Hello`,
//! then frames each chunk `[u16 LE length][payload]` of the rest. Odd: the rest
//! is sent raw, length prefixes and all.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::harness::{scratch_dir, service_in, SEEDED};
use kontext_broker::service::Service;
use kontext_broker_protocol::codec::{self, encode, encode_frame};
use kontext_broker_protocol::{ClientMessage, FrameReader, Hello, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::runtime::Runtime;

/// How long one connection may take before the broker counts as hung.
const HANG: Duration = Duration::from_secs(30);

struct Broker {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    profile_file: PathBuf,
    service: Service,
}

struct Harness {
    rt: Runtime,
    broker: Broker,
}

fn start(rt: &Runtime) -> Broker {
    let dir = scratch_dir();
    let socket = dir.path().join("broker.sock");
    let profile_file = dir
        .path()
        .join("state/profiles")
        .join(format!("{SEEDED}.age"));
    let service = rt.block_on(async {
        let service = service_in(dir.path(), socket.clone()).await;
        let listener = tokio::net::UnixListener::bind(&socket).expect("binding");
        tokio::spawn(kontext_broker::server::serve(listener, service.clone()));
        service
    });
    Broker {
        _dir: dir,
        socket,
        profile_file,
        service,
    }
}

fn harness() -> &'static Mutex<Harness> {
    static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
    HARNESS.get_or_init(|| {
        // libFuzzer's main is not Rust's: SIGPIPE is not ignored for us.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        super::harness::cut_network();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let broker = start(&rt);
        Mutex::new(Harness { rt, broker })
    })
}

/// The byte stream the input stands for.
fn stream(data: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    if mode % 2 == 1 {
        return rest.to_vec();
    }
    let hello = ClientMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        client_name: "fuzz".into(),
        client_version: "0".into(),
    });
    let mut out = encode_frame(&hello).expect("hello encodes");
    let mut rest = rest;
    while rest.len() >= 2 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let chunk = &rest[2..(2 + len).min(rest.len())];
        out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        out.extend_from_slice(chunk);
        rest = &rest[2 + chunk.len()..];
    }
    out
}

/// Decodes `bytes` the way the broker's reader does; checks round trips.
async fn decode_all(bytes: &[u8]) {
    let mut reader = FrameReader::new(bytes);
    while let Ok(Some(frame)) = reader.read_frame().await {
        assert!(frame.len() <= kontext_broker_protocol::MAX_FRAME_LEN);
        let _ = codec::peek_hello_version(&frame);
        if let Ok(message) = codec::decode::<ClientMessage>(&frame) {
            let again = encode(&message).expect("a decoded message encodes");
            assert_eq!(again, &frame[..], "decode/encode is not a round trip");
        }
    }
}

/// Sends `bytes` to the broker and reads until it closes.
async fn exchange(socket: &PathBuf, bytes: &[u8]) {
    let mut conn = UnixStream::connect(socket)
        .await
        .expect("broker stopped accepting");
    let run = async {
        // The broker may close first (a bad frame): a failed write is fine.
        let _ = conn.write_all(bytes).await;
        let _ = conn.shutdown().await;
        let mut sink = Vec::new();
        let _ = conn.read_to_end(&mut sink).await;
    };
    tokio::time::timeout(HANG, run)
        .await
        .expect("the broker did not close the connection in time");
}

/// Runs one input; panics on a finding.
pub fn check(data: &[u8]) {
    let bytes = stream(data);
    let mut h = harness().lock().unwrap_or_else(|p| p.into_inner());
    let Harness { rt, broker } = &mut *h;
    rt.block_on(decode_all(&bytes));
    rt.block_on(exchange(&broker.socket, &bytes));
    if broker.service.shutdown_token().is_cancelled() {
        // A `Shutdown` request: start a fresh broker for the next input.
        let old = std::mem::replace(broker, start(rt));
        rt.block_on(old.service.drain());
    } else if !broker.profile_file.exists() {
        // A `Logout`: put the seeded profile back.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let record = super::harness::seeded_record(now);
        let _ = rt.block_on(broker.service.install(record));
    }
}
