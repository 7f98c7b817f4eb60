//! The token-response parsers: what an IdP's token endpoint can send back.
//!
//! Every input goes to the lenient parser used by import and login
//! (`TokenResponse::parse`, plus the ID-token subject reader) and, through a
//! loopback HTTP server in this process, to the real refresh path
//! (`Idp::refresh`: openidconnect's parser, the rescue parser, the error
//! classifier). Byte 0 picks the HTTP status. Nothing may panic, a parse error
//! never echoes a token of the body, and neither a refresh error nor an ID
//! token's subject holds a control character or a token of the response.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use kontext_broker::engine::{RefreshError, TokenEndpoint};
use kontext_broker::idp::sanitize::{Secrets, REDACTED};
use kontext_broker::idp::{subject_from_id_token, Idp, TokenResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

const STATUSES: [u16; 8] = [200, 200, 200, 400, 401, 429, 500, 503];

struct Harness {
    rt: Runtime,
    idp: Idp,
    addr: SocketAddr,
    /// The response the server sends next: status and body.
    next: Arc<Mutex<(u16, Vec<u8>)>>,
}

/// A one-route HTTP/1.1 server that answers every request with `next`.
async fn serve(listener: TcpListener, next: Arc<Mutex<(u16, Vec<u8>)>>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let next = next.clone();
        tokio::spawn(async move {
            // Read the request head and its form body (small; one read loop).
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let Ok(n) = conn.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            let (status, body) = next.lock().unwrap().clone();
            let head = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(&body).await;
            let _ = conn.shutdown().await;
        });
    }
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let next = Arc::new(Mutex::new((200, Vec::new())));
        let addr = rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(serve(listener, next.clone()));
            addr
        });
        let idp = Idp::new(&super::harness::fuzz_config()).expect("idp");
        Harness {
            rt,
            idp,
            addr,
            next,
        }
    })
}

/// Token-like strings of the body, which no error may repeat.
fn secrets_in(body: &str) -> Vec<String> {
    let Ok(value) = serde_json_value(body) else {
        return Vec::new();
    };
    ["access_token", "refresh_token"]
        .iter()
        .filter_map(|k| value.get(*k).and_then(|v| v.as_str()))
        .filter(|s| s.len() >= 8)
        .map(str::to_owned)
        .collect()
}

/// A subject shown by `status`: no control character, and no token of the
/// response outside a `[redacted]` mark (the mark becomes a NUL, which no
/// token can span, so no token is formed across one).
fn assert_shown_safely(subject: Option<String>, tokens: &[&str]) {
    let Some(subject) = subject else { return };
    assert!(
        !subject.chars().any(char::is_control),
        "subject carries a control character: {subject:?}"
    );
    let outside = subject.replace(REDACTED, "\0");
    for token in tokens {
        assert!(
            !outside.contains(token),
            "subject echoes a token: {subject:?}"
        );
    }
}

fn serde_json_value(body: &str) -> Result<serde_json::Value, serde_json::Error> {
    serde_json::from_str(body)
}

/// Runs one input; panics on a finding.
pub fn check(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(body);
    // The lenient parser (import, login).
    match TokenResponse::parse(&text) {
        Ok(r) => {
            let _ = r.scopes();
            let mut tokens = vec![r.access_token.expose()];
            tokens.extend(r.refresh_token.as_ref().map(|t| t.expose()));
            tokens.retain(|t| !t.is_empty());
            let mut secrets = Secrets::none();
            for token in &tokens {
                secrets.add(token);
            }
            if let Some(id) = &r.id_token {
                assert_shown_safely(subject_from_id_token(id, &secrets), &tokens);
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for s in secrets_in(&text) {
                assert!(!msg.contains(&s), "parse error echoes a token: {msg}");
            }
        }
    }
    assert_shown_safely(subject_from_id_token(&text, &Secrets::none()), &[]);

    // The refresh path, over HTTP.
    let h = harness();
    let status = STATUSES[selector as usize % STATUSES.len()];
    *h.next.lock().unwrap() = (status, body.to_vec());
    let mut record = super::harness::seeded_record(1_800_000_000);
    record.endpoints.token = format!("http://{}/token", h.addr);
    let result = h.rt.block_on(h.idp.refresh(record));
    if let Err(RefreshError::Rejected(detail) | RefreshError::Transient(detail)) = &result {
        // IdP text reaches logs and terminals: never a control character.
        assert!(
            !detail.chars().any(char::is_control),
            "refresh error carries a control character: {detail:?}"
        );
    }
}
