//! Tests of the django-oauth-toolkit fixture (tests/dot): its Hydra-like
//! behaviour, its counters, its discovery documents, and driving its login,
//! consent and device pages without a browser. They pin the quirks listed in
//! tests/idp/README.md. Needs `python3` (the venv is created on first use).

use std::collections::HashMap;

use kontext_broker_tests::dot::{
    approve_device, complete_login, DotServer, CONFIDENTIAL_CLIENT_ID, CONFIDENTIAL_CLIENT_SECRET,
    DEFAULT_SCOPES, DEVICE_CLIENT_ID, PUBLIC_CLIENT_ID,
};
use kontext_broker_tests::oidc_provider::http_client;
use serde_json::Value;
use url::Url;

const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

fn field(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {v}"))
        .to_owned()
}

async fn token_call(dot: &DotServer, form: &[(&str, &str)]) -> (u16, Value) {
    let resp = http_client()
        .post(dot.token_endpoint())
        .form(form)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn refresh(dot: &DotServer, rt: &str) -> (u16, Value) {
    token_call(
        dot,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", PUBLIC_CLIENT_ID),
            ("refresh_token", rt),
        ],
    )
    .await
}

async fn get_json(url: &str) -> Value {
    let resp = http_client().get(url).send().await.unwrap();
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    resp.json().await.unwrap()
}

#[tokio::test]
async fn rotation_deletes_the_old_access_token_and_a_replay_kills_the_family() {
    let Some(dot) = DotServer::start(30).await else {
        return;
    };
    let minted = dot.mint(PUBLIC_CLIENT_ID, DEFAULT_SCOPES).await;
    assert_eq!(minted["expires_in"], 30);
    let (rt0, at0) = (
        field(&minted, "refresh_token"),
        field(&minted, "access_token"),
    );
    assert!(dot.token_active(&rt0).await && dot.token_active(&at0).await);

    let (status, first) = refresh(&dot, &rt0).await;
    assert_eq!(status, 200, "{first}");
    let rt1 = field(&first, "refresh_token");
    assert_ne!(rt1, rt0, "every refresh rotates");
    // Like Hydra: the previous access token is gone at once, not at its expiry.
    assert!(!dot.token_active(&at0).await);
    assert!(!dot.token_active(&rt0).await);
    assert!(dot.token_active(&field(&first, "access_token")).await);

    // Reusing the rotated token (grace 0) fails and revokes the newest one too.
    let (status, body) = refresh(&dot, &rt0).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(!dot.token_active(&rt1).await, "reuse revokes the family");
    assert_eq!(refresh(&dot, &rt1).await.0, 400);

    let stats = dot.stats().await;
    assert_eq!(stats.refresh_token_grants, 3, "{stats:?}");
    assert_eq!(stats.refresh_token_grant_errors, 2, "{stats:?}");
    assert_eq!(stats.refresh_token_replays, 2, "{stats:?}");
    assert_eq!(stats.access_tokens_deleted_on_rotation, 1, "{stats:?}");
}

#[tokio::test]
async fn the_revocation_endpoint_is_only_in_the_rfc8414_document() {
    let Some(dot) = DotServer::start(30).await else {
        return;
    };
    let oidc = get_json(&format!(
        "{}/.well-known/openid-configuration",
        dot.issuer()
    ))
    .await;
    // RFC 8414 path insertion: issuer http://host/o → /.well-known/oauth-authorization-server/o
    let rfc8414 = get_json(&format!(
        "{}/.well-known/oauth-authorization-server/o",
        dot.base_url()
    ))
    .await;
    assert_eq!(oidc["issuer"], dot.issuer());
    assert_eq!(rfc8414["issuer"], dot.issuer());
    assert!(oidc.get("revocation_endpoint").is_none(), "{oidc}");
    assert_eq!(rfc8414["revocation_endpoint"], dot.revocation_endpoint());
    // Neither lists the device authorization endpoint, though the grant works.
    assert!(oidc.get("device_authorization_endpoint").is_none());
    assert!(rfc8414.get("device_authorization_endpoint").is_none());
    // No offline_access: DOT answers invalid_scope for it.
    let scopes = oidc["scopes_supported"].as_array().unwrap();
    assert!(!scopes.iter().any(|s| s == "offline_access"), "{oidc}");
    assert!(scopes.iter().any(|s| s == "openid"), "{oidc}");
}

#[tokio::test]
async fn the_confidential_client_refreshes_with_its_awkward_secret_in_basic_auth() {
    let Some(dot) = DotServer::start(30).await else {
        return;
    };
    let minted = dot.mint(CONFIDENTIAL_CLIENT_ID, DEFAULT_SCOPES).await;
    let rt = field(&minted, "refresh_token");
    // RFC 6749 §2.3.1: form-encode both parts, then Basic.
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let send = |secret: String| {
        http_client()
            .post(dot.token_endpoint())
            .basic_auth(enc(CONFIDENTIAL_CLIENT_ID), Some(secret))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", &rt)])
            .send()
    };
    let wrong = send(enc("not-the-secret")).await.unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let right = send(enc(CONFIDENTIAL_CLIENT_SECRET)).await.unwrap();
    assert_eq!(right.status().as_u16(), 200);
}

#[tokio::test]
async fn the_form_driver_logs_in_and_consents_on_dot_pages() {
    use openidconnect::PkceCodeChallenge;

    let Some(dot) = DotServer::start(30).await else {
        return;
    };
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    // Registered as http://127.0.0.1/callback; any loopback port works.
    let redirect_uri = "http://127.0.0.1:49153/callback";
    let mut auth = Url::parse(&format!("{}/authorize/", dot.issuer())).unwrap();
    auth.query_pairs_mut()
        .append_pair("client_id", PUBLIC_CLIENT_ID)
        .append_pair("response_type", "code")
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("scope", "openid")
        .append_pair("state", "state-dot")
        .append_pair("nonce", "nonce-dot")
        .append_pair("code_challenge", challenge.as_str())
        .append_pair("code_challenge_method", "S256");

    let callback = complete_login(auth.as_str()).await.expect("login");
    assert_eq!(
        (callback.port(), callback.path()),
        (Some(49153), "/callback")
    );
    let params: HashMap<String, String> = callback.query_pairs().into_owned().collect();
    assert_eq!(params.get("state").map(String::as_str), Some("state-dot"));
    let code = params.get("code").unwrap_or_else(|| panic!("{params:?}"));
    let (status, body) = token_call(
        &dot,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", PUBLIC_CLIENT_ID),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", verifier.secret()),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id_token"].is_string(), "{body}");
    // A refresh token without offline_access.
    assert!(dot.token_active(&field(&body, "refresh_token")).await);

    // offline_access is refused with invalid_scope, on the redirect.
    auth.query_pairs_mut()
        .clear()
        .append_pair("client_id", PUBLIC_CLIENT_ID)
        .append_pair("response_type", "code")
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("scope", "openid offline_access")
        .append_pair("state", "state-dot")
        .append_pair("code_challenge", challenge.as_str())
        .append_pair("code_challenge_method", "S256");
    let refused = complete_login(auth.as_str()).await.expect("error redirect");
    assert!(
        refused
            .query_pairs()
            .any(|(k, v)| k == "error" && v == "invalid_scope"),
        "{refused}"
    );
}

#[tokio::test]
async fn the_form_driver_approves_a_device_code() {
    let Some(dot) = DotServer::start(30).await else {
        return;
    };
    let resp = http_client()
        .post(dot.device_authorization_endpoint())
        .form(&[("client_id", DEVICE_CLIENT_ID)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let auth: Value = resp.json().await.unwrap();
    assert_eq!(auth["interval"], 1);
    let device_code = field(&auth, "device_code");
    let form = [
        ("grant_type", DEVICE_GRANT),
        ("client_id", DEVICE_CLIENT_ID),
        ("device_code", device_code.as_str()),
    ];
    let (status, body) = token_call(&dot, &form).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("authorization_pending"))
    );

    let complete = Url::parse(&field(&auth, "verification_uri_complete")).unwrap();
    approve_device(&complete, &field(&auth, "user_code"))
        .await
        .expect("device approval");
    let (status, body) = token_call(&dot, &form).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scope"], "read write", "DOT's default scopes");
    let rt = field(&body, "refresh_token");
    let (status, _) = token_call(
        &dot,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", DEVICE_CLIENT_ID),
            ("refresh_token", &rt),
        ],
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_admin_revocation_kills_every_token_of_the_user_and_client() {
    let Some(dot) = DotServer::start(30).await else {
        return;
    };
    let a = dot.mint(PUBLIC_CLIENT_ID, DEFAULT_SCOPES).await;
    let other = dot.mint(DEVICE_CLIENT_ID, DEFAULT_SCOPES).await;
    assert_eq!(dot.revoke_grant(PUBLIC_CLIENT_ID).await, 1);
    assert!(!dot.token_active(&field(&a, "access_token")).await);
    assert!(!dot.token_active(&field(&a, "refresh_token")).await);
    assert_eq!(refresh(&dot, &field(&a, "refresh_token")).await.0, 400);
    // Another client's grant is untouched; a deleted token is no replay.
    assert!(dot.token_active(&field(&other, "refresh_token")).await);
    assert_eq!(dot.stats().await.refresh_token_replays, 0);
}
