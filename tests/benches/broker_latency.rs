//! Benchmark (contract §9): a cached `GetToken` round trip through the real broker,
//! against a raw Unix-socket echo of the same frame size in the same run.
//! The budget is a ratio of at most 1.5, because absolute figures depend on the
//! machine (context switches are expensive on small VMs). The full suite, with
//! more rows and repeated runs, is `tests/bench/run.sh` (BENCHMARKS.md).
//!
//! Run: `cargo build --release -p kontext-broker --bins &&
//!       cargo bench -p kontext-broker-tests --bench broker_latency`

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use kontext_broker_protocol::codec::encode_frame;
use kontext_broker_protocol::{Response, ResponseFrame, ServerMessage};
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess};
use kontext_broker_tests::fake_idp::{FakeIdp, FakeIdpConfig};
use kontext_broker_tests::scenario::{connect, import_fake};

const SAMPLES: usize = 20_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// Median and p99 of `SAMPLES` blocking echoes of `size` bytes through a Unix socket.
fn raw_echo(size: usize) -> (Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; size];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut c = UnixStream::connect(&path).unwrap();
    let out = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let t = Instant::now();
        c.write_all(&out).unwrap();
        c.read_exact(&mut back).unwrap();
        samples.push(t.elapsed());
    }
    drop(c);
    server.join().unwrap();
    samples.sort();
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let idp = rt.block_on(FakeIdp::start(FakeIdpConfig::default()));
    let broker = BrokerProcess::start(BrokerOptions {
        rust_log: "warn".into(),
        ..BrokerOptions::default()
    });
    let (median, p99, frame) = rt.block_on(async {
        let client = connect(broker.socket()).await;
        import_fake(&client, "default", &idp).await;
        let token = client.get_token("default", Duration::ZERO).await.unwrap();
        let frame = encode_frame(&ServerMessage::Response(ResponseFrame {
            id: 1,
            result: Ok(Response::Token(token)),
        }))
        .unwrap()
        .len();
        for _ in 0..2000 {
            client.get_token("default", Duration::ZERO).await.unwrap();
        }
        let mut samples = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let t = Instant::now();
            client.get_token("default", Duration::ZERO).await.unwrap();
            samples.push(t.elapsed());
        }
        samples.sort();
        (percentile(&samples, 0.5), percentile(&samples, 0.99), frame)
    });
    let (echo_median, echo_p99) = raw_echo(frame);
    let ratio = median.as_secs_f64() / echo_median.as_secs_f64();
    println!("cached GetToken via broker ({frame} B response): median {median:?}, p99 {p99:?}");
    println!(
        "raw Unix echo of {frame} B:                  median {echo_median:?}, p99 {echo_p99:?}"
    );
    println!(
        "ratio (median): {ratio:.2} (budget 1.5) {}",
        if ratio <= 1.5 { "OK" } else { "OVER BUDGET" }
    );
    println!(
        "broker RSS after the run: {} KiB",
        broker.rss_kib().unwrap_or(0)
    );
}
