//! [`TokenSource`] and the broker-backed [`BrokerTokenSource`].

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use futures::StreamExt;
use kontext_broker_protocol::{validity, Token, WatchEvent, DEFAULT_PROFILE};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{BrokerClient, ClientBuilder, Error, Result};

/// Something that hands out access tokens, close to golang.org/x/oauth2's
/// `TokenSource`, plus a way to report a token the server rejected.
///
/// The futures are `Send`, so a source can be used from any task; generic code
/// (such as the tower layer) takes `S: TokenSource`.
pub trait TokenSource: Send + Sync {
    /// A token that is valid now, with a small margin.
    fn token(&self) -> impl Future<Output = Result<Token>> + Send;
    /// `stale` was rejected by a server: get a newer token (the broker refreshes
    /// only if `stale` is still its current token).
    fn invalidate(&self, stale: &Token) -> impl Future<Output = Result<Token>> + Send;
}

impl<T: TokenSource> TokenSource for Arc<T> {
    fn token(&self) -> impl Future<Output = Result<Token>> + Send {
        (**self).token()
    }
    fn invalidate(&self, stale: &Token) -> impl Future<Output = Result<Token>> + Send {
        (**self).invalidate(stale)
    }
}

/// First reconnect delay after the connection to the broker drops.
const BACKOFF_START: Duration = Duration::from_millis(50);
/// Longest delay between reconnect attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a call waits for a restarting broker before it reports it gone.
const RESTART_GRACE: Duration = Duration::from_secs(3);
/// A watch that lasted this long counts as healthy; its end resets the backoff.
const HEALTHY_WATCH: Duration = Duration::from_secs(10);
/// Default upper bound of the validity a cached token must still have to be
/// served: the broker's own (30 s).
const DEFAULT_MAX_MARGIN: Duration = Duration::from_millis(validity::MAX_MARGIN_MS);

/// What the source currently knows. Swapped as a whole, so readers never see
/// a token paired with another token's deadline.
enum Cached {
    /// Nothing usable: ask the broker.
    Empty,
    /// A token, served without IPC until `fresh_until_ms` (unix milliseconds).
    Token { token: Token, fresh_until_ms: u64 },
    /// The refresh token is dead. Sticky until the broker pushes a new token.
    Reauth { message: String },
    /// The IdP rejects the profile's client; the broker keeps the grant. The
    /// last token is served (without IPC) until it expires, then the error is.
    /// Sticky until the broker pushes a new token.
    ClientRejected {
        message: String,
        token: Option<Token>,
    },
}

struct State {
    profile: String,
    builder: ClientBuilder,
    max_margin: Duration,
    cache: ArcSwap<Cached>,
    /// The connection used for fallback calls (shared with the watch task).
    conn: ArcSwapOption<BrokerClient>,
    /// Bumped on every change of `cache`; lets callers wait for pushes.
    updates: watch::Sender<u64>,
}

/// Wall-clock milliseconds since the epoch.
///
/// Wall-clock on purpose: token expiry is wall-clock, and a monotonic clock stops
/// during suspend, which would make a token look fresh after resume. On Linux
/// `SystemTime::now()` is a vDSO read, not a syscall.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The instant (unix ms) after which `token` is no longer served from cache:
/// expiry minus `min(max_margin, lifetime / 10)`, the broker's own margin rule
/// (contract §5), so short test lifetimes behave like real ones.
fn fresh_until_ms(token: &Token, max_margin: Duration) -> u64 {
    validity::fresh_until_ms(token, max_margin.as_millis() as u64)
}

impl State {
    fn set(&self, new: Cached) {
        self.cache.store(Arc::new(new));
        self.updates.send_modify(|n| *n += 1);
    }

    /// Stores `token` unless a newer generation is already cached (a slow
    /// fallback answer must not replace a newer pushed token).
    fn store_token(&self, token: &Token) {
        let fresh = fresh_until_ms(token, self.max_margin);
        let mut stored = false;
        self.cache.rcu(|cur| match &**cur {
            Cached::Token { token: c, .. } if c.generation > token.generation => {
                stored = false;
                cur.clone()
            }
            _ => {
                stored = true;
                Arc::new(Cached::Token {
                    token: token.clone(),
                    fresh_until_ms: fresh,
                })
            }
        });
        if stored {
            self.updates.send_modify(|n| *n += 1);
        }
    }

    fn apply(&self, event: WatchEvent) {
        match event {
            WatchEvent::Token { token, .. } => {
                tracing::debug!(profile = %self.profile, generation = token.generation, "token pushed");
                // A push is authoritative: it also clears a sticky reauth.
                self.set(Cached::Token {
                    fresh_until_ms: fresh_until_ms(&token, self.max_margin),
                    token,
                });
            }
            WatchEvent::ReauthRequired { message, .. } => self.set_reauth(message),
            WatchEvent::Removed { .. } => self.set(Cached::Empty),
            WatchEvent::ClientRejected { message, .. } => self.set_client_rejected(message),
            WatchEvent::State { .. } => {}
        }
    }

    /// Keeps the cached token (it stays valid until it expires) and remembers
    /// the rejection, so an expired token costs no IPC either.
    fn set_client_rejected(&self, message: String) {
        let token = match &**self.cache.load() {
            Cached::Token { token, .. } => Some(token.clone()),
            Cached::ClientRejected { token, .. } => token.clone(),
            Cached::Empty | Cached::Reauth { .. } => None,
        };
        if !matches!(**self.cache.load(), Cached::ClientRejected { .. }) {
            tracing::warn!(profile = %self.profile, "broker reports that the identity provider rejects the client; the fix is `broker-ctl client`");
        }
        self.set(Cached::ClientRejected { message, token });
    }

    fn set_reauth(&self, message: String) {
        if !matches!(**self.cache.load(), Cached::Reauth { .. }) {
            tracing::warn!(profile = %self.profile, "broker reports that a new login is needed");
        }
        self.set(Cached::Reauth { message });
    }

    /// A live connection: the shared one, or a new one.
    async fn client(&self) -> Result<BrokerClient> {
        if let Some(c) = self.conn.load_full() {
            if !c.is_closed() {
                return Ok((*c).clone());
            }
        }
        let c = self.builder.clone().connect().await?;
        self.conn.store(Some(Arc::new(c.clone())));
        Ok(c)
    }

    /// Runs `call` on a live connection; while the broker is gone (a restart),
    /// retries on fresh connections for up to [`RESTART_GRACE`].
    async fn with_client<F, Fut>(&self, call: F) -> Result<Token>
    where
        F: Fn(BrokerClient) -> Fut,
        Fut: Future<Output = Result<Token>>,
    {
        // A broker restart leaves a short window with no socket: ride it out
        // with a few quick retries instead of failing the caller at once.
        let mut delay = BACKOFF_START;
        let mut waited = Duration::ZERO;
        let result = loop {
            let attempt = match self.client().await {
                Ok(client) => call(client).await,
                Err(e) => Err(e),
            };
            match attempt {
                Err(Error::Disconnected | Error::BrokerNotRunning { .. })
                    if waited < RESTART_GRACE =>
                {
                    tokio::time::sleep(delay).await;
                    waited += delay;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
                other => break other,
            }
        };
        match &result {
            Ok(t) => self.store_token(t),
            Err(Error::ReauthRequired { message, .. }) => self.set_reauth(message.clone()),
            Err(Error::ClientRejected { message, .. }) => self.set_client_rejected(message.clone()),
            Err(_) => {}
        }
        result
    }
}

/// The background task: keep a `Watch` subscription open, reconnecting with
/// backoff, and apply every pushed event to the cache.
async fn watch_loop(state: Arc<State>) {
    let mut backoff = BACKOFF_START;
    loop {
        let attempt = async {
            let client = state.client().await?;
            client.watch(&state.profile).await
        };
        match attempt.await {
            Ok(mut stream) => {
                let since = std::time::Instant::now();
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(event) => state.apply(event),
                        Err(e) => {
                            tracing::debug!(profile = %state.profile, error = %e, "watch ended");
                            break;
                        }
                    }
                }
                // A subscription that lived a while ended: the broker probably
                // restarted, so reconnect at once. One that ends right after it
                // started (a broker accepting then closing) backs off instead,
                // so we never spin.
                if since.elapsed() >= HEALTHY_WATCH {
                    backoff = BACKOFF_START;
                    // Every sidecar of this user sees the restart at the same
                    // moment: spread the reconnects a little.
                    tokio::time::sleep(jitter(RECONNECT_SPREAD)).await;
                    continue;
                }
            }
            Err(Error::ReauthRequired { message, .. }) => state.set_reauth(message),
            Err(e) => tracing::debug!(profile = %state.profile, error = %e, "watch failed"),
        }
        // "Equal jitter": half the delay fixed, half random.
        tokio::time::sleep(backoff / 2 + jitter(backoff / 2)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Largest random delay before reconnecting after a broker restart.
const RECONNECT_SPREAD: Duration = Duration::from_millis(100);

/// A random duration in `[0, max)`. `RandomState` is randomly seeded per
/// instance, which is plenty for spreading reconnects, without a `rand` dependency.
fn jitter(max: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    max.mul_f64((bits % 1_000_000) as f64 / 1_000_000.0)
}

struct Handle {
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A [`TokenSource`] backed by the broker, for one profile.
///
/// It holds a `Watch` subscription; a background task swaps the cached token
/// whenever the broker pushes one, so [`TokenSource::token`] is a lock-free
/// memory read while the token is fresh. When stale or absent it falls back to
/// `GetToken`. After the broker restarts it reconnects with backoff (50 ms
/// doubling to 2 s). `ClientRejected` serves the last token until it expires,
/// then answers `Error::ClientRejected`, without IPC, until the broker pushes a
/// new token (after `broker-ctl client`). `ReauthRequired` is sticky, answered without IPC, until the
/// broker pushes a new token. Clones share everything; the task stops when the
/// last clone is dropped.
#[derive(Clone)]
pub struct BrokerTokenSource {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for BrokerTokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerTokenSource")
            .field("profile", &self.handle.state.profile)
            .finish_non_exhaustive()
    }
}

/// Options for [`BrokerTokenSource`].
#[derive(Debug, Clone)]
pub struct TokenSourceBuilder {
    profile: String,
    client: ClientBuilder,
    max_margin: Duration,
}

impl TokenSourceBuilder {
    /// The profile to serve (default `default`).
    pub fn profile(mut self, profile: impl Into<String>) -> Self {
        self.profile = profile.into();
        self
    }

    /// The broker socket (default: resolved as in contract §1).
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.client = self.client.socket(path);
        self
    }

    /// Connection options (socket, timeouts, client name).
    pub fn client(mut self, client: ClientBuilder) -> Self {
        self.client = client;
        self
    }

    /// Most validity a cached token must have left to be served without asking
    /// the broker (default 30 s; capped at a tenth of the token's lifetime).
    pub fn max_margin(mut self, d: Duration) -> Self {
        self.max_margin = d;
        self
    }

    /// Starts the source. Must be called inside a tokio runtime; it does not
    /// wait for the broker, so it works while the broker is still starting.
    pub fn build(self) -> BrokerTokenSource {
        let (updates, _) = watch::channel(0);
        let state = Arc::new(State {
            profile: self.profile,
            builder: self.client,
            max_margin: self.max_margin,
            cache: ArcSwap::from_pointee(Cached::Empty),
            conn: ArcSwapOption::empty(),
            updates,
        });
        let task = tokio::spawn(watch_loop(state.clone()));
        BrokerTokenSource {
            handle: Arc::new(Handle { state, task }),
        }
    }
}

impl BrokerTokenSource {
    /// A source for `profile` on the default socket.
    pub fn new(profile: impl Into<String>) -> Self {
        Self::builder().profile(profile).build()
    }

    /// Options.
    pub fn builder() -> TokenSourceBuilder {
        TokenSourceBuilder {
            profile: DEFAULT_PROFILE.to_owned(),
            client: ClientBuilder::default(),
            max_margin: DEFAULT_MAX_MARGIN,
        }
    }

    /// The profile this source serves.
    pub fn profile(&self) -> &str {
        &self.handle.state.profile
    }

    /// A receiver whose value increases whenever the cached state changes
    /// (pushed token, reauth, removal, fallback answer). Useful to wait for
    /// the first push without polling.
    pub fn updates(&self) -> watch::Receiver<u64> {
        self.handle.state.updates.subscribe()
    }

    /// The generation of the cached token, if one is cached (fresh or not).
    pub fn cached_generation(&self) -> Option<u64> {
        match &**self.handle.state.cache.load() {
            Cached::Token { token, .. } => Some(token.generation),
            _ => None,
        }
    }
}

impl TokenSource for BrokerTokenSource {
    fn token(&self) -> impl Future<Output = Result<Token>> + Send {
        let state = &self.handle.state;
        // Fast path: decided synchronously, before any await, with one atomic
        // load and one clock read.
        let mut min_valid = Duration::ZERO;
        let fast = match &**state.cache.load() {
            Cached::Token {
                token,
                fresh_until_ms,
            } => {
                if now_ms() < *fresh_until_ms {
                    Some(Ok(token.clone()))
                } else {
                    // Ask for exactly the validity our own rule wants, so the
                    // broker refreshes when we would. Asking for `max_margin`
                    // outright would force a refresh of every token that lives
                    // under ten times that; asking for nothing would make a
                    // `max_margin` above the broker's 30 s an IPC per call.
                    let margin_ms = (token.expires_at * 1000).saturating_sub(*fresh_until_ms);
                    min_valid = Duration::from_millis(margin_ms.div_ceil(1000) * 1000);
                    None
                }
            }
            Cached::Reauth { message } => Some(Err(Error::ReauthRequired {
                profile: state.profile.clone(),
                message: message.clone(),
            })),
            // No new token will come until the client is fixed: serve the last
            // one while it is valid at all, then the rejection.
            Cached::ClientRejected { message, token } => Some(
                match token.as_ref().filter(|t| t.expires_at * 1000 > now_ms()) {
                    Some(t) => Ok(t.clone()),
                    None => Err(Error::ClientRejected {
                        profile: state.profile.clone(),
                        message: message.clone(),
                    }),
                },
            ),
            // Nothing cached: the broker's own margin is the right one.
            _ => None,
        };
        async move {
            if let Some(r) = fast {
                return r;
            }
            state
                .with_client(|c| async move { c.get_token(&state.profile, min_valid).await })
                .await
        }
    }

    fn invalidate(&self, stale: &Token) -> impl Future<Output = Result<Token>> + Send {
        let state = &self.handle.state;
        let generation = stale.generation;
        // Stop serving the rejected token at once, so concurrent callers ask
        // the broker instead of reusing it.
        state.cache.rcu(|cur| match &**cur {
            Cached::Token { token, .. } if token.generation == generation => {
                Arc::new(Cached::Empty)
            }
            Cached::ClientRejected {
                message,
                token: Some(token),
            } if token.generation == generation => Arc::new(Cached::ClientRejected {
                message: message.clone(),
                token: None,
            }),
            _ => cur.clone(),
        });
        let stale = stale.clone();
        async move {
            state
                .with_client(|c| {
                    let stale = &stale;
                    async move { c.invalidate(&state.profile, stale).await }
                })
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(issued_at: u64, expires_at: u64) -> Token {
        Token {
            access_token: "x".into(),
            token_type: "Bearer".into(),
            expires_at,
            issued_at,
            generation: 1,
            scopes: vec![],
        }
    }

    #[test]
    fn margin_is_a_tenth_of_short_lifetimes_and_capped_for_long_ones() {
        // 10 s token: margin 1 s.
        assert_eq!(fresh_until_ms(&tok(100, 110), DEFAULT_MAX_MARGIN), 109_000);
        // 1 h token: margin capped at 30 s.
        assert_eq!(fresh_until_ms(&tok(0, 3600), DEFAULT_MAX_MARGIN), 3_570_000);
        // Nonsense (expires before issued): never fresh beyond expiry.
        assert_eq!(fresh_until_ms(&tok(200, 100), DEFAULT_MAX_MARGIN), 100_000);
    }
}

#[cfg(test)]
mod jitter_tests {
    use super::*;

    #[test]
    fn jitter_stays_below_its_bound_and_varies() {
        let draws: Vec<Duration> = (0..50).map(|_| jitter(RECONNECT_SPREAD)).collect();
        assert!(draws.iter().all(|d| *d < RECONNECT_SPREAD));
        assert!(draws.windows(2).any(|w| w[0] != w[1]), "not constant");
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }
}
