//! The HTTP client used for every IdP call.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use crate::{Error, Result};

/// Largest IdP response body read, in bytes. Discovery documents and token
/// responses are a few KiB; anything bigger is an IdP misbehaving.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// A reqwest client over rustls: no redirects (openidconnect asks for this, to
/// avoid SSRF), a connect timeout, a total timeout, and capped response bodies.
#[derive(Clone, Debug)]
pub struct Http {
    client: reqwest::Client,
}

/// Why an HTTP exchange failed. Never holds a request or response body.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Transport(String),
    #[error("response larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
}

impl Http {
    /// A client with the given timeouts, trusting the webpki roots plus `extra_roots` (PEM files).
    pub fn new(connect: Duration, total: Duration, extra_roots: &[PathBuf]) -> Result<Http> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect)
            .timeout(total)
            .user_agent(concat!("kontext-broker/", env!("CARGO_PKG_VERSION")));
        for path in extra_roots {
            let pem = std::fs::read(path)
                .map_err(|e| Error::io(format!("reading CA certificate {}", path.display()), e))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::Invalid(format!(
                    "CA certificate {} is not valid PEM: {e}",
                    path.display()
                ))
            })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|e| Error::Invalid(format!("cannot build the HTTP client: {e}")))?;
        Ok(Http { client })
    }

    /// GETs `url` and returns status, headers and a capped body.
    pub async fn get(
        &self,
        url: &str,
    ) -> std::result::Result<::http::Response<Vec<u8>>, HttpError> {
        let request = self
            .client
            .get(url)
            .header("accept", "application/json")
            .build()
            .map_err(transport)?;
        self.execute(request).await
    }

    /// POSTs a form; with `basic`, authenticates as RFC 6749 §2.3.1 client_secret_basic.
    /// Returns the status code and the OAuth `error` code of an error body, if any;
    /// the rest of the body (which may echo a token) is discarded.
    pub async fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        basic: Option<(&str, &str)>,
    ) -> std::result::Result<(u16, Option<String>), HttpError> {
        let mut request = self.client.post(url).form(form);
        if let Some((id, secret)) = basic {
            // RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
            let enc =
                |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            request = request.basic_auth(enc(id), Some(enc(secret)));
        }
        let response = self.execute(request.build().map_err(transport)?).await?;
        let status = response.status().as_u16();
        let code = (status >= 400)
            .then(|| oauth_error_code(response.body()))
            .flatten();
        Ok((status, code))
    }

    async fn execute(
        &self,
        request: reqwest::Request,
    ) -> std::result::Result<::http::Response<Vec<u8>>, HttpError> {
        let mut response = self.client.execute(request).await.map_err(transport)?;
        if response
            .content_length()
            .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
        {
            return Err(HttpError::TooLarge);
        }
        let mut builder = ::http::Response::builder().status(response.status());
        for (name, value) in response.headers() {
            builder = builder.header(name, value);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(HttpError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        builder
            .body(body)
            .map_err(|e| HttpError::Transport(e.to_string()))
    }
}

/// The `error` member of a JSON error body, if it is a plain OAuth error code.
pub(crate) fn oauth_error_code(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = value.get("error")?.as_str()?;
    (!code.is_empty()
        && code.len() <= 64
        && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    .then(|| code.to_owned())
}

fn transport(e: reqwest::Error) -> HttpError {
    // reqwest's Display names the URL but never a body, so it is safe to keep.
    HttpError::Transport(error_chain(&e))
}

/// An error and all its sources, joined with ": " (the causes say what really failed).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl<'c> openidconnect::AsyncHttpClient<'c> for Http {
    type Error = HttpError;
    type Future = Pin<
        Box<
            dyn Future<Output = std::result::Result<openidconnect::HttpResponse, HttpError>>
                + Send
                + Sync
                + 'c,
        >,
    >;

    fn call(&'c self, request: openidconnect::HttpRequest) -> Self::Future {
        Box::pin(async move {
            let request = reqwest::Request::try_from(request).map_err(transport)?;
            self.execute(request).await
        })
    }
}
