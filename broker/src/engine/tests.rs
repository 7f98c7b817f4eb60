//! Engine behaviour under a manual clock, a scripted token endpoint and an
//! in-memory store. Waits are on observable events; timeouts are safety nets only.

use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

use futures::future::join_all;
use kontext_broker_protocol::Secret;
use tokio::sync::Notify;
use tokio::time::timeout;

use super::*;
use crate::clock::ManualClock;
use crate::store::StoredAccessToken;

const T0_MS: u64 = 1_800_000_000_000;
const SAFETY: Duration = Duration::from_secs(10);

/// A token endpoint that answers from a script and counts calls.
#[derive(Default)]
struct ScriptedIdp {
    script: Mutex<VecDeque<Result<Refreshed, RefreshError>>>,
    /// Unix ms of every call, and the refresh token each one presented.
    calls: Mutex<Vec<(u64, String)>>,
    called: Notify,
    /// When set, calls wait for `release` before answering.
    hold: std::sync::atomic::AtomicBool,
    release: Notify,
    clock: Mutex<Option<ManualClock>>,
    next: std::sync::atomic::AtomicU64,
}

impl ScriptedIdp {
    fn push(&self, answer: Result<Refreshed, RefreshError>) {
        self.script.lock().unwrap().push_back(answer);
    }
    fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
    fn call_times(&self) -> Vec<u64> {
        self.calls.lock().unwrap().iter().map(|c| c.0).collect()
    }
    fn presented(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.1.clone())
            .collect()
    }
    async fn wait_calls(&self, n: usize) {
        timeout(SAFETY, async {
            loop {
                let notified = self.called.notified();
                if self.calls() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .expect("token endpoint was not called in time");
    }
}

/// A successful rotation answer with a 100 s lifetime.
fn rotated(n: u64) -> Result<Refreshed, RefreshError> {
    Ok(Refreshed {
        access_token: Secret::new(format!("at-{n}")),
        token_type: "Bearer".into(),
        expires_in: Some(Duration::from_secs(100)),
        refresh_token: Some(Secret::new(format!("rt-{n}"))),
        scopes: None,
        client_auth_detected: None,
    })
}

impl TokenEndpoint for Arc<ScriptedIdp> {
    fn refresh(
        &self,
        record: ProfileRecord,
    ) -> BoxFuture<'static, Result<Refreshed, RefreshError>> {
        let me = self.clone();
        Box::pin(async move {
            let now = me.clock.lock().unwrap().as_ref().unwrap().now_ms();
            let rt = record
                .refresh_token
                .map(|r| r.expose().to_owned())
                .unwrap_or_default();
            me.calls.lock().unwrap().push((now, rt));
            me.called.notify_waiters();
            if me.hold.load(Ordering::SeqCst) {
                me.release.notified().await;
            }
            let scripted = me.script.lock().unwrap().pop_front();
            scripted.unwrap_or_else(|| {
                let n = 100 + me.next.fetch_add(1, Ordering::SeqCst);
                rotated(n)
            })
        })
    }
}

/// An in-memory store that can be told to fail.
#[derive(Default)]
struct MemoryStore {
    saved: Mutex<Vec<ProfileRecord>>,
    deleted: AtomicUsize,
    fail: std::sync::atomic::AtomicBool,
}

impl MemoryStore {
    fn last(&self) -> ProfileRecord {
        self.saved
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("nothing saved")
    }
}

impl Persist for Arc<MemoryStore> {
    fn save(&self, record: &ProfileRecord) -> crate::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(crate::Error::io("save", std::io::Error::other("disk full")));
        }
        self.saved.lock().unwrap().push(record.clone());
        Ok(())
    }
    fn delete(&self, _name: &str) -> crate::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(crate::Error::io(
                "delete",
                std::io::Error::other("read-only"),
            ));
        }
        self.deleted.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Rig {
    deps: EngineDeps,
    clock: ManualClock,
    idp: Arc<ScriptedIdp>,
    store: Arc<MemoryStore>,
    engine: EngineHandle,
}

/// A record whose token was issued at `issued_ms` with a 100 s lifetime.
fn record(issued_secs: u64) -> ProfileRecord {
    ProfileRecord::builder(
        "work",
        "https://idp.example",
        "cli",
        "https://idp.example/token",
    )
    .scopes(["openid"])
    .subject("alice")
    .refresh_token("rt-0")
    .access_token(StoredAccessToken::bearer(
        "at-0",
        issued_secs,
        issued_secs + 100,
        ["openid"],
    ))
    .generation(1)
    .build()
}

fn rig_with(record: ProfileRecord) -> Rig {
    let clock = ManualClock::new(T0_MS);
    let idp = Arc::new(ScriptedIdp::default());
    *idp.clock.lock().unwrap() = Some(clock.clone());
    let store = Arc::new(MemoryStore::default());
    let deps = EngineDeps {
        clock: Arc::new(clock.clone()),
        endpoint: Arc::new(idp.clone()),
        persist: Arc::new(store.clone()),
        config: EngineConfig {
            refresh_at: 0.8,
            refresh_jitter: 0.0,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            backoff_jitter: false,
            reauth_message: "Session expired, run `kontext login` to re-authenticate".into(),
            default_token_lifetime: 42,
            profile_token_lifetimes: Default::default(),
        },
    };
    let (events, _) = broadcast::channel(64);
    let engine = spawn(record, deps.clone(), events);
    Rig {
        deps,
        clock,
        idp,
        store,
        engine,
    }
}

fn fresh_rig() -> Rig {
    rig_with(record(T0_MS / 1000))
}

impl Rig {
    async fn wait_phase(&self, want: impl Fn(PhaseKind) -> bool) -> Snapshot {
        let mut rx = self.engine.snapshot.clone();
        let snap = timeout(SAFETY, rx.wait_for(|s| want(s.phase)))
            .await
            .expect("phase not reached in time")
            .expect("engine gone");
        snap.clone()
    }
}

#[tokio::test]
async fn a_fresh_token_is_served_from_cache_without_calling_the_idp() {
    let rig = fresh_rig();
    for min_valid in [0, 30, 60, 10_000] {
        let token = rig.engine.get_token(min_valid).await.unwrap();
        assert_eq!(token.access_token.expose(), "at-0");
        assert_eq!(token.generation, 1);
    }
    assert_eq!(rig.idp.calls(), 0);
}

#[tokio::test]
async fn two_hundred_concurrent_requests_on_an_expired_token_make_one_call() {
    let rig = fresh_rig();
    rig.idp.hold.store(true, Ordering::SeqCst);
    rig.clock.advance(Duration::from_secs(101));
    let requests = (0..200).map(|_| {
        let engine = rig.engine.clone();
        async move { engine.get_token(0).await }
    });
    let all = tokio::spawn(join_all(requests));
    rig.idp.wait_calls(1).await;
    rig.wait_phase(|p| p == PhaseKind::Busy).await;
    rig.idp.release.notify_waiters();
    rig.idp.hold.store(false, Ordering::SeqCst);
    let results = all.await.unwrap();
    assert_eq!(rig.idp.calls(), 1);
    for r in results {
        let token = r.unwrap();
        assert_eq!(token.generation, 2);
        assert_eq!(token.access_token.expose(), "at-100");
    }
}

#[tokio::test]
async fn concurrent_invalidations_of_one_generation_make_one_call_and_old_ones_none() {
    let rig = fresh_rig();
    let current = rig.engine.get_token(0).await.unwrap().generation;
    let invalidations = (0..200).map(|_| rig.engine.invalidate(current));
    let results = join_all(invalidations).await;
    assert_eq!(rig.idp.calls(), 1);
    assert!(results
        .iter()
        .all(|r| r.as_ref().unwrap().generation == current + 1));
    // The stale generation again: answered from cache.
    let again = join_all((0..50).map(|_| rig.engine.invalidate(current))).await;
    assert_eq!(rig.idp.calls(), 1);
    assert!(again
        .iter()
        .all(|r| r.as_ref().unwrap().generation == current + 1));
}

#[tokio::test]
async fn rotation_is_saved_before_the_token_is_served_and_the_new_refresh_token_is_used() {
    let rig = fresh_rig();
    rig.engine.refresh().await.unwrap();
    let saved = rig.store.last();
    assert_eq!(saved.refresh_token.as_ref().unwrap().expose(), "rt-100");
    assert_eq!(saved.generation, 2);
    // Token-endpoint calls are at least a second apart.
    rig.clock.advance(Duration::from_secs(1));
    rig.engine.refresh().await.unwrap();
    assert_eq!(rig.idp.presented(), ["rt-0", "rt-100"]);
}

#[tokio::test]
async fn a_response_without_refresh_token_keeps_the_old_one() {
    let rig = fresh_rig();
    rig.idp.push(Ok(Refreshed {
        access_token: Secret::from("at-x"),
        token_type: "Bearer".into(),
        expires_in: Some(Duration::from_secs(100)),
        refresh_token: None,
        scopes: None,
        client_auth_detected: None,
    }));
    let token = rig.engine.refresh().await.unwrap();
    assert_eq!(token.access_token.expose(), "at-x");
    assert_eq!(rig.store.last().refresh_token.unwrap().expose(), "rt-0");
}

/// An access token shaped like an RFC 9068 JWT whose `exp` is `exp`.
fn jwt_access_token(exp: u64) -> String {
    use base64::Engine as _;
    let enc = |s: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.sig",
        enc(r#"{"alg":"RS256","typ":"at+jwt"}"#.to_owned()),
        enc(format!(r#"{{"sub":"alice","exp":{exp}}}"#))
    )
}

#[tokio::test]
async fn without_expires_in_a_jwt_lives_until_its_exp_and_is_never_served_after() {
    let rig = fresh_rig();
    let now = T0_MS / 1000;
    rig.idp.push(Ok(Refreshed {
        access_token: Secret::new(jwt_access_token(now + 7)),
        token_type: "Bearer".into(),
        expires_in: None,
        refresh_token: Some(Secret::from("rt-x")),
        scopes: None,
        client_auth_detected: None,
    }));
    let token = rig.engine.refresh().await.unwrap();
    assert_eq!(token.expires_at, now + 7);
    let status = rig.engine.status();
    assert_eq!(
        status.lifetime_source,
        Some(kontext_broker_protocol::LifetimeSource::JwtExp)
    );
    assert_eq!(
        rig.store.last().access_token.unwrap().lifetime_source,
        status.lifetime_source
    );
    // Right up to its exp the JWT is served from cache; at its exp it is not.
    rig.clock.advance(Duration::from_millis(6_000));
    assert_eq!(
        rig.engine.get_token(0).await.unwrap().generation,
        token.generation
    );
    assert_eq!(rig.idp.calls(), 1);
    rig.clock.advance(Duration::from_millis(1_000));
    let next = rig.engine.get_token(0).await.unwrap();
    assert_eq!(rig.idp.calls(), 2, "a request at exp refreshes");
    assert!(next.generation > token.generation && next.expires_at > now + 7);
}

#[tokio::test]
async fn without_expires_in_an_opaque_token_lives_the_default_lifetime() {
    let rig = fresh_rig();
    rig.idp.push(Ok(Refreshed {
        access_token: Secret::from("opaque-at"),
        token_type: "Bearer".into(),
        expires_in: None,
        refresh_token: None,
        scopes: None,
        client_auth_detected: None,
    }));
    let token = rig.engine.refresh().await.unwrap();
    // The rig's config says default_token_lifetime = 42; the previous token's
    // 100 s play no part.
    assert_eq!(token.expires_at - token.issued_at, 42);
    assert_eq!(
        rig.engine.status().lifetime_source,
        Some(kontext_broker_protocol::LifetimeSource::Default)
    );
    // A normal answer says expires_in again.
    rig.clock.advance(Duration::from_secs(1));
    rig.engine.refresh().await.unwrap();
    assert_eq!(
        rig.engine.status().lifetime_source,
        Some(kontext_broker_protocol::LifetimeSource::ExpiresIn)
    );
}

#[tokio::test]
async fn a_client_auth_method_found_by_fallback_is_saved_in_the_profile() {
    let rig = fresh_rig();
    rig.idp.push(Ok(Refreshed {
        client_auth_detected: Some(kontext_broker_protocol::ClientAuthMethod::ClientSecretPost),
        ..rotated(7).unwrap()
    }));
    rig.engine.refresh().await.unwrap();
    assert_eq!(
        rig.store.last().client_auth_detected,
        Some(kontext_broker_protocol::ClientAuthMethod::ClientSecretPost)
    );
    // Later refreshes keep it (calls start at least 1 s apart).
    rig.clock.advance(Duration::from_secs(1));
    rig.engine.refresh().await.unwrap();
    assert!(rig.store.last().client_auth_detected.is_some());
}

fn assert_client_rejected(result: Result<Token, BrokerError>) -> String {
    match result {
        Err(BrokerError::ClientRejected { profile, message }) => {
            assert_eq!(profile, "work");
            message
        }
        other => panic!("expected ClientRejected, got {other:?}"),
    }
}

#[tokio::test]
async fn a_rejected_client_keeps_the_grant_and_stops_calling_the_idp_until_fixed() {
    let rig = fresh_rig();
    let (_, mut events) = rig.engine.subscribe();
    rig.clock.advance(Duration::from_secs(101));
    rig.idp.push(Err(RefreshError::ClientRejected(
        "invalid_client: client authentication failed".into(),
    )));
    let message = assert_client_rejected(rig.engine.get_token(0).await);
    for needle in [
        "https://idp.example",
        "`cli`",
        "broker-ctl client --profile work",
        "invalid_client",
    ] {
        assert!(
            message.contains(needle),
            "{needle:?} missing from {message}"
        );
    }
    // The refresh token stays on disk; the state is recorded there too.
    let saved = rig.store.last();
    assert_eq!(saved.refresh_token.as_ref().unwrap().expose(), "rt-0");
    assert!(saved.client_rejected.is_some());
    // A minute of fake time with requests and invalidations: no IdP call.
    for _ in 0..60 {
        rig.clock.advance(Duration::from_secs(1));
        assert_client_rejected(rig.engine.get_token(0).await);
        assert_client_rejected(rig.engine.invalidate(1).await);
    }
    assert_eq!(rig.idp.calls(), 1);
    assert_eq!(rig.engine.status().state, ProfileState::ClientRejected);
    let mut told = 0;
    while let Ok(event) = events.try_recv() {
        told += matches!(event, WatchEvent::ClientRejected { .. }) as usize;
    }
    assert_eq!(told, 1, "watchers are told once");
    // `broker-ctl refresh` tries the IdP once more.
    rig.idp
        .push(Err(RefreshError::ClientRejected("invalid_client".into())));
    assert_client_rejected(rig.engine.refresh().await);
    assert_eq!(rig.idp.calls(), 2);
    // A new credential: the same grant, refreshed at once (calls start at
    // least 1 s apart).
    rig.clock.advance(Duration::from_secs(1));
    let token = rig
        .engine
        .set_client(
            kontext_broker_protocol::ClientCredential::Secret(Secret::from("new-secret")),
            Some(kontext_broker_protocol::ClientAuthMethod::ClientSecretPost),
        )
        .await
        .unwrap();
    assert_eq!(rig.idp.presented(), ["rt-0", "rt-0", "rt-0"]);
    assert_eq!(token.generation, 2);
    let saved = rig.store.last();
    assert_eq!(saved.client_secret.unwrap().expose(), "new-secret");
    assert_eq!(
        saved.client_auth,
        Some(kontext_broker_protocol::ClientAuthMethod::ClientSecretPost)
    );
    assert!(saved.client_rejected.is_none());
    assert_eq!(rig.engine.status().state, ProfileState::Valid);
}

#[tokio::test]
async fn a_rejected_client_serves_its_valid_token_but_a_forced_refresh_is_told() {
    let rig = fresh_rig();
    rig.idp.push(Err(RefreshError::ClientRejected(
        "unauthorized_client".into(),
    )));
    assert_client_rejected(rig.engine.refresh().await);
    rig.clock.advance(Duration::from_secs(50));
    // Still valid: served, with no IdP call, even when more validity is asked.
    for min_valid in [0, 90] {
        assert_eq!(
            rig.engine
                .get_token(min_valid)
                .await
                .unwrap()
                .access_token
                .expose(),
            "at-0"
        );
    }
    assert_eq!(rig.idp.calls(), 1);
    let status = rig.engine.status();
    assert_eq!(status.state, ProfileState::ClientRejected);
    assert!(status.last_error.unwrap().contains("unauthorized_client"));
    rig.clock.advance(Duration::from_secs(51));
    assert_client_rejected(rig.engine.get_token(0).await);
    assert_eq!(rig.idp.calls(), 1);
}

#[tokio::test]
async fn a_client_rejection_survives_a_restart() {
    let mut rejected = record(T0_MS / 1000 - 200);
    rejected.client_rejected = Some("invalid_client".into());
    let rig = rig_with(rejected);
    assert_eq!(rig.engine.status().state, ProfileState::ClientRejected);
    let (initial, _) = rig.engine.subscribe();
    assert!(matches!(
        initial.last(),
        Some(WatchEvent::ClientRejected { .. })
    ));
    assert_client_rejected(rig.engine.get_token(0).await);
    rig.clock.advance(Duration::from_secs(120));
    assert_client_rejected(rig.engine.get_token(0).await);
    assert_eq!(rig.idp.calls(), 0);
}

#[tokio::test]
async fn a_failed_save_withholds_the_token_and_retries_the_save_without_calling_the_idp() {
    let rig = fresh_rig();
    rig.store.fail.store(true, Ordering::SeqCst);
    let err = rig.engine.refresh().await.unwrap_err();
    assert!(
        matches!(err, BrokerError::Internal { ref detail } if detail.contains("disk full")),
        "{err:?}"
    );
    // The rotated token is not served while it exists only in memory.
    let snap = rig
        .wait_phase(|p| matches!(p, PhaseKind::Backoff { .. }))
        .await;
    assert!(snap.token.is_none());
    rig.store.fail.store(false, Ordering::SeqCst);
    let PhaseKind::Backoff { until_ms } = snap.phase else {
        unreachable!()
    };
    rig.clock
        .advance(Duration::from_millis(until_ms - rig.clock.now_ms()));
    let token = rig.engine.get_token(0).await.unwrap();
    assert_eq!(token.access_token.expose(), "at-100");
    assert_eq!(rig.store.last().refresh_token.unwrap().expose(), "rt-100");
    assert_eq!(
        rig.idp.calls(),
        1,
        "the retry saved; it did not refresh again"
    );
}

#[tokio::test]
async fn invalid_grant_means_reauth_with_no_further_calls() {
    let rig = fresh_rig();
    let (_, mut events) = rig.engine.subscribe();
    rig.clock.advance(Duration::from_secs(101));
    rig.idp
        .push(Err(RefreshError::Rejected("invalid_grant".into())));
    let err = rig.engine.get_token(0).await.unwrap_err();
    let BrokerError::ReauthRequired { profile, message } = err else {
        panic!("{err:?}")
    };
    assert_eq!(profile, "work");
    assert_eq!(
        message,
        "Session expired, run `kontext login` to re-authenticate"
    );
    // The dead refresh token is gone from the store; the metadata stays.
    let saved = rig.store.last();
    assert!(saved.refresh_token.is_none() && saved.access_token.is_none());
    assert_eq!(saved.issuer, "https://idp.example");
    // A minute of fake time with requests, invalidations and forced refreshes.
    for _ in 0..60 {
        rig.clock.advance(Duration::from_secs(1));
        assert!(matches!(
            rig.engine.get_token(0).await,
            Err(BrokerError::ReauthRequired { .. })
        ));
        assert!(matches!(
            rig.engine.invalidate(1).await,
            Err(BrokerError::ReauthRequired { .. })
        ));
        assert!(matches!(
            rig.engine.refresh().await,
            Err(BrokerError::ReauthRequired { .. })
        ));
    }
    assert_eq!(rig.idp.calls(), 1);
    let mut saw_reauth = false;
    while let Ok(event) = events.try_recv() {
        saw_reauth |= matches!(event, WatchEvent::ReauthRequired { .. });
    }
    assert!(saw_reauth, "watchers are told");
    assert_eq!(rig.engine.status().state, ProfileState::ReauthRequired);
}

#[tokio::test]
async fn transient_failures_back_off_exponentially_and_serve_the_valid_token() {
    let rig = fresh_rig();
    let (_, _watcher) = rig.engine.subscribe(); // in use: proactive refresh on
    for _ in 0..4 {
        rig.idp
            .push(Err(RefreshError::Transient("HTTP 503".into())));
    }
    // Reach the proactive deadline (80 s of 100 s).
    rig.clock.advance(Duration::from_secs(80));
    let mut delays = Vec::new();
    for n in 1..=4 {
        rig.idp.wait_calls(n).await;
        let snap = rig
            .wait_phase(|p| matches!(p, PhaseKind::Backoff { .. }))
            .await;
        let PhaseKind::Backoff { until_ms } = snap.phase else {
            unreachable!()
        };
        let called_at = *rig.idp.call_times().last().unwrap();
        delays.push((until_ms - called_at) / 1000);
        // While backing off, the still-valid token is served.
        if policy::unexpired(
            &rig.engine.snapshot.borrow().token.clone().unwrap(),
            rig.clock.now_ms(),
        ) {
            let t = rig.engine.get_token(60).await.unwrap();
            assert_eq!(t.generation, 1);
        }
        rig.clock
            .advance(Duration::from_millis(until_ms - rig.clock.now_ms()));
    }
    assert_eq!(delays, [1, 2, 4, 8]);
    // The fifth (unscripted) call succeeds and resets the schedule.
    rig.idp.wait_calls(5).await;
    rig.wait_phase(|p| p == PhaseKind::Idle).await;
    assert_eq!(rig.engine.get_token(0).await.unwrap().generation, 2);
}

#[tokio::test]
async fn after_expiry_a_backing_off_engine_answers_unavailable_at_once() {
    let rig = fresh_rig();
    rig.clock.advance(Duration::from_secs(150));
    rig.idp
        .push(Err(RefreshError::Transient("connect timeout".into())));
    let err = rig.engine.get_token(0).await.unwrap_err();
    let BrokerError::IdpUnavailable {
        retry_after_secs,
        detail,
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!(retry_after_secs, 1);
    assert_eq!(detail, "connect timeout");
    // During the backoff: answered without another call, and without waiting.
    let err = rig.engine.get_token(0).await.unwrap_err();
    assert!(matches!(err, BrokerError::IdpUnavailable { .. }));
    assert_eq!(rig.idp.calls(), 1);
}

#[tokio::test]
async fn proactive_refresh_happens_at_eighty_percent_only_while_in_use() {
    // Idle profile: the deadline passes, nothing happens.
    let idle = fresh_rig();
    idle.clock.advance(Duration::from_secs(90));
    // A round trip through the actor proves it processed its wake-up.
    idle.engine.invalidate(0).await.unwrap();
    assert_eq!(idle.idp.calls(), 0);

    // Watched profile: refreshed at the deadline, before expiry, and pushed.
    let watched = fresh_rig();
    let (initial, mut events) = watched.engine.subscribe();
    assert!(matches!(&initial[..], [WatchEvent::Token { token, .. }] if token.generation == 1));
    watched.clock.advance(Duration::from_secs(79));
    watched.engine.invalidate(0).await.unwrap();
    assert_eq!(watched.idp.calls(), 0, "not before 80%");
    watched.clock.advance(Duration::from_secs(1));
    watched.idp.wait_calls(1).await;
    assert_eq!(watched.idp.call_times(), [T0_MS + 80_000]);
    let pushed = timeout(SAFETY, async {
        loop {
            if let WatchEvent::Token { token, .. } = events.recv().await.unwrap() {
                return token;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(pushed.generation, 2);
}

#[tokio::test]
async fn a_recently_served_profile_counts_as_in_use() {
    let rig = fresh_rig();
    rig.engine.get_token(0).await.unwrap();
    rig.clock.advance(Duration::from_secs(80));
    rig.idp.wait_calls(1).await;
}

#[tokio::test]
async fn after_a_suspend_the_next_request_refreshes_and_never_gets_an_expired_token() {
    let rig = fresh_rig();
    rig.clock.jump_silently(Duration::from_secs(3600));
    let token = rig.engine.get_token(0).await.unwrap();
    assert_eq!(token.generation, 2);
    assert!(token.expires_at * 1000 > rig.clock.now_ms());
}

#[tokio::test]
async fn replace_waits_for_the_running_refresh_and_bumps_the_generation() {
    let rig = fresh_rig();
    rig.idp.hold.store(true, Ordering::SeqCst);
    let refresh = tokio::spawn({
        let engine = rig.engine.clone();
        async move { engine.refresh().await }
    });
    rig.idp.wait_calls(1).await;
    let mut new = record(rig.clock.now_secs());
    new.refresh_token = Some(Secret::from("rt-login"));
    let replace = tokio::spawn({
        let engine = rig.engine.clone();
        async move { engine.replace(new).await }
    });
    rig.idp.release.notify_waiters();
    rig.idp.hold.store(false, Ordering::SeqCst);
    assert_eq!(refresh.await.unwrap().unwrap().generation, 2);
    let status = replace.await.unwrap().unwrap();
    assert_eq!(status.generation, 3);
    let saved = rig.store.saved.lock().unwrap().clone();
    let rts: Vec<_> = saved
        .iter()
        .map(|r| r.refresh_token.clone().unwrap().expose().to_owned())
        .collect();
    assert_eq!(
        rts,
        ["rt-100", "rt-login"],
        "refresh saved first, then the replacement"
    );
}

#[tokio::test]
async fn a_replacement_revives_a_profile_that_needed_reauth() {
    let rig = fresh_rig();
    rig.idp
        .push(Err(RefreshError::Rejected("invalid_grant".into())));
    rig.engine.refresh().await.unwrap_err();
    let (_, mut events) = rig.engine.subscribe();
    rig.engine
        .replace(record(rig.clock.now_secs()))
        .await
        .unwrap();
    let token = rig.engine.get_token(0).await.unwrap();
    assert!(
        matches!(events.recv().await.unwrap(), WatchEvent::Token { token: t, .. } if t.generation == token.generation)
    );
}

#[tokio::test]
async fn stop_lets_the_running_refresh_save_first() {
    let rig = fresh_rig();
    rig.idp.hold.store(true, Ordering::SeqCst);
    let engine = rig.engine.clone();
    let refresh = tokio::spawn(async move { engine.refresh().await });
    rig.idp.wait_calls(1).await;
    let stop = tokio::spawn({
        let engine = rig.engine.clone();
        async move { engine.stop().await }
    });
    rig.idp.release.notify_waiters();
    let final_record = stop.await.unwrap().unwrap();
    assert_eq!(final_record.refresh_token.unwrap().expose(), "rt-100");
    assert_eq!(rig.store.last().refresh_token.unwrap().expose(), "rt-100");
    assert_eq!(refresh.await.unwrap().unwrap().generation, 2);
}

#[tokio::test]
async fn debug_output_never_contains_tokens() {
    let rig = fresh_rig();
    let token = rig.engine.get_token(0).await.unwrap();
    let snapshot = format!("{:?}", *rig.engine.snapshot.borrow());
    let record = format!("{:?}", rig.store.saved.lock().unwrap());
    for text in [format!("{token:?}"), snapshot, record] {
        assert!(!text.contains("at-0") && !text.contains("rt-0"), "{text}");
    }
}

#[tokio::test]
async fn a_lying_zero_lifetime_never_becomes_a_busy_loop() {
    let rig = fresh_rig();
    for n in 0..100 {
        rig.idp.push(Ok(Refreshed {
            access_token: Secret::new(format!("at-z{n}")),
            token_type: "Bearer".into(),
            expires_in: Some(Duration::ZERO),
            refresh_token: Some(Secret::new(format!("rt-z{n}"))),
            scopes: None,
            client_auth_detected: None,
        }));
    }
    let (_, _watcher) = rig.engine.subscribe(); // in use: proactive refresh on
    rig.engine.refresh().await.unwrap();
    // Five seconds of fake time in small steps, letting the actor run each time.
    for _ in 0..50 {
        rig.clock.advance(Duration::from_millis(100));
        tokio::task::yield_now().await;
        rig.wait_phase(|p| p != PhaseKind::Busy).await;
    }
    rig.idp.wait_calls(3).await;
    // One forced call, then at most one proactive refresh per second.
    assert!(rig.idp.calls() <= 1 + 5, "{} calls in 5 s", rig.idp.calls());
    // Each token was believed to live one second, not zero.
    let saved = rig.store.last().access_token.unwrap();
    assert_eq!(saved.expires_at - saved.issued_at, 1);
}

#[tokio::test]
async fn a_failed_delete_of_the_dead_refresh_token_is_retried_and_reauth_stays() {
    let rig = fresh_rig();
    rig.store.fail.store(true, Ordering::SeqCst);
    rig.idp
        .push(Err(RefreshError::Rejected("invalid_grant".into())));
    let err = rig.engine.refresh().await.unwrap_err();
    assert!(matches!(err, BrokerError::ReauthRequired { .. }), "{err:?}");
    assert!(
        rig.store.saved.lock().unwrap().is_empty(),
        "the delete failed"
    );
    // While the disk keeps failing, every caller still hears "log in again".
    for _ in 0..3 {
        rig.clock.advance(Duration::from_secs(2));
        let err = rig.engine.get_token(0).await.unwrap_err();
        assert!(matches!(err, BrokerError::ReauthRequired { .. }), "{err:?}");
        assert_eq!(rig.engine.status().state, ProfileState::ReauthRequired);
    }
    rig.store.fail.store(false, Ordering::SeqCst);
    // Retried after the backoff, without calling the IdP.
    for _ in 0..5 {
        rig.clock.advance(Duration::from_secs(1));
        tokio::task::yield_now().await;
    }
    timeout(SAFETY, async {
        while rig.store.saved.lock().unwrap().is_empty() {
            rig.clock.advance(Duration::from_millis(100));
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the dead token's deletion is retried");
    assert!(rig.store.last().refresh_token.is_none());
    assert_eq!(rig.idp.calls(), 1);
    let err = rig.engine.get_token(0).await.unwrap_err();
    assert!(matches!(err, BrokerError::ReauthRequired { .. }), "{err:?}");
    assert_eq!(rig.idp.calls(), 1);
}

mod phases;
mod storm;

#[tokio::test]
async fn remove_deletes_the_file_through_the_actor_and_ends_the_engine() {
    let rig = fresh_rig();
    let record = rig.engine.remove().await.unwrap();
    assert_eq!(record.refresh_token.unwrap().expose(), "rt-0");
    assert_eq!(rig.store.deleted.load(Ordering::SeqCst), 1);
    // The actor is gone: nothing more is served or written.
    assert!(rig.engine.get_token(0).await.is_err());
    assert!(rig.engine.remove().await.is_err());
    assert_eq!(rig.store.deleted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failed_remove_keeps_the_engine_serving() {
    let rig = fresh_rig();
    rig.store.fail.store(true, Ordering::SeqCst);
    assert!(rig.engine.remove().await.is_err());
    assert_eq!(rig.store.deleted.load(Ordering::SeqCst), 0);
    rig.store.fail.store(false, Ordering::SeqCst);
    assert_eq!(
        rig.engine.get_token(0).await.unwrap().access_token.expose(),
        "at-0"
    );
}

#[tokio::test]
async fn create_saves_before_the_engine_runs_and_runs_nothing_when_the_save_fails() {
    let rig = fresh_rig();
    let deps = rig.deps.clone();
    let events = tokio::sync::broadcast::channel(8).0;
    rig.store.fail.store(true, Ordering::SeqCst);
    assert!(create(record(T0_MS / 1000), deps.clone(), events.clone())
        .await
        .is_err());
    rig.store.fail.store(false, Ordering::SeqCst);
    let before = rig.store.saved.lock().unwrap().len();
    let engine = create(record(T0_MS / 1000), deps, events).await.unwrap();
    assert_eq!(rig.store.saved.lock().unwrap().len(), before + 1);
    assert_eq!(engine.status().generation, 1);
}
