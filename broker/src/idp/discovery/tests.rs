//! Discovery against a local HTTP server serving chosen documents.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

use super::*;

/// A server answering each path with a fixed (status, JSON body); 404 otherwise.
struct DocServer {
    base: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DocServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Docs = Arc<HashMap<String, (u16, Value)>>;

async fn answer(State(docs): State<Docs>, req: Request) -> axum::response::Response {
    match docs.get(req.uri().path()) {
        Some((status, body)) => {
            (StatusCode::from_u16(*status).unwrap(), Json(body.clone())).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Starts a server; `docs` maps a path to what it answers, and `{base}` in
/// any string of a body is replaced by the server's `http://127.0.0.1:PORT`.
async fn serve(docs: &[(&str, u16, Value)]) -> DocServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let docs: Docs = Arc::new(
        docs.iter()
            .map(|(path, status, body)| {
                let body =
                    serde_json::from_str(&body.to_string().replace("{base}", &base)).unwrap();
                ((*path).to_owned(), (*status, body))
            })
            .collect(),
    );
    let app = axum::Router::new().fallback(answer).with_state(docs);
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    DocServer { base, task }
}

fn http() -> Http {
    Http::new(Duration::from_secs(5), Duration::from_secs(15), &[]).unwrap()
}

/// An OIDC document like django-oauth-toolkit's: no revocation endpoint.
fn oidc_doc(issuer: &str) -> Value {
    json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize/"),
        "token_endpoint": format!("{issuer}/token/"),
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        "scopes_supported": ["openid", "read", "write"],
        "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
    })
}

/// An RFC 8414 document like django-oauth-toolkit's: with revocation and introspection.
fn rfc8414_doc(issuer: &str) -> Value {
    json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize/"),
        "token_endpoint": format!("{issuer}/rfc-token/"),
        "revocation_endpoint": format!("{issuer}/revoke_token/"),
        "introspection_endpoint": format!("{issuer}/introspect/"),
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic"],
        "scopes_supported": ["read", "write"],
    })
}

#[test]
fn well_known_locations() {
    let [oidc, rfc] = candidates(&Url::parse("https://idp.example").unwrap());
    assert_eq!(
        oidc.as_str(),
        "https://idp.example/.well-known/openid-configuration"
    );
    assert_eq!(
        rfc.as_str(),
        "https://idp.example/.well-known/oauth-authorization-server"
    );
    let [oidc, rfc] = candidates(&Url::parse("https://idp.example/tenant/a/").unwrap());
    assert_eq!(
        oidc.as_str(),
        "https://idp.example/tenant/a/.well-known/openid-configuration"
    );
    assert_eq!(
        rfc.as_str(),
        "https://idp.example/.well-known/oauth-authorization-server/tenant/a"
    );
}

#[tokio::test]
async fn only_the_oidc_document() {
    let server = serve(&[(
        "/o/.well-known/openid-configuration",
        200,
        oidc_doc("{base}/o"),
    )])
    .await;
    let issuer = format!("{}/o", server.base);
    let e = discover(&http(), &issuer).await.unwrap();
    assert_eq!(e.token, format!("{issuer}/token/"));
    assert_eq!(e.authorization, Some(format!("{issuer}/authorize/")));
    assert_eq!(e.revocation, None);
    let m = discover_metadata(&http(), &issuer).await.unwrap();
    assert_eq!(m.scopes_supported.unwrap(), ["openid", "read", "write"]);
}

#[tokio::test]
async fn only_the_rfc8414_document_at_the_path_inserted_location() {
    let server = serve(&[(
        "/.well-known/oauth-authorization-server/o",
        200,
        rfc8414_doc("{base}/o"),
    )])
    .await;
    let issuer = format!("{}/o", server.base);
    let e = discover(&http(), &issuer).await.unwrap();
    assert_eq!(e.token, format!("{issuer}/rfc-token/"));
    assert_eq!(e.revocation, Some(format!("{issuer}/revoke_token/")));
    assert_eq!(e.jwks_uri, None);
}

#[tokio::test]
async fn both_documents_merge_and_the_revocation_endpoint_comes_from_rfc8414() {
    let server = serve(&[
        (
            "/o/.well-known/openid-configuration",
            200,
            oidc_doc("{base}/o"),
        ),
        (
            "/.well-known/oauth-authorization-server/o",
            200,
            rfc8414_doc("{base}/o"),
        ),
    ])
    .await;
    let issuer = format!("{}/o", server.base);
    let m = discover_metadata(&http(), &issuer).await.unwrap();
    // The OIDC document wins where both speak...
    assert_eq!(m.token_endpoint, Some(format!("{issuer}/token/")));
    assert_eq!(
        m.scopes_supported.as_deref().unwrap(),
        ["openid", "read", "write"]
    );
    assert_eq!(
        m.token_endpoint_auth_methods_supported.as_deref().unwrap(),
        ["client_secret_post", "client_secret_basic"]
    );
    // ...and the RFC 8414 one fills what it lacks.
    assert_eq!(
        m.revocation_endpoint,
        Some(format!("{issuer}/revoke_token/"))
    );
    assert_eq!(
        m.introspection_endpoint,
        Some(format!("{issuer}/introspect/"))
    );
    assert_eq!(
        m.revocation_endpoint_auth_methods_supported
            .as_deref()
            .unwrap(),
        ["client_secret_basic"]
    );
    let e = discover(&http(), &issuer).await.unwrap();
    assert_eq!(e.token, format!("{issuer}/token/"));
    assert_eq!(e.revocation, Some(format!("{issuer}/revoke_token/")));
    assert_eq!(e.jwks_uri, Some(format!("{issuer}/.well-known/jwks.json")));
}

#[tokio::test]
async fn a_second_document_naming_another_issuer_is_ignored() {
    let server = serve(&[
        (
            "/o/.well-known/openid-configuration",
            200,
            oidc_doc("{base}/o"),
        ),
        (
            "/.well-known/oauth-authorization-server/o",
            200,
            rfc8414_doc("https://evil.example/o"),
        ),
    ])
    .await;
    let issuer = format!("{}/o", server.base);
    let m = discover_metadata(&http(), &issuer).await.unwrap();
    assert_eq!(m.token_endpoint, Some(format!("{issuer}/token/")));
    assert_eq!(m.revocation_endpoint, None, "nothing taken from it");
    assert_eq!(m.introspection_endpoint, None);
    assert_eq!(m.revocation_endpoint_auth_methods_supported, None);
}

#[tokio::test]
async fn a_second_document_with_a_plain_http_endpoint_is_ignored() {
    let mut bad = rfc8414_doc("{base}");
    bad["revocation_endpoint"] = json!("http://idp.example/revoke");
    let server = serve(&[
        ("/.well-known/openid-configuration", 200, oidc_doc("{base}")),
        ("/.well-known/oauth-authorization-server", 200, bad),
    ])
    .await;
    let m = discover_metadata(&http(), &server.base).await.unwrap();
    assert_eq!(m.revocation_endpoint, None);
}

#[tokio::test]
async fn refused_missing_and_failing_documents() {
    // Every document names another issuer: refused, not merely absent.
    let server = serve(&[
        (
            "/.well-known/openid-configuration",
            200,
            oidc_doc("https://evil.example"),
        ),
        (
            "/.well-known/oauth-authorization-server",
            200,
            rfc8414_doc("https://evil.example"),
        ),
    ])
    .await;
    let e = discover(&http(), &server.base).await.unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(d) if d.contains("evil.example")),
        "{e}"
    );

    // Nothing there: a clear, permanent error.
    let server = serve(&[]).await;
    let e = discover(&http(), &server.base).await.unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(d) if d.contains("HTTP 404")),
        "{e}"
    );

    // Both answer 500: try again later.
    let server = serve(&[
        ("/.well-known/openid-configuration", 500, json!({})),
        ("/.well-known/oauth-authorization-server", 500, json!({})),
    ])
    .await;
    let e = discover(&http(), &server.base).await.unwrap_err();
    assert!(matches!(e, Error::IdpTransient(_)), "{e}");

    // One answers 500, the other loads: that one is used.
    let server = serve(&[
        ("/.well-known/openid-configuration", 500, json!({})),
        (
            "/.well-known/oauth-authorization-server",
            200,
            rfc8414_doc("{base}"),
        ),
    ])
    .await;
    let e = discover(&http(), &server.base).await.unwrap();
    assert_eq!(e.revocation, Some(format!("{}/revoke_token/", server.base)));
}

#[tokio::test]
async fn overrides_win_and_stand_in_for_missing_metadata() {
    let server = serve(&[("/.well-known/openid-configuration", 200, oidc_doc("{base}"))]).await;
    let overrides = EndpointOverrides {
        token: None,
        revocation: Some("https://idp.example/revoke".into()),
        device_authorization: Some("http://127.0.0.1:1/device".into()),
    };
    let e = discover_with(&http(), &server.base, &overrides)
        .await
        .unwrap();
    assert_eq!(e.token, format!("{}/token/", server.base));
    assert_eq!(e.revocation.as_deref(), Some("https://idp.example/revoke"));
    assert_eq!(
        e.device_authorization.as_deref(),
        Some("http://127.0.0.1:1/device")
    );

    // No metadata at all: the overrides alone will do if they name a token endpoint.
    let empty = serve(&[]).await;
    let token_only = EndpointOverrides {
        token: Some(format!("{}/token", empty.base)),
        ..Default::default()
    };
    let e = discover_with(&http(), &empty.base, &token_only)
        .await
        .unwrap();
    assert_eq!(e.token, format!("{}/token", empty.base));
    assert!(
        discover_with(&http(), &empty.base, &EndpointOverrides::default())
            .await
            .is_err()
    );

    // Overrides obey the issuer rule: https, or http on loopback only.
    let downgrade = EndpointOverrides {
        revocation: Some("http://idp.example/revoke".into()),
        ..Default::default()
    };
    let e = discover_with(&http(), &server.base, &downgrade)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("plain http"), "{e}");
}

#[test]
fn no_token_endpoint_names_the_fix() {
    let e = Metadata::default()
        .endpoints("https://a.example", &EndpointOverrides::default())
        .unwrap_err();
    assert!(e.to_string().contains("--token-endpoint"), "{e}");
}

#[test]
fn issuer_mismatch_and_downgrades_are_refused() {
    let doc = |issuer: &str, token: &str| Metadata {
        issuer: issuer.into(),
        token_endpoint: Some(token.into()),
        ..Default::default()
    };
    assert!(checked(
        "https://a.example",
        doc("https://a.example/", "https://a.example/t")
    )
    .is_ok());
    assert!(checked(
        "https://a.example",
        doc("https://evil.example", "https://a.example/t")
    )
    .is_err());
    assert!(checked(
        "https://a.example",
        doc("https://a.example", "http://a.example/t")
    )
    .is_err());
}

#[test]
fn auth_method_lists_reach_the_stored_endpoints() {
    let meta = Metadata {
        issuer: "https://a.example".into(),
        token_endpoint: Some("https://a.example/t".into()),
        token_endpoint_auth_methods_supported: Some(vec![
            "client_secret_post".into(),
            "x".repeat(100),
        ]),
        ..Metadata::default()
    };
    let e = meta
        .endpoints("https://a.example", &EndpointOverrides::default())
        .unwrap();
    assert_eq!(
        e.token_auth_methods.as_deref(),
        Some(&["client_secret_post".to_owned()][..])
    );
    assert_eq!(e.revocation_auth_methods, None);
}
