//! Thousands of concurrent clients against the real broker: all held open, all
//! answered, broker RSS measured idle and loaded (contract §9 budget: 1000 idle
//! clients within 30 MB; the figure is printed, the budget is the benchmark's).

use std::time::Duration;

use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess, RawClient};

const CLIENTS: usize = 2000;
/// Connections opened at once, so the listen backlog is never the limit.
const CONNECT_BATCH: usize = 100;

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        soft as usize > CLIENTS + 100,
        "RLIMIT_NOFILE hard limit {soft} is too low for {CLIENTS} clients"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_clients_are_held_and_answered() {
    raise_fd_limit();
    let broker = BrokerProcess::start(BrokerOptions {
        // Per-connection debug lines would dominate the run.
        rust_log: "info".into(),
        ..Default::default()
    });
    let mut control = broker.client().await;
    control.ping(0).await;
    let idle_kib = broker.rss_kib();

    let mut clients: Vec<RawClient> = Vec::with_capacity(CLIENTS);
    while clients.len() < CLIENTS {
        let n = CONNECT_BATCH.min(CLIENTS - clients.len());
        let batch = futures::future::join_all((0..n).map(|_| RawClient::connect(broker.socket())));
        clients.extend(batch.await);
    }
    let status = control.status(1).await;
    assert_eq!(status.broker.connections as usize, CLIENTS + 1);
    let held_kib = broker.rss_kib();

    // Every held connection is answered, all at once.
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                c.ping(i as u64).await;
                c
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(CLIENTS);
    for t in tasks {
        clients.push(t.await.expect("client task"));
    }
    let answered_kib = broker.rss_kib();

    println!(
        "broker RSS: idle {} KiB, {CLIENTS} connections held {} KiB, after all answered {} KiB",
        idle_kib.map_or("?".into(), |v| v.to_string()),
        held_kib.map_or("?".into(), |v| v.to_string()),
        answered_kib.map_or("?".into(), |v| v.to_string()),
    );
    drop(clients);
    // Still up, and the closes are all noticed.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut id = 10;
    loop {
        let open = control.status(id).await.broker.connections;
        if open == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{open} connections still counted"
        );
        id += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
