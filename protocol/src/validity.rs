//! The token validity rule the broker and its clients share: how long before expiry a token stops being served.
//!
//! With `lifetime = expires_at - issued_at` and `margin = min(max_margin, lifetime / 10)`,
//! a caller asking for `min_valid` seconds is served a token while
//! `expires_at - now >= min(max(min_valid, margin), lifetime - margin)`
//! (docs/architecture.md, "Validity rule"). Pure functions over unix milliseconds:
//! no clock reads, so both sides can test exact cases.

use crate::Token;

const MS: u64 = 1000;

/// The broker's largest safety margin before expiry, in milliseconds (30 s).
pub const MAX_MARGIN_MS: u64 = 30 * MS;

/// Lifetime of `token` in milliseconds (at least 1 ms, so ratios stay defined).
pub fn lifetime_ms(token: &Token) -> u64 {
    (token
        .expires_at
        .saturating_sub(token.issued_at)
        .saturating_mul(MS))
    .max(1)
}

/// Safety margin: `min(max_margin_ms, lifetime / 10)`, so short lifetimes scale like long ones.
pub fn margin_ms(token: &Token, max_margin_ms: u64) -> u64 {
    (lifetime_ms(token) / 10).min(max_margin_ms)
}

/// Validity a request for `min_valid_secs` needs: `min(max(min_valid, margin), lifetime - margin)`.
///
/// The cap at `lifetime - margin` is why a fresh token always qualifies, so no
/// caller can force a refresh loop by asking for more than the IdP grants.
pub fn need_ms(token: &Token, min_valid_secs: u64, max_margin_ms: u64) -> u64 {
    let margin = margin_ms(token, max_margin_ms);
    (min_valid_secs.saturating_mul(MS))
        .max(margin)
        .min(lifetime_ms(token) - margin)
}

/// True when `token` is unexpired at `now_ms` and valid for at least
/// `min_valid_secs` more seconds, with the margin `max_margin_ms` caps.
pub fn serves(token: &Token, now_ms: u64, min_valid_secs: u64, max_margin_ms: u64) -> bool {
    let remaining = token.expires_at.saturating_mul(MS).saturating_sub(now_ms);
    remaining > 0 && remaining >= need_ms(token, min_valid_secs, max_margin_ms)
}

/// The instant (unix ms) from which `token` no longer serves a caller asking
/// for no particular validity: expiry minus the margin.
pub fn fresh_until_ms(token: &Token, max_margin_ms: u64) -> u64 {
    token
        .expires_at
        .saturating_mul(MS)
        .saturating_sub(margin_ms(token, max_margin_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(issued_at: u64, expires_at: u64) -> Token {
        Token {
            access_token: "t".into(),
            token_type: "Bearer".into(),
            expires_at,
            issued_at,
            generation: 1,
            scopes: vec![],
        }
    }

    #[test]
    fn margin_is_a_tenth_of_short_lifetimes_and_capped_for_long_ones() {
        assert_eq!(margin_ms(&token(100, 110), MAX_MARGIN_MS), 1_000);
        assert_eq!(margin_ms(&token(0, 3600), MAX_MARGIN_MS), 30_000);
        assert_eq!(margin_ms(&token(0, 3600), 5_000), 5_000);
        assert_eq!(margin_ms(&token(200, 100), MAX_MARGIN_MS), 0);
    }

    #[test]
    fn a_request_needs_its_validity_capped_at_lifetime_minus_margin() {
        let t = token(0, 3600);
        assert_eq!(need_ms(&t, 0, MAX_MARGIN_MS), 30_000);
        assert_eq!(need_ms(&t, 600, MAX_MARGIN_MS), 600_000);
        assert_eq!(need_ms(&t, 10_000, MAX_MARGIN_MS), 3_570_000);
        assert!(serves(&t, 0, 10_000, MAX_MARGIN_MS));
        assert!(serves(&t, 3_570_000, 0, MAX_MARGIN_MS));
        assert!(!serves(&t, 3_570_001, 0, MAX_MARGIN_MS));
        assert!(!serves(&t, 3_600_000, 0, MAX_MARGIN_MS));
    }

    #[test]
    fn fresh_until_is_expiry_minus_margin_and_never_past_expiry() {
        assert_eq!(fresh_until_ms(&token(100, 110), MAX_MARGIN_MS), 109_000);
        assert_eq!(fresh_until_ms(&token(0, 3600), MAX_MARGIN_MS), 3_570_000);
        assert_eq!(fresh_until_ms(&token(200, 100), MAX_MARGIN_MS), 100_000);
    }
}
