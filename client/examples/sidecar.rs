//! A sidecar that sends an authenticated heartbeat to a backend at a fixed interval.
//!
//! ```text
//! cargo run -p kontext-broker-client --features tower --example sidecar -- \
//!     http://127.0.0.1:8080/heartbeat [INTERVAL_MS=1000] [PROFILE=default]
//! ```
//!
//! Tokens come from the broker through [`BrokerTokenSource`] (pushed, cached,
//! no IPC per request) and are attached by [`BearerLayer`], which retries once
//! after a 401. A dead login is logged once, not on every heartbeat.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kontext_broker_client::bearer::{BearerBody, BearerLayer, BoxError};
use kontext_broker_client::{BrokerTokenSource, Error};
use tower::{Layer, ServiceExt};

/// What the last heartbeat found, so each condition is logged once on entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    Starting,
    Ok,
    ReauthRequired,
    Failing(String),
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let Some(url) = args.next() else {
        eprintln!("usage: sidecar URL [INTERVAL_MS] [PROFILE]");
        std::process::exit(2);
    };
    let interval = Duration::from_millis(
        args.next()
            .map_or(1000, |s| s.parse().expect("INTERVAL_MS")),
    );
    let profile = args.next().unwrap_or_else(|| "default".into());

    let source = BrokerTokenSource::new(profile);
    let http = Client::builder(TokioExecutor::new()).build_http::<BearerBody>();
    let svc = BearerLayer::new(source).layer(http);

    let mut health = Health::Starting;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beat: u64 = 0;
    loop {
        ticker.tick().await;
        beat += 1;
        tracing::debug!(beat, "heartbeat attempt");
        let req = http::Request::post(&url)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(Bytes::from(format!(
                "{{\"beat\":{beat}}}"
            ))))
            .expect("valid request");
        let now = match svc.clone().oneshot(req).await {
            Ok(resp) if resp.status().is_success() => {
                let _ = resp.into_body().collect().await;
                Health::Ok
            }
            Ok(resp) => Health::Failing(format!("backend answered {}", resp.status())),
            Err(e) => classify(e),
        };
        if now != health {
            match &now {
                Health::Ok => tracing::info!(beat, "heartbeats succeed"),
                Health::ReauthRequired => {
                    tracing::error!(
                        "login expired; run `kontext login` (logged once until it recovers)"
                    )
                }
                Health::Failing(why) => tracing::warn!(beat, %why, "heartbeat failing"),
                Health::Starting => {}
            }
            health = now;
        }
    }
}

fn classify(e: BoxError) -> Health {
    match e.downcast_ref::<Error>() {
        Some(Error::ReauthRequired { .. }) => Health::ReauthRequired,
        Some(other) => Health::Failing(other.to_string()),
        None => Health::Failing(e.to_string()),
    }
}
