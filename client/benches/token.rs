//! Costs of getting a token: `BrokerTokenSource::token()` from cache, a
//! `get_token` round trip, and a raw Unix-socket echo of similar size for scale
//! (contract §9: compare ratios within one run, never absolute numbers).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use kontext_broker_client::{BrokerClient, BrokerTokenSource, TokenSource};
use kontext_broker_protocol::{Request, Response, WatchEvent};
use kontext_broker_testutil::mock_broker::{handler, token, Action, Mock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (mock, src, client) = rt.block_on(async {
        let mock = Mock::start(handler(|r| async move {
            match r {
                Request::GetToken { .. } => Action::Reply(Ok(Response::Token(token(1, 3600)))),
                _ => Action::Silent,
            }
        }));
        mock.set_initial(vec![WatchEvent::Token {
            profile: "default".into(),
            token: token(1, 3600),
        }]);
        let src = BrokerTokenSource::builder().socket(&mock.path).build();
        let mut u = src.updates();
        u.wait_for(|_| src.cached_generation() == Some(1))
            .await
            .unwrap();
        let client = BrokerClient::connect_to(&mock.path).await.unwrap();
        (mock, src, client)
    });

    c.bench_function("token_source_fresh", |b| {
        b.to_async(&rt).iter(|| src.token())
    });
    c.bench_function("get_token_roundtrip", |b| {
        b.to_async(&rt)
            .iter(|| client.get_token("default", Duration::ZERO))
    });

    // Raw echo of a token-sized frame over a Unix socket pair, same runtime.
    let (a, mut e) = rt.block_on(async { tokio::net::UnixStream::pair().unwrap() });
    rt.spawn(async move {
        let mut buf = [0u8; 260];
        while e.read_exact(&mut buf).await.is_ok() {
            if e.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    // The lock is taken once per batch, not per iteration, so it costs nothing measurable.
    let a = std::sync::Arc::new(tokio::sync::Mutex::new(a));
    c.bench_function("raw_unix_echo_260b", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let a = a.clone();
            async move {
                let mut a = a.lock().await;
                let mut buf = [7u8; 260];
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    a.write_all(&buf).await.unwrap();
                    a.read_exact(&mut buf).await.unwrap();
                }
                start.elapsed()
            }
        })
    });
    drop(mock);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
