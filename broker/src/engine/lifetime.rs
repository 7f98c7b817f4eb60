//! How long a new access token lives, when the token response may omit
//! `expires_in`: `expires_in` first, else the access token's own JWT `exp`
//! (read without verification, only to schedule refreshes; RFC 9068 tokens carry
//! it), else the profile's `default_token_lifetime`. A lifetime below 1 s counts
//! as 1 s, and none is believed past [`super::policy::MAX_LIFETIME_SECS`].

use base64::Engine as _;
use kontext_broker_protocol::LifetimeSource;

use super::policy::MAX_LIFETIME_SECS;

/// Default for config `default_token_lifetime`, in seconds.
pub const DEFAULT_TOKEN_LIFETIME_SECS: u64 = 300;

/// The lifetime in seconds of `access_token`, issued at `now_secs`, and where it
/// came from.
pub fn lifetime(
    expires_in: Option<u64>,
    access_token: &str,
    now_secs: u64,
    default_secs: u64,
) -> (u64, LifetimeSource) {
    let (secs, source) = match (expires_in, jwt_exp(access_token)) {
        (Some(secs), _) => (secs, LifetimeSource::ExpiresIn),
        (None, Some(exp)) => (exp.saturating_sub(now_secs), LifetimeSource::JwtExp),
        (None, None) => (default_secs, LifetimeSource::Default),
    };
    (secs.clamp(1, MAX_LIFETIME_SECS), source)
}

/// The numeric `exp` claim of a JWS-shaped token (`header.payload.signature`),
/// decoded without any verification. Never logs or returns the token.
pub fn jwt_exp(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > 16 * 1024 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match claims.get("exp")? {
        serde_json::Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", enc(r#"{"alg":"RS256"}"#), enc(claims))
    }

    #[test]
    fn expires_in_then_jwt_exp_then_default() {
        let token = jwt(r#"{"sub":"u","exp":1005}"#);
        assert_eq!(
            lifetime(Some(60), &token, 1000, 300),
            (60, LifetimeSource::ExpiresIn)
        );
        assert_eq!(
            lifetime(None, &token, 1000, 300),
            (5, LifetimeSource::JwtExp)
        );
        assert_eq!(
            lifetime(None, "opaque-token", 1000, 300),
            (300, LifetimeSource::Default)
        );
        assert_eq!(
            lifetime(None, "a.b.c", 1000, 42),
            (42, LifetimeSource::Default)
        );
    }

    #[test]
    fn lifetimes_below_a_second_count_as_one() {
        let past = jwt(r#"{"exp":900}"#);
        assert_eq!(
            lifetime(None, &past, 1000, 300),
            (1, LifetimeSource::JwtExp)
        );
        assert_eq!(
            lifetime(Some(0), "t", 1000, 300),
            (1, LifetimeSource::ExpiresIn)
        );
        assert_eq!(lifetime(None, "t", 1000, 0), (1, LifetimeSource::Default));
        assert_eq!(
            lifetime(Some(u64::MAX), "t", 1000, 300).0,
            MAX_LIFETIME_SECS
        );
    }

    #[test]
    fn odd_tokens_have_no_exp() {
        assert_eq!(jwt_exp(&jwt(r#"{"exp":"1005"}"#)), None);
        assert_eq!(jwt_exp(&jwt(r#"{"exp":-5}"#)), None);
        assert_eq!(jwt_exp(&jwt(r#"{"exp":1005.9}"#)), Some(1005));
        assert_eq!(jwt_exp(&format!("{}.extra", jwt(r#"{"exp":1}"#))), None);
        assert_eq!(jwt_exp("no-dots"), None);
        assert_eq!(jwt_exp("a.!!!.c"), None);
    }
}
