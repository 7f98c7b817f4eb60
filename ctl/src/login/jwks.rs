//! The provider's signing keys (its JWKS) for one issuer, cached by the
//! response's cache headers, and re-fetched at most once per interval when an
//! ID token names a key the cache does not hold (OpenID Connect Core §10.1.1).
//!
//! Keys only ever come from the discovered `jwks_uri`; a token's own `jku`,
//! `x5u` or embedded `jwk` headers are never followed.

use std::sync::Arc;
use std::time::Duration;

use openidconnect::core::CoreJsonWebKeySet;
use tokio::sync::Mutex;

use super::LoginError;
use kontext_broker::clock::Clock;
use kontext_broker::idp::{validate_endpoint, Http};

/// Least time between two re-fetches of one issuer's keys, whatever the reason
/// (an unknown `kid`, or cache headers that expired).
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// How long keys count as fresh when the response has no cache headers.
const DEFAULT_FRESHNESS: Duration = Duration::from_secs(10 * 60);
/// Upper bound on what a `max-age` can ask for.
const MAX_FRESHNESS: Duration = Duration::from_secs(24 * 60 * 60);

/// One issuer's key set, fetched on first use.
pub struct JwksCache {
    http: Http,
    uri: String,
    clock: Arc<dyn Clock>,
    min_refresh: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    keys: Option<Arc<CoreJsonWebKeySet>>,
    /// Unix ms until which the cached keys are fresh (cache headers).
    fresh_until_ms: u64,
    /// Unix ms of the last re-fetch (not counting the first fetch).
    last_refresh_ms: Option<u64>,
    fetches: u64,
}

/// The keys to verify with, and whether they were fetched just now.
pub struct Keys {
    /// The provider's key set.
    pub set: Arc<CoreJsonWebKeySet>,
    /// True when this call fetched them (so a re-fetch would gain nothing).
    pub fetched_now: bool,
}

/// What [`JwksCache::refresh_for_unknown_key`] did.
pub enum Refresh {
    /// Fetched again; these are the provider's current keys.
    Fetched(Arc<CoreJsonWebKeySet>),
    /// Not fetched: the last re-fetch was less than the interval ago.
    RateLimited,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl JwksCache {
    /// A cache for the keys at `jwks_uri` (https, or http on loopback), on `clock`.
    pub fn new(http: Http, jwks_uri: &str, clock: Arc<dyn Clock>) -> Result<JwksCache, LoginError> {
        validate_endpoint("jwks_uri", jwks_uri).map_err(LoginError::Discovery)?;
        Ok(JwksCache {
            http,
            uri: jwks_uri.to_owned(),
            clock,
            min_refresh: MIN_REFRESH_INTERVAL,
            state: Mutex::new(State::default()),
        })
    }

    /// Changes the least time between two re-fetches (default [`MIN_REFRESH_INTERVAL`]).
    pub fn with_min_refresh_interval(mut self, interval: Duration) -> JwksCache {
        self.min_refresh = interval;
        self
    }

    /// The `jwks_uri` this cache reads.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// How many times the key set was fetched so far.
    pub async fn fetches(&self) -> u64 {
        self.state.lock().await.fetches
    }

    /// The keys to verify with: fetched when none are cached, and fetched
    /// again when the cache headers say they are stale (no more often than the
    /// refresh interval).
    pub async fn current(&self) -> Result<Keys, LoginError> {
        let mut st = self.state.lock().await;
        let now = self.clock.now_ms();
        if let Some(keys) = &st.keys {
            if now < st.fresh_until_ms || !self.may_refresh(&st, now) {
                return Ok(Keys {
                    set: keys.clone(),
                    fetched_now: false,
                });
            }
            st.last_refresh_ms = Some(now);
        }
        let set = self.fetch(&mut st, now).await?;
        Ok(Keys {
            set,
            fetched_now: true,
        })
    }

    /// Fetches the keys again because a token was signed by a key the cache
    /// does not hold, unless the last re-fetch was less than the interval ago.
    pub async fn refresh_for_unknown_key(&self) -> Result<Refresh, LoginError> {
        let mut st = self.state.lock().await;
        let now = self.clock.now_ms();
        if !self.may_refresh(&st, now) {
            return Ok(Refresh::RateLimited);
        }
        st.last_refresh_ms = Some(now);
        Ok(Refresh::Fetched(self.fetch(&mut st, now).await?))
    }

    fn may_refresh(&self, st: &State, now: u64) -> bool {
        st.last_refresh_ms
            .is_none_or(|last| now.saturating_sub(last) >= self.min_refresh.as_millis() as u64)
    }

    async fn fetch(&self, st: &mut State, now: u64) -> Result<Arc<CoreJsonWebKeySet>, LoginError> {
        st.fetches += 1;
        let uri = &self.uri;
        let response = self.http.get(uri).await.map_err(|e| {
            LoginError::IdpUnavailable(format!("fetching the provider's keys at {uri}: {e}"))
        })?;
        let status = response.status();
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(LoginError::IdpUnavailable(format!(
                "fetching the provider's keys at {uri}: HTTP {status}"
            )));
        }
        if !status.is_success() {
            return Err(LoginError::Unsupported(format!(
                "the provider's keys at {uri} answer HTTP {status}; report the problem to the provider"
            )));
        }
        let set: CoreJsonWebKeySet = serde_json::from_slice(response.body()).map_err(|e| {
            LoginError::Unsupported(format!(
                "the provider's keys at {uri} are not a JSON Web Key Set (line {} column {}); report the problem to the provider",
                e.line(),
                e.column()
            ))
        })?;
        let set = Arc::new(set);
        st.keys = Some(set.clone());
        st.fresh_until_ms = now + freshness(response.headers(), now).as_millis() as u64;
        Ok(set)
    }
}

/// How long a response may be reused: `Cache-Control` (`no-store`, `no-cache`,
/// `max-age`) first, then `Expires`, else [`DEFAULT_FRESHNESS`]; capped at
/// [`MAX_FRESHNESS`].
fn freshness(headers: &http::HeaderMap, now_ms: u64) -> Duration {
    let directives: Vec<String> = headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .collect();
    if directives
        .iter()
        .any(|d| d == "no-store" || d == "no-cache")
    {
        return Duration::ZERO;
    }
    if let Some(secs) = directives
        .iter()
        .find_map(|d| d.strip_prefix("max-age="))
        .and_then(|v| v.trim_matches('"').parse::<u64>().ok())
    {
        return Duration::from_secs(secs).min(MAX_FRESHNESS);
    }
    if let Some(expires) = headers
        .get(http::header::EXPIRES)
        .and_then(|v| v.to_str().ok())
    {
        // An unparsable Expires means "already expired" (RFC 9111 §5.3).
        let until = httpdate::parse_http_date(expires)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        return Duration::from_millis(until.saturating_sub(now_ms)).min(MAX_FRESHNESS);
    }
    DEFAULT_FRESHNESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn cache_headers_set_the_freshness() {
        let now = 1_700_000_000_000;
        assert_eq!(freshness(&headers(&[]), now), DEFAULT_FRESHNESS);
        assert_eq!(
            freshness(&headers(&[("cache-control", "public, max-age=120")]), now),
            Duration::from_secs(120)
        );
        assert_eq!(
            freshness(&headers(&[("cache-control", "max-age=60, no-cache")]), now),
            Duration::ZERO
        );
        assert_eq!(
            freshness(&headers(&[("cache-control", "no-store")]), now),
            Duration::ZERO
        );
        assert_eq!(
            freshness(&headers(&[("cache-control", "max-age=99999999")]), now),
            MAX_FRESHNESS
        );
        // 2023-11-14T22:13:20Z is `now`; Expires one minute later.
        assert_eq!(
            freshness(
                &headers(&[("expires", "Tue, 14 Nov 2023 22:14:20 GMT")]),
                now
            ),
            Duration::from_secs(60)
        );
        assert_eq!(
            freshness(&headers(&[("expires", "0")]), now),
            Duration::ZERO
        );
    }
}
