//! Which URLs the broker will talk to.

use std::net::IpAddr;

use url::Url;

use crate::{Error, Result};

/// True for `http://` URLs whose host is a loopback address or `localhost`.
pub fn is_loopback_http(url: &Url) -> bool {
    if url.scheme() != "http" {
        return false;
    }
    match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Checks an issuer URL: `https://`, or `http://` on loopback only (contract §4);
/// no query, fragment or credentials, as OIDC Discovery requires.
pub fn validate_issuer(issuer: &str) -> Result<Url> {
    let url = Url::parse(issuer)
        .map_err(|e| Error::Invalid(format!("issuer `{issuer}` is not a URL: {e}")))?;
    check_scheme(&url, "issuer")?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(Error::Invalid(format!(
            "issuer `{issuer}` must not have a query or fragment"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::Invalid(
            "issuer URL must not contain credentials".into(),
        ));
    }
    Ok(url)
}

/// Checks an endpoint from a discovery document by the same scheme rule, so a
/// document cannot downgrade token traffic to plain HTTP.
pub fn validate_endpoint(what: &str, endpoint: &str) -> Result<Url> {
    let url = Url::parse(endpoint).map_err(|e| {
        // Discovery documents are IdP text.
        let endpoint = super::sanitize::text(endpoint);
        Error::Invalid(format!("{what} `{endpoint}` is not a URL: {e}"))
    })?;
    check_scheme(&url, what)?;
    Ok(url)
}

fn check_scheme(url: &Url, what: &str) -> Result<()> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_http(url) => Ok(()),
        "http" => Err(Error::Invalid(format!(
            "{what} `{url}` uses plain http; only https is allowed, except on loopback addresses"
        ))),
        other => Err(Error::Invalid(format!(
            "{what} `{url}` has unsupported scheme `{other}`; use https"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuers() {
        for ok in [
            "https://idp.example",
            "https://idp.example/realms/x",
            "http://127.0.0.1:4444",
            "http://127.8.9.1",
            "http://[::1]:8080",
            "http://localhost:3000",
        ] {
            assert!(validate_issuer(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://idp.example",
            "http://10.0.0.1",
            "http://localhost.evil.example",
            "ftp://idp.example",
            "https://idp.example/?x=1",
            "https://user:pw@idp.example",
            "not a url",
        ] {
            assert!(validate_issuer(bad).is_err(), "{bad}");
        }
    }
}
