//! The page the browser sees on the loopback callback.
//!
//! Small and self-contained: inline CSS only (light and dark through
//! `prefers-color-scheme`), nothing loaded from anywhere, sent with
//! `Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'`.
//! It never holds a token, code or state; every string from the provider is
//! HTML-escaped.
//!
//! For the callback that carries the code, the answer is held
//! ([`BrowserReply`]) until the code exchange and the checks have ended, so the
//! page tells the real outcome, at most [`HOLD_LIMIT`] after the callback.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

/// Longest time the browser's callback request is held for the outcome.
pub const HOLD_LIMIT: Duration = Duration::from_secs(15);

/// The header every answer carries.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'";

/// One answer page.
#[derive(Debug, Clone)]
pub struct Page {
    status: &'static str,
    title: &'static str,
    /// Paragraphs, not yet escaped.
    lines: Vec<String>,
    ok: bool,
}

impl Page {
    /// The login succeeded.
    pub fn success(account: Option<&str>, issuer: &str, profile: Option<&str>) -> Page {
        let mut lines = vec![match account {
            Some(account) => format!("Logged in as {account}."),
            None => "Logged in.".to_owned(),
        }];
        lines.push(format!("Identity provider: {issuer}"));
        if let Some(profile) = profile {
            lines.push(format!("Profile: {profile}"));
        }
        lines.push("You can close this tab and return to the terminal.".into());
        Page {
            status: "200 OK",
            title: "Login complete",
            lines,
            ok: true,
        }
    }

    /// The login failed; `reason` is the error in words (never holds a token).
    pub fn failure(reason: &str) -> Page {
        Page {
            status: "400 Bad Request",
            title: "Login failed",
            lines: vec![
                reason.to_owned(),
                "Nothing was stored. You can close this tab; the terminal says the same.".into(),
            ],
            ok: false,
        }
    }

    /// The login was cancelled before the outcome was known.
    pub fn cancelled() -> Page {
        Page {
            status: "400 Bad Request",
            title: "Login cancelled",
            lines: vec![
                "The login was cancelled in the terminal. Nothing was stored.".into(),
                "You can close this tab.".into(),
            ],
            ok: false,
        }
    }

    /// The outcome took longer than [`HOLD_LIMIT`].
    pub fn still_working() -> Page {
        Page {
            status: "202 Accepted",
            title: "Login in progress",
            lines: vec![
                "The identity provider is slow to answer. The terminal will show the outcome."
                    .into(),
                "You can close this tab.".into(),
            ],
            ok: true,
        }
    }

    /// A callback that is not this login's (wrong or missing state).
    pub fn not_this_login() -> Page {
        Page {
            status: "400 Bad Request",
            title: "Not this login",
            lines: vec![
                "This answer does not belong to the login in progress, so it was ignored.".into(),
            ],
            ok: false,
        }
    }

    /// Anything but the callback path.
    pub fn not_found() -> Page {
        Page {
            status: "404 Not Found",
            title: "Not found",
            lines: vec!["Not found.".into()],
            ok: false,
        }
    }

    /// The HTML document.
    pub fn html(&self) -> String {
        let mut body = String::new();
        for line in &self.lines {
            body.push_str("<p>");
            body.push_str(&escape(line));
            body.push_str("</p>");
        }
        let mark = if self.ok { "ok" } else { "fail" };
        format!(
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"color-scheme\" content=\"light dark\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>{title} - kontext login</title><style>{STYLE}</style></head>\
             <body><main class=\"{mark}\"><h1>{title}</h1>{body}</main></body></html>",
            title = escape(self.title),
        )
    }

    /// The complete HTTP/1.1 response.
    pub fn response(&self) -> String {
        let body = self.html();
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n\
             Content-Length: {len}\r\nCache-Control: no-store\r\nReferrer-Policy: no-referrer\r\n\
             X-Content-Type-Options: nosniff\r\nContent-Security-Policy: {CONTENT_SECURITY_POLICY}\r\n\
             Connection: close\r\n\r\n{body}",
            status = self.status,
            len = body.len(),
        )
    }

    /// Writes the response and closes the connection; errors are ignored
    /// (the browser may be gone).
    pub async fn send(&self, mut stream: TcpStream) {
        let _ = stream.write_all(self.response().as_bytes()).await;
        let _ = stream.shutdown().await;
    }
}

const STYLE: &str = "body{font:16px/1.5 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1c1e21}\
main{max-width:36rem;margin:4rem auto;padding:1.5rem 2rem;background:#fff;border-radius:8px;\
border-top:6px solid #2e7d32;box-shadow:0 1px 4px rgba(0,0,0,.12);overflow-wrap:anywhere}\
main.fail{border-top-color:#c62828}h1{font-size:1.4rem;margin:0 0 1rem}\
@media (prefers-color-scheme:dark){body{background:#121417;color:#e4e6eb}\
main{background:#1e2126;box-shadow:none;border-top-color:#66bb6a}main.fail{border-top-color:#ef5350}}";

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The browser's held callback request. [`BrowserReply::finish`] answers it;
/// dropping it unanswered tells the browser the login was cancelled.
#[derive(Debug)]
pub struct BrowserReply {
    tx: Option<oneshot::Sender<Page>>,
}

impl BrowserReply {
    /// Holds `stream` in a task on `tasks` until [`BrowserReply::finish`] or
    /// [`HOLD_LIMIT`], whichever comes first.
    pub fn hold(stream: TcpStream, tasks: &TaskTracker) -> BrowserReply {
        let (tx, rx) = oneshot::channel::<Page>();
        tasks.spawn(async move {
            let page = match tokio::time::timeout(HOLD_LIMIT, rx).await {
                Ok(Ok(page)) => page,
                Ok(Err(_)) => Page::cancelled(),
                Err(_) => Page::still_working(),
            };
            page.send(stream).await;
        });
        BrowserReply { tx: Some(tx) }
    }

    /// Answers the browser with `page`.
    pub fn finish(mut self, page: Page) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(page);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_text_is_escaped_and_the_page_is_self_contained() {
        let page = Page::success(
            Some("<script>alert(1)</script>"),
            "https://idp.example/?a=1&b=\"2\"",
            Some("work"),
        );
        let html = page.html();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("a=1&amp;b=&quot;2&quot;"));
        assert!(html.contains("Profile: work"));
        assert!(html.contains("prefers-color-scheme:dark"));
        for external in ["src=", "href=", "url(", "@import", "http-equiv"] {
            assert!(!html.contains(external), "{external} in {html}");
        }
        let response = page.response();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(response.contains(
            "\r\nContent-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n"
        ));
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(Page::failure("x").response().starts_with("HTTP/1.1 400"));
    }
}
