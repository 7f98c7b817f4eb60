//! Floods against the real broker, measured (docs/reliability.md): for each
//! flood, the latency p50/p99 of a well-behaved client's cached `GetToken`
//! (connected before the flood, like a sidecar) and the broker's peak RSS, then
//! its RSS once the flood's connections are closed (and the allocator trimmed).
//!
//! Floods, each for `FLOOD_SECS` (default 5) seconds:
//! - connection flood past the cap: `max_connections` + 1000 connections that
//!   never send a byte;
//! - half-sent frames: 300 greeted connections that send a 64 KiB frame header
//!   and all but the last 1000 bytes of it, then stall (run twice);
//! - slow loris: 300 connections that trickle a valid Hello and requests at one
//!   byte per 20 ms;
//! - garbage frames: 8 loops of connect, one frame of random bytes, read the
//!   error, close.
//!
//! ```text
//! cargo build --release -p kontext-broker --bins
//! cargo bench -p kontext-broker-tests --bench floods
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kontext_broker_client::BrokerClient;
use kontext_broker_protocol::codec::encode_frame;
use kontext_broker_tests::broker_process::{broker_binary, hello, BrokerOptions, BrokerProcess};
use kontext_broker_tests::fake_idp::{FakeIdp, FakeIdpConfig};
use kontext_broker_tests::scenario::{connect, import_fake};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The connection cap configured for the run (the default is 4096; a smaller
/// one keeps "past the cap" within this machine's file descriptor limit).
const CAP: usize = 1024;

/// How long after a flood's connections closed its "after" RSS is read:
/// past the server's allocator trim, 0.5 s after a burst of closes.
const TRIM_SETTLE: Duration = Duration::from_millis(1500);

fn flood_secs() -> Duration {
    Duration::from_secs(
        std::env::var("FLOOD_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// A running flood: its tasks and the flag that stops them.
struct Flood {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Connections or attempts made, for the report.
    made: Arc<AtomicU64>,
}

impl Flood {
    fn new() -> Flood {
        Flood {
            stop: Arc::new(AtomicBool::new(false)),
            tasks: Vec::new(),
            made: Arc::new(AtomicU64::new(0)),
        }
    }

    async fn end(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        self.made.load(Ordering::SeqCst)
    }
}

fn connection_flood(socket: &std::path::Path) -> Flood {
    let mut flood = Flood::new();
    for _ in 0..CAP + 1000 {
        let (socket, stop, made) = (socket.to_owned(), flood.stop.clone(), flood.made.clone());
        flood.tasks.push(tokio::spawn(async move {
            let Ok(_conn) = UnixStream::connect(&socket).await else {
                return;
            };
            made.fetch_add(1, Ordering::SeqCst);
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    flood
}

fn half_sent_frames(socket: &std::path::Path) -> Flood {
    let mut flood = Flood::new();
    for _ in 0..300 {
        let (socket, stop, made) = (socket.to_owned(), flood.stop.clone(), flood.made.clone());
        flood.tasks.push(tokio::spawn(async move {
            let Ok(mut conn) = UnixStream::connect(&socket).await else {
                return;
            };
            if conn
                .write_all(&encode_frame(&hello()).unwrap())
                .await
                .is_err()
            {
                return;
            }
            let mut welcome = [0u8; 256];
            let _ = conn.read(&mut welcome).await;
            let mut partial = (65_536u32).to_be_bytes().to_vec();
            partial.extend(std::iter::repeat_n(0xAB, 65_536 - 1000));
            if conn.write_all(&partial).await.is_ok() {
                made.fetch_add(1, Ordering::SeqCst);
            }
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    flood
}

fn slow_loris(socket: &std::path::Path) -> Flood {
    let mut flood = Flood::new();
    let mut bytes = encode_frame(&hello()).unwrap();
    for id in 0..100 {
        bytes.extend(
            encode_frame(&kontext_broker_protocol::ClientMessage::Request(
                kontext_broker_protocol::RequestFrame {
                    id,
                    request: kontext_broker_protocol::Request::Ping,
                },
            ))
            .unwrap(),
        );
    }
    let bytes = Arc::new(bytes);
    for _ in 0..300 {
        let (socket, stop, made) = (socket.to_owned(), flood.stop.clone(), flood.made.clone());
        let bytes = bytes.clone();
        flood.tasks.push(tokio::spawn(async move {
            let Ok(mut conn) = UnixStream::connect(&socket).await else {
                return;
            };
            made.fetch_add(1, Ordering::SeqCst);
            for b in bytes.iter() {
                if stop.load(Ordering::SeqCst) || conn.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    flood
}

fn garbage_frames(socket: &std::path::Path) -> Flood {
    let mut flood = Flood::new();
    for _ in 0..8 {
        let (socket, stop, made) = (socket.to_owned(), flood.stop.clone(), flood.made.clone());
        flood.tasks.push(tokio::spawn(async move {
            // A thread-local RNG is not `Send`; each task owns a seeded one.
            let mut rng = StdRng::from_os_rng();
            while !stop.load(Ordering::SeqCst) {
                let Ok(mut conn) = UnixStream::connect(&socket).await else {
                    continue;
                };
                let len = (rng.next_u32() % 4096) as usize;
                let mut frame = (len as u32).to_be_bytes().to_vec();
                let mut payload = vec![0u8; len];
                rng.fill_bytes(&mut payload);
                // Half of them skip the Hello, half send it first.
                if rng.next_u32() % 2 == 0 {
                    let _ = conn.write_all(&encode_frame(&hello()).unwrap()).await;
                }
                frame.extend(payload);
                let _ = conn.write_all(&frame).await;
                let mut sink = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut sink)).await;
                made.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    flood
}

/// Measures cached `GetToken` round trips on `client` for `secs` on this thread,
/// while a sampler records the broker's peak RSS.
fn measure(
    rt: &tokio::runtime::Runtime,
    client: &BrokerClient,
    broker: &BrokerProcess,
    for_how_long: Duration,
) -> (Duration, Duration, usize, u64) {
    let pid = broker.pid();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::SeqCst) {
                peak = peak.max(rss_kib(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    let mut samples = Vec::new();
    let until = Instant::now() + for_how_long;
    rt.block_on(async {
        while Instant::now() < until {
            let t = Instant::now();
            client
                .get_token("default", Duration::ZERO)
                .await
                .expect("the well-behaved client was refused");
            samples.push(t.elapsed());
        }
    });
    done.store(true, Ordering::SeqCst);
    let peak = sampler.join().unwrap();
    samples.sort();
    (
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples.len(),
        peak,
    )
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Waits until the broker reports `want` connections (the flood is gone).
fn settle(rt: &tokio::runtime::Runtime, client: &BrokerClient, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    rt.block_on(async {
        loop {
            let status = client.status().await.expect("status");
            if status.broker.connections <= want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} connections still open",
                status.broker.connections
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

fn main() {
    let mut bin = broker_binary();
    if !bin.is_file() {
        bin = bin
            .parent()
            .and_then(|p| p.parent())
            .map(|t| t.join("debug").join("kontext-broker"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| panic!("{} is missing: build kontext-broker first", bin.display()));
    }
    std::env::set_var("KONTEXT_BROKER_BIN", &bin);
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
        .expect("setrlimit");

    // The floods run on their own runtime; the well-behaved client on another.
    let flood_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let idp = flood_rt.block_on(FakeIdp::start(FakeIdpConfig::default()));
    let broker = BrokerProcess::start(BrokerOptions {
        rust_log: "error".into(),
        config_toml: format!("max_connections = {CAP}\n"),
        ..BrokerOptions::default()
    });
    let client = client_rt.block_on(async {
        let client = connect(broker.socket()).await;
        import_fake(&client, "default", &idp).await;
        client
    });
    let secs = flood_secs();
    println!(
        "floods: broker {}, cap {CAP}, {}s per flood",
        bin.display(),
        secs.as_secs()
    );
    println!(
        "{:<28} {:>9} {:>10} {:>10} {:>9} {:>14} {:>14}",
        "flood", "made", "p50", "p99", "requests", "peak RSS KiB", "after KiB"
    );
    let (p50, p99, n, peak) = measure(&client_rt, &client, &broker, secs);
    println!(
        "{:<28} {:>9} {:>10.1?} {:>10.1?} {:>9} {:>14} {:>14}",
        "none (baseline)",
        "-",
        p50,
        p99,
        n,
        peak,
        rss_kib(broker.pid()).unwrap_or(0)
    );
    type Start = fn(&std::path::Path) -> Flood;
    let floods: [(&str, Start); 5] = [
        ("connections past the cap", connection_flood),
        ("half-sent frames", half_sent_frames),
        // Again: what stays after the first must not grow.
        ("half-sent frames, again", half_sent_frames),
        ("slow loris", slow_loris),
        ("garbage frames", garbage_frames),
    ];
    for (name, start) in floods {
        let flood = {
            let _guard = flood_rt.enter();
            start(broker.socket())
        };
        // Let the flood build up before measuring.
        std::thread::sleep(Duration::from_millis(500));
        let (p50, p99, n, peak) = measure(&client_rt, &client, &broker, secs);
        let made = flood_rt.block_on(flood.end());
        settle(&client_rt, &client, 1);
        // The server trims the allocator 0.5 s after a burst of closed
        // connections (broker/src/server/trim.rs); read the RSS after that.
        std::thread::sleep(TRIM_SETTLE);
        let after = rss_kib(broker.pid()).unwrap_or(0);
        println!("{name:<28} {made:>9} {p50:>10.1?} {p99:>10.1?} {n:>9} {peak:>14} {after:>14}");
    }
    drop(client);
    drop(broker);
}
