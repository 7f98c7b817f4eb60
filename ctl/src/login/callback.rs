//! The loopback redirect listener of the code flow (RFC 8252 §7.3).
//!
//! Bound to 127.0.0.1 on a port the OS picks. It answers only `GET /callback`;
//! anything else (favicon requests, probes) gets a 404 and is otherwise
//! ignored. A callback with a wrong or missing `state` is answered 400 and
//! ignored (it cannot be our browser's, and must not let another local process
//! cancel the login). The first callback with the right `state` decides: a
//! `code` succeeds, an `error` fails the login. When the provider advertises
//! `authorization_response_iss_parameter_supported`, the callback must carry
//! `iss` equal to the discovered issuer (RFC 9207 §2.4), checked before any
//! code is redeemed. The listener and every open connection live inside the
//! [`CallbackListener::wait`] future and its owner, so dropping either closes
//! the port; the callback that carries the code is held open ([`BrowserReply`])
//! so the browser learns the outcome of the exchange.

use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use kontext_broker_protocol::Secret;
use openidconnect::CsrfToken;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use super::page::{BrowserReply, Page};
use super::LoginError;
use kontext_broker::idp::sanitize::text as sanitize;

/// Path of the redirect URI.
pub const CALLBACK_PATH: &str = "/callback";
/// Largest request head read from a connection.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long one connection may take to send its request head. Browsers open
/// speculative connections that never send; they must not hold anything up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed unanswered.
const MAX_CONNECTIONS: usize = 16;

/// A bound loopback listener waiting for the authorization response.
pub struct CallbackListener {
    listener: TcpListener,
    port: u16,
}

/// The `iss` a callback must carry (RFC 9207).
#[derive(Debug, Clone, Copy)]
pub struct ExpectedIssuer<'a> {
    /// The issuer exactly as discovered; compared byte for byte.
    pub issuer: &'a str,
    /// The provider advertises `authorization_response_iss_parameter_supported`:
    /// a callback without `iss` is refused.
    pub required: bool,
}

/// What one connection turned out to be.
enum Request {
    /// Not the callback (wrong path or method, garbage, timeout).
    Other,
    /// The callback, with its decoded query parameters and the connection to answer on.
    Callback(Vec<(String, String)>, TcpStream),
}

impl CallbackListener {
    /// Binds `127.0.0.1:0`.
    pub async fn bind() -> std::io::Result<CallbackListener> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        Ok(CallbackListener { listener, port })
    }

    /// `http://127.0.0.1:<port>/callback`.
    pub fn redirect_uri(&self) -> String {
        format!("http://127.0.0.1:{}{CALLBACK_PATH}", self.port)
    }

    /// Waits for the callback and returns its authorization code, with the
    /// browser's request held until the caller knows the outcome.
    ///
    /// A callback with a missing or wrong `state` is answered 400 and ignored: it
    /// cannot be our browser's (state is unguessable), and letting it end the
    /// login would let any local process cancel it. Fails on a missing or wrong
    /// `iss` (RFC 9207), an `error` parameter ([`LoginError::Denied`]) or a
    /// missing `code`; the browser then gets the reason at once.
    pub async fn wait(
        &self,
        state: &CsrfToken,
        issuer: ExpectedIssuer<'_>,
        tasks: &TaskTracker,
    ) -> Result<(Secret, BrowserReply), LoginError> {
        let mut connections = FuturesUnordered::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let Ok((stream, _peer)) = accepted else {
                        // E.g. out of descriptors: pause instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    if connections.len() >= MAX_CONNECTIONS {
                        continue; // dropped: closed unanswered
                    }
                    connections.push(serve(stream));
                }
                Some(request) = connections.next(), if !connections.is_empty() => {
                    let Request::Callback(params, stream) = request else { continue };
                    match evaluate(&params, state, issuer) {
                        Ok(code) => return Ok((code, BrowserReply::hold(stream, tasks))),
                        Err(LoginError::StateMismatch) => {
                            // Not our browser's answer: any local process can reach this
                            // port, so a forged callback must not be able to end the
                            // login. Refuse it and keep waiting for the real one.
                            Page::not_this_login().send(stream).await;
                        }
                        Err(e) => {
                            Page::failure(&e.to_string()).send(stream).await;
                            return Err(e);
                        }
                    }
                }
            }
        }
    }
}

/// Reads one request head; answers 404 to anything but `GET /callback`, and
/// hands the stream back for the callback so the answer can say how it went.
async fn serve(mut stream: TcpStream) -> Request {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(Some(head)) => head,
        _ => return Request::Other,
    };
    let mut parts = head.expose().lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if method != "GET" || path != CALLBACK_PATH {
        Page::not_found().send(stream).await;
        return Request::Other;
    }
    let params = url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    Request::Callback(params, stream)
}

/// Reads up to the blank line ending the head; `None` on EOF or oversize.
async fn read_head(stream: &mut TcpStream) -> Option<Secret> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            // The head holds the code; keep it in a zeroizing box from here on.
            let head = Secret::new(String::from_utf8_lossy(&buf).into_owned());
            zeroize::Zeroize::zeroize(&mut buf);
            return Some(head);
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return None;
        }
    }
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Decides what a callback means. State first: nothing else of a callback
/// with the wrong state is trusted, not even its error code.
fn evaluate(
    params: &[(String, String)],
    state: &CsrfToken,
    expected: ExpectedIssuer<'_>,
) -> Result<Secret, LoginError> {
    let got = param(params, "state").unwrap_or("");
    if !constant_time_eq(got.as_bytes(), state.secret().as_bytes()) {
        return Err(LoginError::StateMismatch);
    }
    // RFC 9207 §2.4: exact comparison; absent is fine only when not promised.
    match param(params, "iss") {
        Some(iss) if iss == expected.issuer => {}
        Some(iss) => return Err(LoginError::IssuerMismatch(sanitize(iss))),
        None if expected.required => return Err(LoginError::IssuerMissing),
        None => {}
    }
    if let Some(error) = param(params, "error") {
        return Err(LoginError::Denied {
            error: kontext_broker::idp::sanitize::code(
                error,
                &kontext_broker::idp::sanitize::Secrets::none(),
            ),
            description: param(params, "error_description").map(sanitize),
        });
    }
    match param(params, "code") {
        Some(code) if !code.is_empty() => Ok(Secret::new(code.to_owned())),
        _ => Err(LoginError::Token(
            "the login callback carried neither a code nor an error".into(),
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn state_is_checked_before_anything_else() {
        let state = CsrfToken::new("s1".into());
        let iss = ExpectedIssuer {
            issuer: "http://127.0.0.1:1",
            required: false,
        };
        assert_eq!(
            evaluate(&params(&[("state", "s1"), ("code", "c")]), &state, iss)
                .unwrap()
                .expose(),
            "c"
        );
        for bad in [
            params(&[("state", "s2"), ("code", "c")]),
            params(&[("code", "c")]),
            params(&[("state", "s2"), ("error", "access_denied")]),
        ] {
            assert!(matches!(
                evaluate(&bad, &state, iss),
                Err(LoginError::StateMismatch)
            ));
        }
        assert!(matches!(
            evaluate(
                &params(&[("state", "s1"), ("error", "access_denied"), ("error_description", "no\x1b")]),
                &state,
                iss
            ),
            Err(LoginError::Denied { error, description })
                if error == "access_denied" && description.as_deref() == Some("no")
        ));
        assert!(matches!(
            evaluate(
                &params(&[
                    ("state", "s1"),
                    ("code", "c"),
                    ("iss", "https://evil.example")
                ]),
                &state,
                iss
            ),
            Err(LoginError::IssuerMismatch(_))
        ));
        assert!(evaluate(&params(&[("state", "s1")]), &state, iss).is_err());
    }

    #[test]
    fn rfc9207_iss_is_compared_exactly_and_required_when_advertised() {
        let state = CsrfToken::new("s1".into());
        let optional = ExpectedIssuer {
            issuer: "https://idp.example",
            required: false,
        };
        let required = ExpectedIssuer {
            required: true,
            ..optional
        };
        let with = |iss: &str| params(&[("state", "s1"), ("code", "c"), ("iss", iss)]);
        let without = params(&[("state", "s1"), ("code", "c")]);
        assert!(evaluate(&with("https://idp.example"), &state, required).is_ok());
        assert!(evaluate(&without, &state, optional).is_ok());
        assert!(matches!(
            evaluate(&without, &state, required),
            Err(LoginError::IssuerMissing)
        ));
        // No normalisation: a trailing slash is another issuer.
        for wrong in [
            "https://idp.example/",
            "https://IDP.example",
            "https://evil.example",
        ] {
            assert!(matches!(
                evaluate(&with(wrong), &state, optional),
                Err(LoginError::IssuerMismatch(_))
            ));
        }
    }
}
