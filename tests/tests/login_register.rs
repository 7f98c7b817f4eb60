//! `--register` (RFC 7591, contract §6) against the real `oidc-provider`: the
//! registered client has the refresh grant, logs in, and its refresh token
//! works. Needs `node` and `npm ci --prefix tests/idp`.

use std::time::Duration;

use kontext_broker::idp::{discover, Http, TokenResponse};
use kontext_broker_ctl::login::{
    login, register_client, Flow, LoginOptions, LoginUi, DEVICE_CODE_GRANT,
};
use kontext_broker_tests::html_form::{approve_device_code, complete_login};
use kontext_broker_tests::oidc_provider::{http_client, OidcProvider, PUBLIC_CLIENT_ID};
use serde_json::Value;
use tokio::sync::mpsc;

const PATIENCE: Duration = Duration::from_secs(30);

fn http() -> Http {
    Http::new(Duration::from_secs(5), Duration::from_secs(15), &[]).unwrap()
}

enum Shown {
    Url(String),
    UserCode(String),
}

struct CaptureUi(mpsc::UnboundedSender<Shown>);

impl LoginUi for CaptureUi {
    fn show_url(&mut self, url: &str) {
        let _ = self.0.send(Shown::Url(url.to_owned()));
    }
    fn show_device_code(&mut self, _: &str, user_code: &str, _: Option<&str>) {
        let _ = self.0.send(Shown::UserCode(user_code.to_owned()));
    }
}

/// Refreshes with a public client straight at the token endpoint.
async fn refresh(idp: &OidcProvider, client_id: &str, refresh_token: &str) -> (u16, Value) {
    let resp = http_client()
        .post(idp.token_endpoint())
        .form(&[
            ("grant_type", "refresh_token"),
            ("client_id", client_id),
            ("refresh_token", refresh_token),
        ])
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn registered_client_has_the_refresh_grant() {
    let idp = OidcProvider::start(60).await;
    let endpoints = discover(&http(), idp.issuer()).await.unwrap();
    let endpoint = endpoints.registration.expect("registration_endpoint");

    let code_only = register_client(&http(), &endpoint, false).await.unwrap();
    assert!(!code_only.client_id.is_empty());
    assert_ne!(code_only.client_id, PUBLIC_CLIENT_ID);
    assert!(
        code_only.client_secret.is_none(),
        "public client: no secret"
    );
    for g in ["authorization_code", "refresh_token"] {
        assert!(
            code_only.grant_types.iter().any(|x| x == g),
            "{:?}",
            code_only.grant_types
        );
    }
    assert!(!code_only.grant_types.iter().any(|x| x == DEVICE_CODE_GRANT));

    let with_device = register_client(&http(), &endpoint, true).await.unwrap();
    assert!(with_device
        .grant_types
        .iter()
        .any(|x| x == DEVICE_CODE_GRANT));
    assert_ne!(with_device.client_id, code_only.client_id);
}

#[tokio::test]
async fn register_then_code_login_then_refresh_works() {
    let idp = OidcProvider::start(60).await;
    let opts = LoginOptions {
        register: true,
        flow: Flow::CodePkce {
            open_browser: false,
        },
        timeout: Duration::from_secs(60),
        ..LoginOptions::new(idp.issuer())
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move { login(&http(), opts, &mut CaptureUi(tx)).await });
    let Some(Shown::Url(url)) = tokio::time::timeout(PATIENCE, rx.recv()).await.unwrap() else {
        panic!("expected an authorization URL");
    };
    // The registered redirect has no port; the provider accepts ours anyway.
    let callback = complete_login(&url).await.unwrap();
    assert_eq!(
        http_client().get(callback).send().await.unwrap().status(),
        200
    );
    let outcome = tokio::time::timeout(PATIENCE, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_ne!(outcome.client_id, PUBLIC_CLIENT_ID);
    assert!(
        outcome.scopes.iter().any(|s| s == "openid"),
        "default scopes"
    );

    let response = TokenResponse::parse(outcome.token_response.expose()).unwrap();
    let rt = response.refresh_token.expect("refresh token");
    let (status, body) = refresh(&idp, &outcome.client_id, rt.expose()).await;
    assert_eq!(status, 200, "{}", body["error"]);
    let access = body["access_token"].as_str().unwrap();
    assert_eq!(idp.userinfo_status(access).await, 200);
}

#[tokio::test]
async fn register_then_device_login_works() {
    let idp = OidcProvider::start(60).await;
    let opts = LoginOptions {
        register: true,
        flow: Flow::Device,
        timeout: Duration::from_secs(60),
        ..LoginOptions::new(idp.issuer())
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move { login(&http(), opts, &mut CaptureUi(tx)).await });
    let Some(Shown::UserCode(code)) = tokio::time::timeout(PATIENCE, rx.recv()).await.unwrap()
    else {
        panic!("expected a user code");
    };
    approve_device_code(idp.issuer(), &code).await.unwrap();
    let outcome = tokio::time::timeout(PATIENCE, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let response = TokenResponse::parse(outcome.token_response.expose()).unwrap();
    let rt = response.refresh_token.expect("refresh token");
    let (status, _) = refresh(&idp, &outcome.client_id, rt.expose()).await;
    assert_eq!(status, 200);
}
