//! Pure timing rules of the token engine (contract §5). No I/O, no clock reads:
//! every function takes `now` so tests can state exact cases.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use kontext_broker_protocol::{validity, Token};

const MS: u64 = 1000;

/// Longest access-token lifetime believed, in seconds (ten years). Larger
/// `expires_in` values are clamped, so no deadline arithmetic can overflow.
pub const MAX_LIFETIME_SECS: u64 = 10 * 365 * 24 * 3600;

/// Token-endpoint calls of one profile start at least this far apart, whatever
/// lifetime the IdP claims, so a lying or tiny `expires_in` cannot become a
/// storm of calls (contract §5: at most one on-demand call per second).
pub const MIN_CALL_GAP_MS: u64 = 1000;

/// When the next token-endpoint call may start: `now`, or [`MIN_CALL_GAP_MS`]
/// after the last call started if that is later. A last call that lies in the
/// future (the wall clock went back) holds nothing up.
pub fn next_call_ms(last_call_ms: Option<u64>, now_ms: u64) -> u64 {
    match last_call_ms {
        Some(last) if last <= now_ms => last.saturating_add(MIN_CALL_GAP_MS).max(now_ms),
        _ => now_ms,
    }
}

/// Lifetime of a token in milliseconds (at least 1 ms, so ratios stay defined).
pub fn lifetime_ms(token: &Token) -> u64 {
    validity::lifetime_ms(token)
}

/// Safety margin: min(30 s, lifetime / 10).
pub fn margin_ms(token: &Token) -> u64 {
    validity::margin_ms(token, validity::MAX_MARGIN_MS)
}

/// Validity a request needs: `min(max(min_valid, margin), lifetime - margin)`.
///
/// The cap at `lifetime - margin` is why a fresh token always qualifies, so no
/// caller can force a refresh loop by asking for more than the IdP grants.
pub fn need_ms(token: &Token, min_valid_secs: u64) -> u64 {
    validity::need_ms(token, min_valid_secs, validity::MAX_MARGIN_MS)
}

/// True when `token` may be served to a caller asking for `min_valid_secs` at `now_ms`.
pub fn serves(token: &Token, now_ms: u64, min_valid_secs: u64) -> bool {
    validity::serves(token, now_ms, min_valid_secs, validity::MAX_MARGIN_MS)
}

/// True when `token` has not expired at `now_ms`.
pub fn unexpired(token: &Token, now_ms: u64) -> bool {
    token.expires_at.saturating_mul(MS) > now_ms
}

/// Proactive refresh deadline: `issued + refresh_at × lifetime`, moved earlier by
/// `jitter_draw × jitter × lifetime` (`jitter_draw` in [0, 1)) so many brokers
/// never hit the IdP in lockstep, and never later than `expires_at - margin`.
///
/// `issued_ms` is the precise time the token was requested, when known. The
/// token's own `issued_at` is that time floored to the second (so its expiry is
/// never later than the IdP's); using it here would waste up to a second of
/// every lifetime, a fifth of a 5 s test token.
pub fn refresh_due_ms(
    token: &Token,
    issued_ms: u64,
    refresh_at: f64,
    jitter: f64,
    jitter_draw: f64,
) -> u64 {
    let lifetime = lifetime_ms(token) as f64;
    let offset = lifetime * (refresh_at - jitter * jitter_draw.clamp(0.0, 1.0));
    let latest = token
        .expires_at
        .saturating_mul(MS)
        .saturating_sub(margin_ms(token));
    (issued_ms.max(token.issued_at.saturating_mul(MS)))
        .saturating_add(offset.max(0.0) as u64)
        .min(latest)
}

/// Retry delays after transient failures: exponential from `initial`, doubling,
/// with up to 100% added jitter, capped at `max` (contract: 1 s to 5 min).
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: bool,
    delays: ExponentialBackoff,
}

impl Backoff {
    /// A schedule from `initial` to `max`; `jitter` false makes it deterministic.
    pub fn new(initial: Duration, max: Duration, jitter: bool) -> Self {
        Backoff {
            initial,
            max,
            jitter,
            delays: Self::build(initial, max, jitter),
        }
    }

    fn build(initial: Duration, max: Duration, jitter: bool) -> ExponentialBackoff {
        let builder = ExponentialBuilder::default()
            .with_min_delay(initial)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times();
        if jitter {
            builder.with_jitter().build()
        } else {
            builder.build()
        }
    }

    /// The next delay. Jitter never pushes a delay past `max`.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max).min(self.max)
    }

    /// Starts over from `initial` (after a success).
    pub fn reset(&mut self) {
        self.delays = Self::build(self.initial, self.max, self.jitter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kontext_broker_protocol::Secret;

    fn token(issued_at: u64, expires_at: u64) -> Token {
        Token {
            access_token: Secret::from("t"),
            token_type: "Bearer".into(),
            expires_at,
            issued_at,
            generation: 1,
            scopes: vec![],
        }
    }

    #[test]
    fn hour_token_needs_thirty_seconds_by_default() {
        let t = token(0, 3600);
        assert_eq!(margin_ms(&t), 30_000);
        assert_eq!(need_ms(&t, 0), 30_000);
        assert_eq!(need_ms(&t, 600), 600_000);
        // Asking for more than the IdP grants is capped at lifetime - margin.
        assert_eq!(need_ms(&t, 10_000), 3_570_000);
        assert!(serves(&t, 0, 10_000), "a fresh token always qualifies");
        assert!(serves(&t, 3_570_000, 0));
        assert!(!serves(&t, 3_570_001, 0));
    }

    #[test]
    fn short_test_tokens_scale_like_real_ones() {
        let t = token(100, 105);
        assert_eq!(margin_ms(&t), 500);
        assert!(
            serves(&t, 100_000, 60),
            "fresh 5 s token serves a 60 s request"
        );
        assert!(serves(&t, 104_500, 0));
        assert!(!serves(&t, 104_501, 0));
        assert!(!serves(&t, 105_000, 0));
    }

    #[test]
    fn degenerate_lifetimes_never_serve_expired_tokens() {
        let zero = token(100, 100);
        assert!(!serves(&zero, 99_000, 0) || unexpired(&zero, 99_000));
        assert!(!serves(&zero, 100_000, 0));
        let backwards = token(200, 100);
        assert!(!serves(&backwards, 150_000, 0));
    }

    #[test]
    fn refresh_deadline_is_at_eighty_percent_minus_jitter() {
        let t = token(0, 100);
        assert_eq!(refresh_due_ms(&t, 0, 0.8, 0.05, 0.0), 80_000);
        assert_eq!(refresh_due_ms(&t, 0, 0.8, 0.05, 0.5), 77_500);
        assert!(refresh_due_ms(&t, 0, 0.8, 0.05, 0.999) > 75_000);
    }

    #[test]
    fn refresh_deadline_uses_the_precise_issue_time_but_never_passes_the_margin() {
        // Requested at 100.9 s; the stored token says issued 100, expires 105.
        let t = token(100, 105);
        assert_eq!(refresh_due_ms(&t, 100_900, 0.8, 0.0, 0.0), 104_500);
        assert_eq!(refresh_due_ms(&t, 100_300, 0.8, 0.0, 0.0), 104_300);
        // Unknown precise time (after a restart): the floored one.
        assert_eq!(refresh_due_ms(&t, 0, 0.8, 0.0, 0.0), 104_000);
    }

    #[test]
    fn calls_start_at_least_a_second_apart() {
        assert_eq!(next_call_ms(None, 5_000), 5_000);
        assert_eq!(next_call_ms(Some(4_500), 5_000), 5_500);
        assert_eq!(next_call_ms(Some(3_000), 5_000), 5_000);
        assert_eq!(next_call_ms(Some(5_000), 5_000), 6_000);
        // The clock went back: the old stamp holds nothing up.
        assert_eq!(next_call_ms(Some(9_000), 5_000), 5_000);
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300), false);
        let secs: Vec<u64> = (0..11).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn jittered_backoff_stays_within_bounds() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300), true);
        let mut base = 1u64;
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(d >= Duration::from_secs(base.min(300)), "{d:?} < {base}");
            assert!(
                d <= Duration::from_secs((2 * base).min(300)),
                "{d:?} > 2*{base}"
            );
            base = (base * 2).min(300);
        }
    }
}
