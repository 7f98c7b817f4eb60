//! The device authorization grant (RFC 8628) through openidconnect.
//!
//! openidconnect's poller honours `interval`, adds 5 s on `slow_down`
//! (§3.5) and keeps going on `authorization_pending`; this module waits one
//! interval before the first poll, maps the final answers to clear errors, and
//! bounds the whole wait by the login timeout and the code's `expires_in`.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use openidconnect::core::CoreDeviceAuthorizationResponse;
use openidconnect::{
    AsyncHttpClient, DeviceAuthorizationUrl, DeviceCodeErrorResponse, DeviceCodeErrorResponseType,
    EndpointNotSet, EndpointState, RequestTokenError, Scope,
};

use super::code::with_client_auth;
use super::token::{LoginClient, RawTokenResponse};
use super::{request_failure, token_error, LoginContext, LoginError, LoginUi};
use kontext_broker::idp::client_auth::{assertion, ASSERTION_TYPE};
use kontext_broker::idp::sanitize::text as sanitize;
use kontext_broker::idp::{ClientAuth, EndpointKind, Http, HttpError};

/// Runs the device flow: asks for a code, shows it, and polls until the user
/// approves, refuses, or time runs out. The response is checked by the caller
/// ([`LoginContext::accept`], without a nonce: this flow sends none).
pub(super) async fn device_flow(
    ctx: &LoginContext<'_>,
    client: LoginClient,
    ui: &mut dyn LoginUi,
) -> Result<RawTokenResponse, LoginError> {
    let (http, scopes, timeout) = (ctx.http, &ctx.scopes, ctx.opts.timeout);
    let url = ctx
        .discovered
        .endpoints
        .device_authorization
        .clone()
        .unwrap_or_default();
    let url = DeviceAuthorizationUrl::new(url)
        .map_err(|e| LoginError::Unsupported(format!("device authorization endpoint URL: {e}")))?;
    let client = client.set_device_authorization_url(url);
    // The device authorization request finds the client method (falling back
    // once after invalid_client); polling then uses the one that worked.
    let attempts = ctx.attempts(EndpointKind::DeviceAuthorization);
    let mut found = None;
    for (i, method) in attempts.iter().enumerate() {
        let prepared = ctx.prepare(*method)?;
        let configured = with_client_auth(&prepared, client.clone());
        let mut request = configured
            .exchange_device_code()
            .add_scopes(scopes.iter().cloned().map(Scope::new));
        for (name, value) in prepared.extra_params() {
            request = request.add_extra_param(name, value);
        }
        match request.request_async(http).await {
            Ok(details) => {
                if i > 0 {
                    ctx.detected(*method);
                }
                found = Some((details, prepared));
                break;
            }
            Err(RequestTokenError::ServerResponse(r))
                if r.error().as_ref() == "invalid_client" && i + 1 < attempts.len() => {}
            Err(e) => return Err(token_error(e)),
        }
    }
    let Some((details, prepared)) = found else {
        return Err(LoginError::Usage(
            "no client authentication method to try".into(),
        ));
    };
    let details: CoreDeviceAuthorizationResponse = details;
    let client = with_client_auth(&prepared, client);
    // Each poll carries a fresh client assertion (a `jti` is single use).
    let fresh = FreshAssertions {
        http,
        auth: &ctx.auth,
        audience: &ctx.discovered.endpoints.token,
    };
    let extra = prepared.extra_params();
    ui.show_device_code(
        details.verification_uri().as_str(),
        details.user_code().secret(),
        details
            .verification_uri_complete()
            .map(|u| u.secret().as_str()),
    );
    let code_lifetime = details.expires_in();
    let wait = timeout.min(code_lifetime);
    let polled = tokio::time::timeout(
        wait,
        poll(&fresh, &client, &details, &extra, |d| tokio::time::sleep(d)),
    )
    .await;
    match polled {
        Ok(result) => result,
        Err(_) if wait < code_lifetime => Err(LoginError::TimedOut {
            after: timeout,
            what: "the device login was not approved",
        }),
        Err(_) => Err(LoginError::DeviceCodeExpired),
    }
}

/// Polls the token endpoint, sleeping with `sleep` (injected so tests can
/// record the intervals without waiting them out).
async fn poll<H, C, S, F>(
    http: &H,
    client: &LoginClient<EndpointNotSet, C>,
    details: &CoreDeviceAuthorizationResponse,
    extra: &[(&'static str, String)],
    sleep: S,
) -> Result<RawTokenResponse, LoginError>
where
    H: for<'c> AsyncHttpClient<'c, Error = HttpError>,
    C: EndpointState,
    S: Fn(Duration) -> F,
    F: Future<Output = ()>,
{
    // RFC 8628 §3.5: the client waits `interval` between requests; the
    // library's loop polls once at once, so wait the first interval here.
    sleep(details.interval()).await;
    let mut request = client.exchange_device_access_token(details);
    for (name, value) in extra {
        request = request.add_extra_param(*name, value.clone());
    }
    request
        .request_async(http, &sleep, None)
        .await
        .map_err(device_error)
}

/// The broker's HTTP client, replacing the `client_assertion` of every form
/// request with a fresh one: openidconnect's poller repeats one request, and
/// an assertion's `jti` may be used only once.
struct FreshAssertions<'a> {
    http: &'a Http,
    auth: &'a ClientAuth,
    audience: &'a str,
}

impl FreshAssertions<'_> {
    fn refresh_body(&self, body: &[u8]) -> Option<Vec<u8>> {
        let pairs: Vec<(String, String)> = url::form_urlencoded::parse(body).into_owned().collect();
        if !pairs
            .iter()
            .any(|(k, v)| k == "client_assertion_type" && v == ASSERTION_TYPE)
        {
            return None;
        }
        let key = match &self.auth.credential {
            kontext_broker_protocol::ClientCredential::PrivateKey(key) => key,
            _ => return None,
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let fresh = assertion(&self.auth.client_id, key, self.audience, now).ok()?;
        let mut out = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in &pairs {
            out.append_pair(
                k,
                if k == "client_assertion" {
                    fresh.expose()
                } else {
                    v
                },
            );
        }
        Some(out.finish().into_bytes())
    }
}

impl<'c> AsyncHttpClient<'c> for FreshAssertions<'_> {
    type Error = HttpError;
    type Future = Pin<
        Box<dyn Future<Output = Result<openidconnect::HttpResponse, HttpError>> + Send + Sync + 'c>,
    >;

    fn call(&'c self, mut request: openidconnect::HttpRequest) -> Self::Future {
        if let Some(body) = self.refresh_body(request.body()) {
            *request.body_mut() = body;
        }
        self.http.call(request)
    }
}

fn device_error<RE: std::error::Error + 'static>(
    e: RequestTokenError<RE, DeviceCodeErrorResponse>,
) -> LoginError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let description = r.error_description().map(|d| sanitize(d));
            match r.error() {
                DeviceCodeErrorResponseType::AccessDenied => LoginError::Denied {
                    error: "access_denied".into(),
                    description,
                },
                DeviceCodeErrorResponseType::ExpiredToken => LoginError::DeviceCodeExpired,
                other => {
                    let code = kontext_broker::idp::sanitize::code(
                        other.as_ref(),
                        &kontext_broker::idp::sanitize::Secrets::none(),
                    );
                    if code == "server_error" || code == "temporarily_unavailable" {
                        LoginError::IdpUnavailable(code)
                    } else if code == "invalid_scope" {
                        // The caller names the scopes.
                        LoginError::InvalidScope {
                            requested: String::new(),
                            description,
                        }
                    } else {
                        LoginError::Token(match description {
                            Some(d) => format!("{code}: {d}"),
                            None => code,
                        })
                    }
                }
            }
        }
        other => request_failure(other),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use openidconnect::{ClientId, IssuerUrl, OAuth2TokenResponse, TokenUrl};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A token endpoint answering each request with the next canned
    /// `(status, json)`; returns its URL and a count of requests served.
    async fn fake_token_endpoint(answers: Vec<(u16, &'static str)>) -> String {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        tokio::spawn(async move {
            for (status, body) in answers {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Head, then the form body by Content-Length.
                loop {
                    let n = s.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len || n == 0 {
                            break;
                        }
                    }
                }
                let reason = if status == 200 { "OK" } else { "Bad Request" };
                let response = format!(
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(response.as_bytes()).await.unwrap();
            }
        });
        url
    }

    fn details(interval: u64) -> CoreDeviceAuthorizationResponse {
        serde_json::from_value(serde_json::json!({
            "device_code": "dc",
            "user_code": "ABCD-EFGH",
            "verification_uri": "http://127.0.0.1:1/device",
            "expires_in": 600,
            "interval": interval,
        }))
        .unwrap()
    }

    async fn run(
        answers: Vec<(u16, &'static str)>,
        interval: u64,
    ) -> (Result<RawTokenResponse, LoginError>, Vec<u64>) {
        let token_url = fake_token_endpoint(answers).await;
        let http = Http::new(Duration::from_secs(5), Duration::from_secs(15), &[]).unwrap();
        let client = super::super::token::BareClient::new(
            ClientId::new("c".into()),
            IssuerUrl::new("http://127.0.0.1:1".into()).unwrap(),
            Default::default(),
        )
        .set_token_uri(TokenUrl::new(token_url).unwrap());
        let slept = Arc::new(Mutex::new(Vec::new()));
        let record = slept.clone();
        let result = poll(
            &http,
            &client,
            &details(interval),
            &[],
            move |d: Duration| {
                record.lock().unwrap().push(d.as_secs());
                std::future::ready(())
            },
        )
        .await;
        let slept = slept.lock().unwrap().clone();
        (result, slept)
    }

    const OK: &str =
        r#"{"access_token":"at","token_type":"Bearer","expires_in":60,"refresh_token":"rt"}"#;

    #[tokio::test]
    async fn honours_interval_and_slow_down_adds_five_seconds() {
        let (result, slept) = run(
            vec![
                (400, r#"{"error":"authorization_pending"}"#),
                (400, r#"{"error":"slow_down"}"#),
                (400, r#"{"error":"authorization_pending"}"#),
                (200, OK),
            ],
            2,
        )
        .await;
        let response = result.unwrap();
        assert_eq!(response.refresh_token().unwrap().secret(), "rt");
        assert_eq!(slept, [2, 2, 7, 7]);
    }

    #[tokio::test]
    async fn access_denied_and_expired_token_are_clear_errors() {
        let (result, _) = run(
            vec![
                (400, r#"{"error":"authorization_pending"}"#),
                (
                    400,
                    r#"{"error":"access_denied","error_description":"End-User aborted"}"#,
                ),
            ],
            1,
        )
        .await;
        let err = result.unwrap_err();
        assert!(matches!(err, LoginError::Denied { .. }), "{err:?}");
        assert!(err.to_string().contains("access_denied"), "{err}");

        let (result, _) = run(vec![(400, r#"{"error":"expired_token"}"#)], 1).await;
        assert!(matches!(result, Err(LoginError::DeviceCodeExpired)));

        let (result, _) = run(vec![(400, r#"{"error":"invalid_client"}"#)], 1).await;
        assert!(matches!(result, Err(LoginError::Token(ref d)) if d == "invalid_client"));
    }
}
