//! Why an ID token was refused: one variant per check, each naming the claim
//! (or header) that failed and the fix. Never holds the token itself.

/// Whether the provider's keys were fetched again before a key-related refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefresh {
    /// The keys were (re-)fetched for this token and still did not fit.
    Refreshed,
    /// Not fetched again: the last re-fetch was less than the minimum interval ago.
    RateLimited,
    /// The signature failed with the key the token names; a re-fetch cannot help.
    NotNeeded,
}

/// A refused ID token (OpenID Connect Core §3.1.3.7 and §3.1.3.8).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the ID token is invalid: {}; the tokens were discarded and nothing was stored; {}", self.what(), self.fix())]
pub enum IdTokenError {
    /// The code flow's token response has no `id_token` although `openid` was asked for.
    Missing,
    /// Not a compact JWS, or a header or claim that cannot be read.
    Malformed(String),
    /// `alg` is `none`.
    Unsigned,
    /// An HMAC `alg` for a client without a secret: anyone could have made it.
    SymmetricForPublicClient {
        /// The header's `alg`.
        alg: String,
    },
    /// An `alg` the client does not accept.
    DisallowedAlg {
        /// The header's `alg`.
        alg: String,
    },
    /// A claim the specification requires is absent.
    MissingClaim(&'static str),
    /// A claim has the wrong JSON type.
    InvalidClaim {
        /// The claim's name.
        claim: &'static str,
        /// What was expected.
        expected: &'static str,
    },
    /// No key of the provider fits the token's `kid` (or, without `kid`, its `alg`).
    UnknownKey {
        /// The token's `kid`, sanitised.
        kid: Option<String>,
        /// Whether the keys were fetched again.
        refresh: KeyRefresh,
    },
    /// The signature does not verify with the provider's key(s).
    BadSignature {
        /// The token's `kid`, sanitised.
        kid: Option<String>,
        /// Whether the keys were fetched again.
        refresh: KeyRefresh,
    },
    /// `iss` differs from the discovered issuer (compared exactly).
    IssuerMismatch {
        /// The discovered issuer.
        expected: String,
        /// The token's `iss`, sanitised.
        found: String,
    },
    /// `aud` does not list the client.
    AudienceMismatch {
        /// This client's id.
        client_id: String,
    },
    /// `aud` lists another party besides the client.
    UntrustedAudience {
        /// The extra audience, sanitised.
        audience: String,
    },
    /// `azp` names another party.
    AzpMismatch {
        /// This client's id.
        client_id: String,
    },
    /// `exp` is in the past.
    Expired(String),
    /// The code flow sent a nonce and the token carries none.
    NonceMissing,
    /// The token's `nonce` is not the one sent.
    NonceMismatch,
    /// `at_hash` does not match the access token of the same response.
    AtHashMismatch,
}

impl IdTokenError {
    /// The check that failed, naming the claim.
    fn what(&self) -> String {
        use IdTokenError::*;
        match self {
            Missing => "the token response carries no `id_token` although the `openid` scope was requested".into(),
            Malformed(detail) => format!("it cannot be read ({detail})"),
            Unsigned => "it is not signed (header `alg` is `none`)".into(),
            SymmetricForPublicClient { alg } => format!(
                "it is signed with `{alg}`, a shared-secret algorithm that a client without a secret cannot trust"
            ),
            DisallowedAlg { alg } => format!("it is signed with `{alg}`, which is not accepted (RS256 is)"),
            MissingClaim(claim) => format!("required claim `{claim}` is missing"),
            InvalidClaim { claim, expected } => format!("claim `{claim}` is not {expected}"),
            UnknownKey { kid, refresh } => format!(
                "it is signed with an unknown key{}{}",
                kid_text(kid),
                refresh_text(*refresh)
            ),
            BadSignature { kid, refresh } => format!(
                "its signature does not verify with the provider's key{}{}",
                kid_text(kid),
                refresh_text(*refresh)
            ),
            IssuerMismatch { expected, found } => format!(
                "claim `iss` is `{found}`, not the discovered issuer `{expected}`"
            ),
            AudienceMismatch { client_id } => {
                format!("claim `aud` does not contain this client (`{client_id}`)")
            }
            UntrustedAudience { audience } => {
                format!("claim `aud` also names `{audience}`, a party this client does not trust")
            }
            AzpMismatch { client_id } => {
                format!("claim `azp` names another party than this client (`{client_id}`)")
            }
            Expired(detail) => format!("claim `exp` is in the past ({detail})"),
            NonceMissing => "claim `nonce` is missing although the login request sent one".into(),
            NonceMismatch => "claim `nonce` does not match the one sent with the login request".into(),
            AtHashMismatch => "`at_hash` does not match the access token".into(),
        }
    }

    /// What the user can do about it.
    fn fix(&self) -> &'static str {
        use IdTokenError::*;
        match self {
            SymmetricForPublicClient { .. } | DisallowedAlg { .. } => {
                "check the provider's client configuration (ID token signing algorithm RS256), or report the problem to the provider"
            }
            AudienceMismatch { .. } | UntrustedAudience { .. } | AzpMismatch { .. } => {
                "check the client id and the provider's client configuration, or report the problem to the provider"
            }
            IssuerMismatch { .. } => {
                "check the issuer URL and the provider's configuration, or report the problem to the provider"
            }
            Expired(_) => "check this computer's clock, or report the problem to the provider",
            NonceMissing | NonceMismatch => {
                "run the login again; if it happens again, report the problem to the provider"
            }
            _ => "check the provider's client configuration, or report the problem to the provider",
        }
    }
}

fn kid_text(kid: &Option<String>) -> String {
    match kid {
        Some(kid) => format!(" (kid `{kid}`)"),
        None => " (no kid)".into(),
    }
}

fn refresh_text(refresh: KeyRefresh) -> &'static str {
    match refresh {
        KeyRefresh::Refreshed => " even after refreshing the provider's keys",
        KeyRefresh::RateLimited => ", and the provider's keys were refreshed moments ago",
        KeyRefresh::NotNeeded => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_check_and_the_claim_then_the_fix() {
        assert_eq!(
            IdTokenError::MissingClaim("sub").to_string(),
            "the ID token is invalid: required claim `sub` is missing; the tokens were discarded and nothing was stored; check the provider's client configuration, or report the problem to the provider"
        );
        let unknown = IdTokenError::UnknownKey {
            kid: Some("k2".into()),
            refresh: KeyRefresh::Refreshed,
        };
        assert!(unknown.to_string().starts_with(
            "the ID token is invalid: it is signed with an unknown key (kid `k2`) even after refreshing the provider's keys;"
        ));
        assert!(IdTokenError::AtHashMismatch
            .to_string()
            .contains("`at_hash` does not match the access token"));
    }
}
