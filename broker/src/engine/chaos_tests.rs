//! IdP chaos on the injected clock: a 10-minute outage, a 50% flapping error
//! rate, 30 s latency spikes and malformed answers.
//!
//! The engine runs on a [`ManualClock`] and calls the real token-endpoint
//! client ([`crate::idp::Idp`]: openidconnect, the lenient rescue parser, the
//! error classifier) against a scripted HTTP server on loopback, and saves to a
//! real [`Store`]. A [`Chaos`] wrapper adds what a loopback server cannot do on
//! a manual clock: refused connections (an outage), a coin-flip 503 from a
//! seeded RNG (flapping), and latency on the manual clock. Latency longer than
//! the HTTP client's total timeout ends, like reqwest's timeout does, with a
//! transient error at that timeout.
//!
//! What every test holds the engine to:
//! - no request waits on the manual clock: each one resolves while the clock
//!   stands still, except a request joining a refresh in flight, which resolves
//!   when that refresh ends, at most [`HTTP_TIMEOUT`] after it began;
//! - a token is served for as long as it is unexpired, whatever the IdP does;
//! - after a failure, the next IdP call is exactly one backoff delay later, and
//!   the delays follow the schedule: 1 s doubling, up to 100% jitter, cap 5 min;
//! - once the IdP answers again, the first retry succeeds.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::timeout;

use super::*;
use crate::clock::ManualClock;
use crate::idp::Idp;
use crate::store::{Store, StoreOptions, StoredAccessToken};

const T0_MS: u64 = 1_800_000_000_000;
/// Real-time safety net for waits on events; never a timing assumption.
const SAFETY: Duration = Duration::from_secs(20);
/// The HTTP client's total timeout per call (config `http_timeout_secs`).
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A closed loopback port: connections are refused at once.
const DEAD_TOKEN_URL: &str = "http://127.0.0.1:1/token";

/// A loopback HTTP server that answers token requests from a script, or by
/// default with a fresh rotation (`at-N`, `rt-N`, `expires_in` = `ttl`).
struct ScriptServer {
    addr: SocketAddr,
    shared: Arc<ScriptShared>,
    task: tokio::task::JoinHandle<()>,
}

struct ScriptShared {
    answers: Mutex<VecDeque<(u16, String)>>,
    /// Refresh tokens presented, in order.
    presented: Mutex<Vec<String>>,
    issued: AtomicU64,
    ttl: AtomicU64,
}

impl ScriptServer {
    async fn start(ttl: u64) -> ScriptServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(ScriptShared {
            answers: Mutex::new(VecDeque::new()),
            presented: Mutex::new(Vec::new()),
            issued: AtomicU64::new(0),
            ttl: AtomicU64::new(ttl),
        });
        let task = tokio::spawn(serve(listener, shared.clone()));
        ScriptServer { addr, shared, task }
    }

    fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn push(&self, status: u16, body: &str) {
        self.shared
            .answers
            .lock()
            .unwrap()
            .push_back((status, body.to_owned()));
    }

    fn presented(&self) -> Vec<String> {
        self.shared.presented.lock().unwrap().clone()
    }
}

impl Drop for ScriptServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, shared: Arc<ScriptShared>) {
    while let Ok((mut conn, _)) = listener.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let body_start = loop {
                let Ok(n) = conn.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break end + 4;
                }
            };
            let form = String::from_utf8_lossy(&buf[body_start..]).into_owned();
            let presented = url::form_urlencoded::parse(form.as_bytes())
                .find(|(k, _)| k == "refresh_token")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            shared.presented.lock().unwrap().push(presented);
            let scripted = shared.answers.lock().unwrap().pop_front();
            let (status, body) = scripted.unwrap_or_else(|| {
                let n = shared.issued.fetch_add(1, Ordering::SeqCst) + 1;
                let ttl = shared.ttl.load(Ordering::SeqCst);
                (
                    200,
                    format!(
                        r#"{{"access_token":"at-{n}","token_type":"Bearer","expires_in":{ttl},"refresh_token":"rt-{n}"}}"#
                    ),
                )
            });
            let head = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// How the IdP behaves for the next calls.
enum Mode {
    /// Answers from the script server.
    Up,
    /// Connections are refused (the IdP host is down).
    Refused,
    /// Each call fails with 503 with probability 1/2, drawn from a seeded RNG.
    Flapping(Box<StdRng>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Transient,
    Rejected,
}

/// One token-endpoint call: when it started and ended (manual ms), and how.
#[derive(Debug, Clone, Copy)]
struct Call {
    at_ms: u64,
    ended_ms: u64,
    outcome: Option<Outcome>,
}

/// The chaos layer around the real token-endpoint client.
struct Chaos {
    clock: ManualClock,
    idp: Idp,
    mode: Mutex<Mode>,
    latency: Mutex<Duration>,
    calls: Mutex<Vec<Call>>,
    changed: Notify,
}

impl Chaos {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn set_latency(&self, latency: Duration) {
        *self.latency.lock().unwrap() = latency;
    }

    /// Waits until `n` calls have started.
    async fn wait_started(&self, n: usize) {
        timeout(SAFETY, async {
            loop {
                let changed = self.changed.notified();
                if self.count() >= n {
                    return;
                }
                changed.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("IdP call {n} did not start"));
    }
}

impl TokenEndpoint for Arc<Chaos> {
    fn refresh(
        &self,
        record: ProfileRecord,
    ) -> BoxFuture<'static, Result<Refreshed, RefreshError>> {
        let me = self.clone();
        Box::pin(async move {
            let index = {
                let mut calls = me.calls.lock().unwrap();
                calls.push(Call {
                    at_ms: me.clock.now_ms(),
                    ended_ms: 0,
                    outcome: None,
                });
                calls.len() - 1
            };
            me.changed.notify_waiters();
            let result = me.answer(record).await;
            let outcome = match &result {
                Ok(_) => Outcome::Ok,
                Err(RefreshError::Transient(_)) => Outcome::Transient,
                Err(RefreshError::Rejected(_) | RefreshError::ClientRejected(_)) => {
                    Outcome::Rejected
                }
            };
            {
                let mut calls = me.calls.lock().unwrap();
                calls[index].outcome = Some(outcome);
                calls[index].ended_ms = me.clock.now_ms();
            }
            me.changed.notify_waiters();
            result
        })
    }
}

impl Chaos {
    async fn answer(&self, mut record: ProfileRecord) -> Result<Refreshed, RefreshError> {
        let latency = *self.latency.lock().unwrap();
        if latency >= HTTP_TIMEOUT {
            self.clock.sleep(HTTP_TIMEOUT).await;
            return Err(RefreshError::Transient(
                "request failed: operation timed out".into(),
            ));
        }
        if !latency.is_zero() {
            self.clock.sleep(latency).await;
        }
        let fail = match &mut *self.mode.lock().unwrap() {
            Mode::Up => false,
            Mode::Refused => {
                record.endpoints.token = DEAD_TOKEN_URL.into();
                false
            }
            Mode::Flapping(rng) => rng.random_bool(0.5),
        };
        if fail {
            return Err(RefreshError::Transient(
                "temporarily_unavailable: flapping".into(),
            ));
        }
        self.idp.refresh(record).await
    }
}

struct Rig {
    clock: ManualClock,
    server: ScriptServer,
    chaos: Arc<Chaos>,
    store: Arc<Store>,
    engine: EngineHandle,
    _dir: tempfile::TempDir,
}

/// A profile whose token was issued at `T0` and lives `lifetime` seconds.
fn record(token_url: String, lifetime: u64) -> ProfileRecord {
    let issued = T0_MS / 1000;
    ProfileRecord::builder("chaos", "http://127.0.0.1", "cli", token_url)
        .scopes(["openid"])
        .refresh_token("rt-0")
        .access_token(StoredAccessToken::bearer(
            "at-0",
            issued,
            issued + lifetime,
            ["openid"],
        ))
        .generation(1)
        .build()
}

/// An engine whose token lives `lifetime` s and whose IdP issues `ttl` s tokens.
async fn rig(lifetime: u64, ttl: u64) -> Rig {
    let clock = ManualClock::new(T0_MS);
    let server = ScriptServer::start(ttl).await;
    let config = crate::config::Config::default();
    let chaos = Arc::new(Chaos {
        clock: clock.clone(),
        idp: Idp::new(&config).unwrap(),
        mode: Mutex::new(Mode::Up),
        latency: Mutex::new(Duration::ZERO),
        calls: Mutex::new(Vec::new()),
        changed: Notify::new(),
    });
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("state"), StoreOptions::default()).unwrap());
    let record = record(server.url(), lifetime);
    store.save(&record).unwrap();
    let deps = EngineDeps {
        clock: Arc::new(clock.clone()),
        endpoint: Arc::new(chaos.clone()),
        persist: store.clone(),
        config: EngineConfig {
            refresh_at: 0.8,
            refresh_jitter: 0.05,
            backoff_initial: BACKOFF_INITIAL,
            backoff_max: BACKOFF_MAX,
            backoff_jitter: true,
            reauth_message: "Session expired, run `kontext login` to re-authenticate".into(),
            default_token_lifetime: config.default_token_lifetime,
            profile_token_lifetimes: Default::default(),
        },
    };
    let (events, _) = broadcast::channel(64);
    let engine = spawn(record, deps, events);
    Rig {
        clock,
        server,
        chaos,
        store,
        engine,
        _dir: dir,
    }
}

impl Rig {
    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn jump_to(&self, ms: u64) {
        let now = self.now();
        assert!(ms >= now, "time only moves forward");
        self.clock.advance(Duration::from_millis(ms - now));
    }

    fn snapshot(&self) -> Snapshot {
        self.engine.snapshot.borrow().clone()
    }

    /// Waits until call `n` has ended and the engine has taken its outcome in.
    async fn settle(&self, n: usize) -> Snapshot {
        self.chaos.wait_started(n).await;
        let mut rx = self.engine.snapshot.clone();
        let chaos = self.chaos.clone();
        timeout(SAFETY, async {
            loop {
                let ended = chaos.calls()[n - 1].outcome.is_some();
                if ended {
                    let snap = rx
                        .wait_for(|s| s.phase != PhaseKind::Busy)
                        .await
                        .expect("engine gone")
                        .clone();
                    return snap;
                }
                let changed = chaos.changed.notified();
                if chaos.calls()[n - 1].outcome.is_some() {
                    continue;
                }
                changed.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("IdP call {n} did not settle"))
    }

    /// `get_token(0)` with the clock standing still: it must resolve at once.
    async fn ask(&self) -> Result<Token, BrokerError> {
        let before = self.now();
        let answer = timeout(SAFETY, self.engine.get_token(0))
            .await
            .expect("a request waited on the manual clock (it would hang)");
        assert_eq!(self.now(), before);
        answer
    }

    /// The request must get the token if one is unexpired, else `IdpUnavailable`.
    async fn assert_served(&self) {
        let current = self.snapshot().token;
        let now = self.now();
        match self.ask().await {
            Ok(token) => assert!(
                policy::unexpired(&token, now),
                "an expired token was served"
            ),
            Err(BrokerError::IdpUnavailable {
                retry_after_secs, ..
            }) => {
                assert!(retry_after_secs >= 1);
                assert!(
                    current.is_none_or(|t| !policy::unexpired(&t, now)),
                    "IdpUnavailable although a valid token was held"
                );
            }
            Err(e) => panic!("unexpected answer: {e:?}"),
        }
    }

    /// Spawns a request and returns once the actor has taken it in (the actor
    /// republishes its snapshot after every command it handles, and nothing
    /// else can wake it while the clock stands still).
    async fn queued<T: Send + 'static>(
        &self,
        request: impl std::future::Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        let mut rx = self.engine.snapshot.clone();
        rx.mark_unchanged();
        let handle = tokio::spawn(request);
        timeout(SAFETY, rx.changed())
            .await
            .expect("the actor did not take the request")
            .expect("engine gone");
        handle
    }

    /// The backoff delay the engine chose when failed call `n` ended.
    fn backoff_after(&self, snap: &Snapshot, n: usize) -> u64 {
        let PhaseKind::Backoff { until_ms } = snap.phase else {
            panic!("not backing off after failed call {n}: {:?}", snap.phase)
        };
        until_ms - self.chaos.calls()[n - 1].ended_ms
    }
}

/// Delay bounds after the `k`-th consecutive failure (k = 0 first): base
/// `1 s × 2^k`, up to 100% jitter on top, never past 5 min.
fn backoff_bounds_ms(k: u32) -> (u64, u64) {
    let max = BACKOFF_MAX.as_millis() as u64;
    let base = (BACKOFF_INITIAL.as_millis() as u64)
        .saturating_mul(1u64 << k.min(20))
        .min(max);
    (base, (2 * base).min(max))
}

fn assert_backoff(k: u32, delay_ms: u64) {
    let (lo, hi) = backoff_bounds_ms(k);
    assert!(
        (lo..=hi).contains(&delay_ms),
        "failure {}: backoff {delay_ms} ms outside [{lo}, {hi}]",
        k + 1
    );
}

#[tokio::test]
async fn a_ten_minute_outage_serves_the_valid_token_and_retries_on_the_backoff_schedule() {
    let rig = rig(3600, 3600).await;
    let (_, _watcher) = rig.engine.subscribe(); // a sidecar: proactive refresh on
    rig.chaos.set_mode(Mode::Refused);
    let start = rig.snapshot().refresh_due_ms.unwrap();
    let end = start + 600_000;
    rig.jump_to(start);
    let mut n = 1;
    let mut failures = 0u32;
    let recovered_at = loop {
        let snap = rig.settle(n).await;
        let call = rig.chaos.calls()[n - 1];
        if call.outcome == Some(Outcome::Ok) {
            break call.at_ms;
        }
        assert_eq!(call.outcome, Some(Outcome::Transient));
        let delay = rig.backoff_after(&snap, n);
        assert_backoff(failures, delay);
        failures += 1;
        // The hour-long token outlives the outage: it is served throughout.
        let token = rig.ask().await.expect("the valid token is served");
        assert_eq!(token.generation, 1);
        assert_eq!(rig.chaos.count(), n, "no call before the backoff ends");
        let retry_at = call.ended_ms + delay;
        if retry_at > end && matches!(*rig.chaos.mode.lock().unwrap(), Mode::Refused) {
            // The IdP comes back before the next retry.
            rig.jump_to(end.max(rig.now()));
            rig.chaos.set_mode(Mode::Up);
            rig.ask().await.unwrap();
            assert_eq!(rig.chaos.count(), n);
        }
        rig.jump_to(retry_at);
        n += 1;
    };
    // Recovery: the first retry after the IdP came back succeeded, so it came
    // within one backoff step of the end of the outage.
    assert!(recovered_at >= end);
    let last_delay = recovered_at - rig.chaos.calls()[n - 2].ended_ms;
    assert!(recovered_at - end <= last_delay);
    let outage_calls = n - 1;
    // 600 s of delays from 1 s doubling with up to 100% jitter: 9 or 10 calls
    // (all minimal: 1+2+…+256 = 511 s, then 300 s; all maximal: 2+4+…+256 = 510 s).
    assert!(
        (9..=10).contains(&outage_calls),
        "{outage_calls} calls in a 10-minute outage"
    );
    let token = rig.ask().await.unwrap();
    assert_eq!(token.generation, 2);
    assert_eq!(rig.store.load("chaos").unwrap().generation, 2);
    eprintln!(
        "outage: {outage_calls} IdP calls in 600 s, recovered {} ms after the IdP came back",
        recovered_at - end
    );
}

#[tokio::test]
async fn after_expiry_an_outage_answers_unavailable_at_once_and_never_calls_during_backoff() {
    let rig = rig(100, 100).await;
    let (_, _watcher) = rig.engine.subscribe();
    rig.chaos.set_mode(Mode::Refused);
    rig.jump_to(rig.snapshot().refresh_due_ms.unwrap());
    let mut n = 1;
    // Fail until the token has expired, serving it while it lasts.
    let expires_ms = T0_MS + 100_000;
    loop {
        let snap = rig.settle(n).await;
        rig.assert_served().await;
        let delay = rig.backoff_after(&snap, n);
        assert_backoff(n as u32 - 1, delay);
        if rig.now() >= expires_ms {
            break;
        }
        rig.jump_to(rig.chaos.calls()[n - 1].ended_ms + delay);
        n += 1;
    }
    // Expired and backing off: 200 concurrent requests are answered at once,
    // with no IdP call among them.
    let calls = rig.chaos.count();
    let answers = timeout(SAFETY, join_all_requests(&rig.engine, 200))
        .await
        .expect("requests hung during the backoff");
    for answer in answers {
        match answer {
            Err(BrokerError::IdpUnavailable {
                retry_after_secs,
                detail,
            }) => {
                assert!(retry_after_secs >= 1);
                assert!(detail.contains("request failed"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(rig.chaos.count(), calls);
    assert_eq!(rig.engine.status().state, ProfileState::Backoff);
    // The IdP comes back; the next retry recovers.
    rig.chaos.set_mode(Mode::Up);
    let snap = rig.snapshot();
    let PhaseKind::Backoff { until_ms } = snap.phase else {
        unreachable!()
    };
    rig.jump_to(until_ms);
    rig.settle(calls + 1).await;
    assert_eq!(rig.ask().await.unwrap().generation, 2);
}

async fn join_all_requests(engine: &EngineHandle, n: usize) -> Vec<Result<Token, BrokerError>> {
    futures::future::join_all((0..n).map(|_| engine.get_token(0))).await
}

#[tokio::test]
async fn a_thirty_second_latency_spike_never_holds_a_request_past_the_http_timeout() {
    // 90 s tokens: the refresh is due at 67.5-72 s, so a request at the end of
    // a 15 s timeout (82.5-87 s) finds no cached token that qualifies (the
    // margin is 9 s) and must join the refresh in flight.
    let rig = rig(90, 100).await;
    let (_, _watcher) = rig.engine.subscribe();
    rig.chaos.set_latency(Duration::from_secs(30));
    rig.jump_to(rig.snapshot().refresh_due_ms.unwrap());
    rig.chaos.wait_started(1).await;
    let started = rig.chaos.calls()[0].at_ms;
    let gives_up = started + HTTP_TIMEOUT.as_millis() as u64;
    // While the refresh hangs, the valid token is served from cache.
    assert_eq!(rig.ask().await.unwrap().generation, 1);
    rig.jump_to(gives_up - 1);
    let cached = rig.snapshot().token.unwrap();
    assert!(
        !policy::serves(&cached, rig.now(), 0),
        "must join the refresh"
    );
    let engine = rig.engine.clone();
    let waiting = rig.queued(async move { engine.get_token(0).await }).await;
    assert!(!waiting.is_finished(), "answered before the refresh ended");
    // It is answered when the call gives up at the HTTP timeout, not later,
    // with the token that is still valid (it expires at 90 s).
    rig.jump_to(gives_up);
    let answer = timeout(SAFETY, waiting)
        .await
        .expect("the request outlived the HTTP timeout")
        .unwrap();
    assert_eq!(answer.unwrap().generation, 1);
    assert_eq!(rig.now(), gives_up);
    let snap = rig.settle(1).await;
    let delay = rig.backoff_after(&snap, 1);
    assert_backoff(0, delay);
    // The spike ends; the next retry, one backoff step later, recovers.
    rig.chaos.set_latency(Duration::ZERO);
    rig.jump_to(gives_up + delay);
    rig.settle(2).await;
    assert_eq!(rig.chaos.calls()[1].outcome, Some(Outcome::Ok));
    assert_eq!(rig.ask().await.unwrap().generation, 2);

    // A spike shorter than the timeout: whoever joined gets the new token
    // when the IdP finally answers.
    rig.chaos.set_latency(Duration::from_secs(10));
    let due = rig.snapshot().refresh_due_ms.unwrap();
    rig.jump_to(due);
    rig.chaos.wait_started(3).await;
    let engine = rig.engine.clone();
    let joined = rig.queued(async move { engine.refresh().await }).await;
    rig.jump_to(due + 10_000);
    let token = timeout(SAFETY, joined).await.unwrap().unwrap().unwrap();
    assert_eq!(token.generation, 3);
    assert_eq!(rig.chaos.count(), 3, "the refresh was joined, not repeated");
    assert!(policy::unexpired(&token, rig.now()));
}

#[tokio::test]
async fn a_fifty_percent_flapping_idp_keeps_tokens_served_and_follows_the_schedule() {
    let rig = rig(20, 20).await;
    let (_, _watcher) = rig.engine.subscribe();
    rig.chaos
        .set_mode(Mode::Flapping(Box::new(StdRng::seed_from_u64(0x5eed_cafe))));
    let mut streak = 0u32;
    let (mut ok, mut failed, mut unavailable) = (0, 0, 0);
    rig.jump_to(rig.snapshot().refresh_due_ms.unwrap());
    for n in 1..=300 {
        let snap = rig.settle(n).await;
        let call = rig.chaos.calls()[n - 1];
        if n > 1 {
            let previous = rig.chaos.calls()[n - 2];
            assert!(call.at_ms > previous.at_ms, "two calls at one instant");
        }
        // Every instant we stop at, a request gets a valid token or, only if
        // none is left, IdpUnavailable.
        if rig.ask().await.is_err() {
            unavailable += 1;
        }
        rig.assert_served().await;
        let next = match call.outcome {
            Some(Outcome::Ok) => {
                ok += 1;
                streak = 0;
                assert_eq!(snap.phase, PhaseKind::Idle);
                snap.refresh_due_ms.unwrap()
            }
            Some(Outcome::Transient) => {
                failed += 1;
                let delay = rig.backoff_after(&snap, n);
                assert_backoff(streak, delay);
                streak += 1;
                call.ended_ms + delay
            }
            other => panic!("call {n}: {other:?}"),
        };
        assert_eq!(rig.chaos.count(), n, "no call before its time");
        rig.jump_to(next.max(rig.now()));
    }
    assert!(ok > 100 && failed > 100, "{ok} ok, {failed} failed");
    eprintln!("flapping: 300 calls, {ok} ok, {failed} failed, {unavailable} requests found no valid token");
}

/// A token response body with this `expires_in` member (raw JSON, or absent).
fn body_with_expiry(n: u64, expires_in: Option<&str>) -> String {
    let expiry = expires_in.map_or(String::new(), |e| format!(r#","expires_in":{e}"#));
    format!(
        r#"{{"access_token":"at-x{n}","token_type":"Bearer","refresh_token":"rt-x{n}"{expiry}}}"#
    )
}

/// An odd `expires_in`: its name, the raw JSON (or absent), and what lifetime
/// in seconds the broker may believe.
type LifetimeCase = (&'static str, Option<&'static str>, fn(u64) -> bool);

#[tokio::test]
async fn malformed_and_odd_token_responses_never_cost_the_valid_token() {
    let rig = rig(3600, 3600).await;
    // Garbage: transient, the valid token stays, the next good answer recovers.
    for (status, body) in [
        (200, r#"{"access_token":"at-y","#),
        (200, "<html>gateway</html>"),
        (200, r#"{"token_type":"Bearer"}"#),
        (502, "<html>bad gateway</html>"),
    ] {
        let n = rig.chaos.count() + 1;
        rig.server.push(status, body);
        // A forced refresh still keeps calls a second apart: step past the gap.
        rig.jump_to(rig.now() + policy::MIN_CALL_GAP_MS);
        let answer = timeout(SAFETY, rig.engine.refresh()).await.unwrap();
        assert!(answer.is_ok(), "{body}: {answer:?}");
        assert_eq!(rig.chaos.calls()[n - 1].outcome, Some(Outcome::Transient));
        assert_eq!(answer.unwrap().generation, 1, "{body}");
        let snap = rig.settle(n).await;
        let delay = rig.backoff_after(&snap, n);
        assert_backoff(n as u32 - 1, delay);
    }
    // The refresh token was never lost to garbage.
    assert!(rig.server.presented().iter().all(|rt| rt == "rt-0"));
    let PhaseKind::Backoff { until_ms } = rig.snapshot().phase else {
        unreachable!()
    };
    rig.jump_to(until_ms);
    let token = rig.engine.refresh().await.unwrap();
    assert_eq!(token.generation, 2);

    // Odd lifetimes: what each one is believed to be.
    let lifetime_of = |token: &Token| token.expires_at - token.issued_at;
    let cases: [LifetimeCase; 7] = [
        ("zero", Some("0"), |l| l == 1),
        ("negative", Some("-5"), |l| (1..=300).contains(&l)),
        ("missing", None, |l| (1..=300).contains(&l)),
        ("string", Some(r#""120""#), |l| l == 120),
        ("fraction", Some("60.5"), |l| (1..=300).contains(&l)),
        ("huge float", Some("1e300"), |l| (1..=300).contains(&l)),
        ("u64 max", Some("18446744073709551615"), |l| {
            l == policy::MAX_LIFETIME_SECS
        }),
    ];
    for (i, (name, expiry, ok)) in cases.into_iter().enumerate() {
        rig.server.push(200, &body_with_expiry(i as u64, expiry));
        rig.jump_to(rig.now() + 2 * policy::MIN_CALL_GAP_MS); // past the gap between calls
        let token = timeout(SAFETY, rig.engine.refresh())
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(token.access_token.expose(), format!("at-x{i}"), "{name}");
        assert!(
            ok(lifetime_of(&token)),
            "{name}: lifetime {}",
            lifetime_of(&token)
        );
        assert!(policy::unexpired(&token, rig.now()), "{name}");
        // The rotated refresh token is on disk before the token is served.
        let saved = rig.store.load("chaos").unwrap();
        assert_eq!(
            saved.refresh_token.unwrap().expose(),
            format!("rt-x{i}"),
            "{name}"
        );
    }

    // No refresh_token in the answer: the old one stays and is presented next.
    rig.server.push(
        200,
        r#"{"access_token":"at-keep","token_type":"Bearer","expires_in":3600}"#,
    );
    rig.jump_to(rig.now() + 2 * policy::MIN_CALL_GAP_MS);
    let token = rig.engine.refresh().await.unwrap();
    assert_eq!(token.access_token.expose(), "at-keep");
    let kept = rig.store.load("chaos").unwrap().refresh_token.unwrap();
    assert_eq!(kept.expose(), "rt-x6");
    rig.jump_to(rig.now() + 2 * policy::MIN_CALL_GAP_MS);
    rig.engine.refresh().await.unwrap();
    assert_eq!(rig.server.presented().last().unwrap(), "rt-x6");
}

/// Found by fuzzing (`token_response`): a 400 body that is not JSON past a
/// member name put that IdP-chosen name, with a DEL character, in `last_error`.
#[tokio::test]
async fn an_unreadable_answer_puts_no_control_character_in_last_error() {
    let rig = rig(3600, 3600).await;
    let body = "{\"err\u{7f}r\":xinvalid_request\",\"error\u{1b}_d\"}";
    rig.server.push(400, body);
    let token = rig.engine.refresh().await.unwrap();
    assert_eq!(token.generation, 1, "the valid token is kept");
    let status = rig.engine.status();
    let last_error = status.last_error.unwrap();
    assert!(
        last_error.starts_with("unreadable token response"),
        "{last_error}"
    );
    assert!(!last_error.chars().any(char::is_control), "{last_error:?}");
}
