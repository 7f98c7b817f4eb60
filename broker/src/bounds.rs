//! What a profile may hold: length caps on the names it carries and the
//! RFC 6750 charset of its tokens, checked where the values come in (import,
//! login, refresh). Bounded fields keep every `status` entry small, so a page
//! of them always fits one frame; `docs/operations.md` lists the caps.

use kontext_broker_protocol::ImportRequest;

use crate::{Error, Result};

/// Longest issuer URL, in bytes.
pub const MAX_ISSUER_LEN: usize = 512;
/// Longest client id, in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 256;
/// Longest single scope, in bytes.
pub const MAX_SCOPE_LEN: usize = 128;
/// Most scopes a profile requests, or keeps from a token response.
pub const MAX_SCOPES: usize = 32;

/// True for an RFC 6750 §2.1 `b64token`: `[A-Za-z0-9._~+/-]+=*`. Access and
/// refresh tokens must be one; anything else (a CR/LF that would inject a
/// header, an ESC, a space) makes the token response garbage.
pub fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'+' | b'/' | b'-')
        })
}

/// True for an RFC 6749 §3.3 `scope-token`: `%x21 / %x23-5B / %x5D-7E`.
fn is_scope_token(scope: &str) -> bool {
    !scope.is_empty()
        && scope
            .bytes()
            .all(|b| matches!(b, 0x21 | 0x23..=0x5b | 0x5d..=0x7e))
}

/// Checks the caller-supplied fields of an import against the caps.
/// (The profile name has its own rule, `[A-Za-z0-9._-]{1,64}`.)
pub fn check_import(import: &ImportRequest) -> Result<()> {
    let too_long = |what: &str, len: usize, max: usize| {
        Error::Invalid(format!(
            "the {what} has {len} bytes; at most {max} are allowed"
        ))
    };
    if import.issuer.len() > MAX_ISSUER_LEN {
        return Err(too_long("issuer URL", import.issuer.len(), MAX_ISSUER_LEN));
    }
    if import.client_id.is_empty() {
        return Err(Error::Invalid("the client id is empty".into()));
    }
    if import.client_id.len() > MAX_CLIENT_ID_LEN {
        return Err(too_long(
            "client id",
            import.client_id.len(),
            MAX_CLIENT_ID_LEN,
        ));
    }
    if import.client_id.chars().any(char::is_control) {
        return Err(Error::Invalid(
            "the client id contains control characters".into(),
        ));
    }
    if import.scopes.len() > MAX_SCOPES {
        return Err(Error::Invalid(format!(
            "{} scopes requested; at most {MAX_SCOPES} are allowed",
            import.scopes.len()
        )));
    }
    for scope in &import.scopes {
        if scope.len() > MAX_SCOPE_LEN {
            return Err(too_long("scope", scope.len(), MAX_SCOPE_LEN));
        }
        if !is_scope_token(scope) {
            return Err(Error::Invalid(
                "a scope is empty or has characters outside RFC 6749 §3.3 (printable ASCII, no space, quote or backslash); pass one scope per --scope".into(),
            ));
        }
    }
    Ok(())
}

/// The scopes an IdP says it granted, bounded: scope-tokens only (others are
/// dropped), each at most [`MAX_SCOPE_LEN`] bytes, at most [`MAX_SCOPES`].
pub fn granted_scopes<'a>(scopes: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    scopes
        .into_iter()
        .filter(|s| s.len() <= MAX_SCOPE_LEN && is_scope_token(s))
        .take(MAX_SCOPES)
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kontext_broker_protocol::{ClientCredential, Secret};

    #[test]
    fn b64tokens() {
        for ok in ["abc", "a.b_c~d+e/f-g", "abc==", "eyJ.eyJ.sig", "x="] {
            assert!(is_b64token(ok), "{ok}");
        }
        for bad in [
            "",
            "=",
            "a b",
            "ab\r\nX-Evil: 1",
            "a\x1b[2J",
            "a=b",
            "tok\u{e9}n",
            "a\"b",
        ] {
            assert!(!is_b64token(bad), "{bad:?}");
        }
    }

    fn import(issuer: &str, client_id: &str, scopes: Vec<String>) -> ImportRequest {
        ImportRequest {
            profile: "p".into(),
            issuer: issuer.into(),
            client_id: client_id.into(),
            credential: ClientCredential::None,
            client_auth: None,
            scopes,
            endpoints: Default::default(),
            token_response: Secret::from("{}"),
        }
    }

    #[test]
    fn imports_are_checked_against_the_caps() {
        let issuer = "https://idp.example";
        assert!(check_import(&import(issuer, "cli", vec!["openid".into()])).is_ok());
        let long_issuer = format!("https://idp.example/{}", "a".repeat(500));
        assert!(check_import(&import(&long_issuer, "cli", vec![])).is_err());
        assert!(check_import(&import(issuer, &"c".repeat(257), vec![])).is_err());
        assert!(check_import(&import(issuer, "c\x1b", vec![])).is_err());
        assert!(check_import(&import(issuer, "cli", vec!["s".repeat(129)])).is_err());
        assert!(check_import(&import(issuer, "cli", vec!["a b".into()])).is_err());
        let many = (0..33).map(|i| format!("s{i}")).collect();
        assert!(check_import(&import(issuer, "cli", many)).is_err());
    }

    #[test]
    fn granted_scopes_are_bounded() {
        let long = "x".repeat(200);
        let got = granted_scopes(["openid", "bad\u{7}", &long, "email"]);
        assert_eq!(got, ["openid", "email"]);
        let many: Vec<String> = (0..100).map(|i| format!("s{i}")).collect();
        assert_eq!(
            granted_scopes(many.iter().map(String::as_str)).len(),
            MAX_SCOPES
        );
    }
}
