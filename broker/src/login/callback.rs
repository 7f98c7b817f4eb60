//! The loopback redirect listener of the code flow (RFC 8252 §7.3).
//!
//! Bound to 127.0.0.1 on a port the OS picks. It answers only `GET /callback`;
//! anything else (favicon requests, probes) gets a 404 and is otherwise
//! ignored. A callback with a wrong or missing `state` is answered 400 and
//! ignored (it cannot be our browser's, and must not let another local process
//! cancel the login). The first callback with the right `state` decides: a
//! `code` succeeds, an `error` fails the login. The listener and every open connection live inside the
//! [`CallbackListener::wait`] future and its owner, so dropping either closes
//! the port.

use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use kontext_broker_protocol::Secret;
use openidconnect::CsrfToken;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{sanitize, LoginError};

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

/// What one connection turned out to be.
enum Request {
    /// Not the callback (wrong path or method, garbage, timeout).
    Other,
    /// The callback, with its decoded query parameters.
    Callback(Vec<(String, String)>),
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

    /// Waits for the callback and returns its authorization code.
    ///
    /// A callback with a missing or wrong `state` is answered 400 and ignored: it
    /// cannot be our browser's (state is unguessable), and letting it end the
    /// login would let any local process cancel it. Fails on an
    /// `iss` other than `issuer` (RFC 9207), an `error` parameter
    /// ([`LoginError::Denied`]) or a missing `code`. Either way the browser gets
    /// a short page saying what happened.
    pub async fn wait(&self, state: &CsrfToken, issuer: &str) -> Result<Secret, LoginError> {
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
                Some((request, stream)) = connections.next(), if !connections.is_empty() => {
                    let Request::Callback(params) = request else { continue };
                    let outcome = evaluate(&params, state, issuer);
                    respond_to_callback(stream, &outcome).await;
                    if matches!(outcome, Err(LoginError::StateMismatch)) {
                        // Not our browser's answer: any local process can reach this
                        // port, so a forged callback must not be able to end the
                        // login. Refuse it and keep waiting for the real one.
                        continue;
                    }
                    return outcome;
                }
            }
        }
    }
}

/// Reads one request head; answers 404 to anything but `GET /callback`, and
/// hands the stream back for the callback so the answer can say how it went.
async fn serve(mut stream: TcpStream) -> (Request, Option<TcpStream>) {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(Some(head)) => head,
        _ => return (Request::Other, None),
    };
    let mut parts = head.expose().lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if method != "GET" || path != CALLBACK_PATH {
        write_page(&mut stream, "404 Not Found", "Not found.").await;
        return (Request::Other, None);
    }
    let params = url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    (Request::Callback(params), Some(stream))
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
    issuer: &str,
) -> Result<Secret, LoginError> {
    let got = param(params, "state").unwrap_or("");
    if !constant_time_eq(got.as_bytes(), state.secret().as_bytes()) {
        return Err(LoginError::StateMismatch);
    }
    if let Some(iss) = param(params, "iss") {
        if iss.trim_end_matches('/') != issuer.trim_end_matches('/') {
            return Err(LoginError::IssuerMismatch(sanitize(iss)));
        }
    }
    if let Some(error) = param(params, "error") {
        return Err(LoginError::Denied {
            error: crate::idp::sanitize::code(error, &crate::idp::sanitize::Secrets::none()),
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

async fn respond_to_callback(stream: Option<TcpStream>, outcome: &Result<Secret, LoginError>) {
    let Some(mut stream) = stream else { return };
    match outcome {
        Ok(_) => {
            write_page(
                &mut stream,
                "200 OK",
                "Login received. You can close this tab and return to the terminal.",
            )
            .await
        }
        Err(_) => {
            write_page(
                &mut stream,
                "400 Bad Request",
                "Login failed. See the terminal for details; you can close this tab.",
            )
            .await
        }
    }
}

/// A tiny, self-contained HTML answer; the connection closes afterwards.
async fn write_page(stream: &mut TcpStream, status: &str, text: &str) {
    let body = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>kontext login</title></head>\
         <body><p>{text}</p></body></html>"
    );
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nReferrer-Policy: no-referrer\r\n\
         Content-Security-Policy: default-src 'none'\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
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
        let iss = "http://127.0.0.1:1";
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
}
