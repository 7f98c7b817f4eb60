//! Tests of the real `oidc-provider` fixture (tests/idp) and the devInteractions
//! form driver. Needs `node` and `npm ci --prefix tests/idp`.

use std::time::Duration;

use kontext_broker_tests::html_form::{approve_device_code, complete_login};
use kontext_broker_tests::oidc_provider::{
    http_client, OidcProvider, CONFIDENTIAL_CLIENT_ID, CONFIDENTIAL_CLIENT_SECRET, PUBLIC_CLIENT_ID,
};
use serde_json::Value;
use url::Url;

const SCOPES: &[&str] = &["openid", "offline_access"];

fn rt_of(v: &Value) -> String {
    v["refresh_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no refresh_token in {v}"))
        .to_owned()
}

fn at_of(v: &Value) -> String {
    v["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access_token in {v}"))
        .to_owned()
}

async fn token_call(idp: &OidcProvider, form: &[(&str, &str)]) -> (u16, Value) {
    let resp = http_client()
        .post(idp.token_endpoint())
        .form(form)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn refresh(idp: &OidcProvider, rt: &str) -> (u16, Value) {
    token_call(
        idp,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", PUBLIC_CLIENT_ID),
            ("refresh_token", rt),
        ],
    )
    .await
}

#[tokio::test]
async fn minted_tokens_work_at_userinfo_and_introspection() {
    let idp = OidcProvider::start(30).await;
    assert!(idp.issuer().starts_with("http://127.0.0.1:"));
    let grant = idp.mint(PUBLIC_CLIENT_ID, SCOPES).await;
    assert_eq!(grant["token_type"], "Bearer");
    assert_eq!(grant["expires_in"], 30);
    assert_eq!(grant["scope"], "openid offline_access");
    assert_eq!(idp.userinfo_status(&at_of(&grant)).await, 200);
    assert_eq!(idp.userinfo_status("not-a-token").await, 401);
    assert!(idp.introspect_active(&at_of(&grant)).await);
    assert!(idp.introspect_active(&rt_of(&grant)).await);
    assert!(!idp.introspect_active("not-a-token").await);
}

#[tokio::test]
async fn minted_id_token_names_the_subject() {
    use base64::Engine as _;

    let idp = OidcProvider::start(30).await;
    let grant = idp
        .mint_for(
            PUBLIC_CLIENT_ID,
            &["openid", "email", "offline_access"],
            "alice",
        )
        .await;
    let id_token = grant["id_token"].as_str().expect("id_token with openid");
    let payload = id_token.split('.').nth(1).expect("JWS compact form");
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["email"], "alice@example.test");
    assert_eq!(claims["iss"], idp.issuer());
    assert_eq!(claims["aud"], PUBLIC_CLIENT_ID);

    let without = idp.mint(PUBLIC_CLIENT_ID, &["offline_access"]).await;
    assert!(without.get("id_token").is_none(), "{without}");
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_grant() {
    let idp = OidcProvider::start(30).await;
    let rt0 = rt_of(&idp.mint(PUBLIC_CLIENT_ID, SCOPES).await);

    let (status, body) = refresh(&idp, &rt0).await;
    assert_eq!(status, 200, "{body}");
    let rt1 = rt_of(&body);
    assert_ne!(rt1, rt0, "rotated");
    assert_eq!(idp.userinfo_status(&at_of(&body)).await, 200);

    let (status, body) = refresh(&idp, &rt0).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let (status, body) = refresh(&idp, &rt1).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "reuse revoked the whole grant"
    );
}

#[tokio::test]
async fn confidential_client_refreshes_with_basic_auth_and_rotates() {
    let idp = OidcProvider::start(30).await;
    let rt0 = rt_of(&idp.mint(CONFIDENTIAL_CLIENT_ID, SCOPES).await);
    let resp = http_client()
        .post(idp.token_endpoint())
        .basic_auth(CONFIDENTIAL_CLIENT_ID, Some(CONFIDENTIAL_CLIENT_SECRET))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", rt0.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_ne!(
        rt_of(&body),
        rt0,
        "rotation is on for confidential clients too"
    );
}

#[tokio::test]
async fn restart_keeps_the_issuer_and_kills_refresh_tokens() {
    let mut idp = OidcProvider::start(30).await;
    let issuer = idp.issuer().to_owned();
    let grant = idp.mint(PUBLIC_CLIENT_ID, SCOPES).await;
    idp.restart().await;
    assert_eq!(idp.issuer(), issuer);
    let (status, body) = refresh(&idp, &rt_of(&grant)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert_eq!(idp.userinfo_status(&at_of(&grant)).await, 401);
    // The new process works.
    let fresh = idp.mint(PUBLIC_CLIENT_ID, SCOPES).await;
    assert_eq!(refresh(&idp, &rt_of(&fresh)).await.0, 200);
}

#[tokio::test]
async fn access_tokens_expire_without_clock_tolerance() {
    // oidc-provider counts whole seconds (exp = floor(now) + ttl), so a 2 s token
    // lives between 1 and 2 s: still valid right after minting.
    let idp = OidcProvider::start(2).await;
    let grant = idp.mint(PUBLIC_CLIENT_ID, SCOPES).await;
    assert_eq!(grant["expires_in"], 2);
    assert_eq!(idp.userinfo_status(&at_of(&grant)).await, 200);
    // Not a race: once 3 s have passed, a 2 s token is expired for certain. With
    // oidc-provider's default clockTolerance (15 s) it would still be accepted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(idp.userinfo_status(&at_of(&grant)).await, 401);
}

#[tokio::test]
async fn revocation_makes_tokens_inactive() {
    let idp = OidcProvider::start(30).await;
    let grant = idp.mint(PUBLIC_CLIENT_ID, SCOPES).await;
    let resp = http_client()
        .post(format!("{}/token/revocation", idp.issuer()))
        .form(&[
            ("client_id", PUBLIC_CLIENT_ID),
            ("token", rt_of(&grant).as_str()),
            ("token_type_hint", "refresh_token"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!idp.introspect_active(&rt_of(&grant)).await);
    assert!(!idp.introspect_active(&at_of(&grant)).await);
    assert_eq!(refresh(&idp, &rt_of(&grant)).await.0, 400);
}

#[tokio::test]
async fn dynamic_registration_is_open() {
    let idp = OidcProvider::start(30).await;
    let resp = http_client()
        .post(format!("{}/reg", idp.issuer()))
        .json(&serde_json::json!({
            "application_type": "native",
            "redirect_uris": ["http://127.0.0.1/callback"],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    assert!(body["client_id"].as_str().is_some_and(|c| !c.is_empty()));
}

#[tokio::test]
async fn device_flow_approved_by_the_form_driver_yields_a_refresh_token() {
    let idp = OidcProvider::start(30).await;
    let resp = http_client()
        .post(format!("{}/device/auth", idp.issuer()))
        .form(&[
            ("client_id", PUBLIC_CLIENT_ID),
            ("scope", "openid offline_access"),
            ("prompt", "consent"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let auth: Value = resp.json().await.unwrap();
    assert_eq!(
        auth["interval"], 1,
        "the fixture's middleware adds interval"
    );
    let device_code = auth["device_code"].as_str().unwrap();
    let user_code = auth["user_code"].as_str().unwrap();

    let form = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
        ("client_id", PUBLIC_CLIENT_ID),
        ("device_code", device_code),
    ];
    let (status, body) = token_call(&idp, &form).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("authorization_pending"))
    );

    approve_device_code(idp.issuer(), user_code)
        .await
        .expect("device approval");

    let (status, body) = token_call(&idp, &form).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id_token"].is_string());
    assert!(body["scope"].as_str().unwrap().contains("offline_access"));
    let rt = rt_of(&body);
    assert_eq!(idp.userinfo_status(&at_of(&body)).await, 200);
    assert_eq!(refresh(&idp, &rt).await.0, 200);
}

#[tokio::test]
async fn device_approval_with_a_wrong_code_fails() {
    let idp = OidcProvider::start(30).await;
    let err = approve_device_code(idp.issuer(), "BCDF-GHJK")
        .await
        .expect_err("unknown user code");
    assert!(format!("{err:#}").contains("incorrect"), "{err:#}");
}

#[tokio::test]
async fn complete_login_returns_the_callback_with_code_and_state() {
    use openidconnect::PkceCodeChallenge;

    let idp = OidcProvider::start(30).await;
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    // Any loopback port works for a native client registered with :8765.
    let redirect_uri = "http://127.0.0.1:49152/callback";
    let state = "state-4f1c9a";
    let mut auth = Url::parse(&format!("{}/auth", idp.issuer())).unwrap();
    auth.query_pairs_mut()
        .append_pair("client_id", PUBLIC_CLIENT_ID)
        .append_pair("response_type", "code")
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("scope", "openid offline_access")
        .append_pair("prompt", "consent")
        .append_pair("state", state)
        .append_pair("nonce", "nonce-77")
        .append_pair("code_challenge", challenge.as_str())
        .append_pair("code_challenge_method", "S256");

    let callback = complete_login(auth.as_str()).await.expect("login");
    assert_eq!(
        (callback.host_str(), callback.port(), callback.path()),
        (Some("127.0.0.1"), Some(49152), "/callback")
    );
    let params: std::collections::HashMap<String, String> =
        callback.query_pairs().into_owned().collect();
    assert_eq!(params.get("state").map(String::as_str), Some(state));
    assert_eq!(params.get("iss").map(String::as_str), Some(idp.issuer()));
    let code = params.get("code").expect("code in callback");

    let (status, body) = token_call(
        &idp,
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
    assert!(body["id_token"].is_string());
    rt_of(&body);
}

#[tokio::test]
async fn dropping_the_launcher_kills_the_provider() {
    let idp = OidcProvider::start(30).await;
    let issuer = idp.issuer().to_owned();
    drop(idp);
    // SIGKILL is sent on drop; wait for the port to stop answering.
    let gone = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match http_client()
                .get(format!("{issuer}/.well-known/openid-configuration"))
                .send()
                .await
            {
                Err(e) if e.is_connect() => return,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert!(gone.is_ok(), "provider still answers after drop");
}

#[tokio::test]
async fn a_replayed_refresh_token_is_counted() {
    let idp = OidcProvider::start(30).await;
    let grant = idp.mint(PUBLIC_CLIENT_ID, SCOPES).await;
    let rt0 = rt_of(&grant);
    let (status, body) = refresh(&idp, &rt0).await;
    assert_eq!(status, 200, "{body}");
    let stats = kontext_broker_tests::backend::provider_stats(idp.issuer()).await;
    assert_eq!(stats.refresh_token_replays, 0, "{stats:?}");
    assert_eq!(refresh(&idp, &rt0).await.0, 400);
    let stats = kontext_broker_tests::backend::provider_stats(idp.issuer()).await;
    assert_eq!(
        (stats.refresh_token_grants, stats.refresh_token_replays),
        (2, 1),
        "{stats:?}"
    );
}
