//! The authorization code + PKCE login (contract §6) against the real
//! `oidc-provider`, driven without a browser: the test plays the user with
//! `html_form::complete_login` and delivers the redirect to the loopback
//! listener with a plain HTTP GET. Needs `node` and `npm ci --prefix tests/idp`.

use std::time::{Duration, Instant};

use kontext_broker::idp::{Http, TokenResponse};
use kontext_broker_ctl::login::{login, Flow, LoginError, LoginOptions, LoginOutcome, LoginUi};
use kontext_broker_protocol::Secret;
use kontext_broker_tests::html_form::complete_login;
use kontext_broker_tests::oidc_provider::{
    http_client, OidcProvider, CONFIDENTIAL_CLIENT_ID, CONFIDENTIAL_CLIENT_SECRET, PUBLIC_CLIENT_ID,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use url::Url;

/// Safety net for waiting on real events; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(30);

/// A `LoginUi` that hands every shown URL to the test.
struct CaptureUi(mpsc::UnboundedSender<String>);

impl LoginUi for CaptureUi {
    fn show_url(&mut self, url: &str) {
        let _ = self.0.send(url.to_owned());
    }
    fn show_device_code(&mut self, _: &str, _: &str, _: Option<&str>) {
        panic!("the code flow showed a device code");
    }
}

fn http() -> Http {
    Http::new(Duration::from_secs(5), Duration::from_secs(15), &[]).unwrap()
}

fn options(idp: &OidcProvider, client_id: &str) -> LoginOptions {
    LoginOptions {
        client_id: Some(client_id.to_owned()),
        scopes: vec!["openid".into(), "email".into()],
        flow: Flow::CodePkce {
            open_browser: false,
        },
        timeout: Duration::from_secs(60),
        ..LoginOptions::new(idp.issuer())
    }
}

/// Starts `login` in a task; returns the task and the authorization URL it shows.
async fn start(opts: LoginOptions) -> (JoinHandle<Result<LoginOutcome, LoginError>>, Url) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut ui = CaptureUi(tx);
        login(&http(), opts, &mut ui).await
    });
    let url = tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("the login showed no URL")
        .expect("the login ended without showing a URL");
    (task, Url::parse(&url).unwrap())
}

fn param(url: &Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn listener_port(auth_url: &Url) -> u16 {
    let redirect = Url::parse(&param(auth_url, "redirect_uri").expect("redirect_uri")).unwrap();
    assert_eq!(redirect.host_str(), Some("127.0.0.1"));
    assert_eq!(redirect.path(), "/callback");
    redirect.port().expect("explicit port")
}

async fn finish(
    task: JoinHandle<Result<LoginOutcome, LoginError>>,
) -> Result<LoginOutcome, LoginError> {
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("login did not finish")
        .expect("login task panicked")
}

/// True when nothing listens on the port any more.
async fn port_closed(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
}

#[tokio::test]
async fn code_flow_end_to_end_yields_working_tokens_with_refresh_token() {
    let idp = OidcProvider::start(60).await;
    let started = Instant::now();
    let (task, auth_url) = start(options(&idp, PUBLIC_CLIENT_ID)).await;

    // What contract §6 promises about the request.
    assert_eq!(
        param(&auth_url, "code_challenge_method").as_deref(),
        Some("S256")
    );
    assert!(param(&auth_url, "code_challenge").is_some());
    assert_eq!(param(&auth_url, "prompt").as_deref(), Some("consent"));
    assert!(param(&auth_url, "nonce").is_some());
    let scope = param(&auth_url, "scope").unwrap();
    assert!(scope.split(' ').any(|s| s == "offline_access"), "{scope}");
    let port = listener_port(&auth_url);

    let callback = complete_login(auth_url.as_str()).await.unwrap();
    assert_eq!(callback.port(), Some(port));
    let page = http_client().get(callback).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("close this tab"));

    let outcome = finish(task).await.unwrap();
    let elapsed = started.elapsed();
    eprintln!("FIGURE code-flow login against local oidc-provider: {elapsed:?}");

    assert_eq!(outcome.client_id, PUBLIC_CLIENT_ID);
    assert!(outcome.client_secret.is_none());
    // oidc-provider puts only `sub` into the ID token when an access token
    // for userinfo is issued too (its `conformIdTokenClaims` default).
    assert_eq!(outcome.subject.as_deref(), Some("test-user"));
    assert!(outcome.scopes.iter().any(|s| s == "offline_access"));
    // The broker's own Import parser accepts it.
    let response = TokenResponse::parse(outcome.token_response.expose()).unwrap();
    let refresh_token = response.refresh_token.expect("a refresh token");
    assert!(!refresh_token.is_empty());
    assert!(response.id_token.is_some());
    assert_eq!(
        idp.userinfo_status(response.access_token.expose()).await,
        200
    );
    assert!(idp.introspect_active(refresh_token.expose()).await);
    assert!(port_closed(port).await, "listener still open after login");
    // Debug output of the outcome never shows a token.
    let debug = format!("{outcome:?}");
    assert!(!debug.contains(response.access_token.expose()), "{debug}");
    assert!(!debug.contains(refresh_token.expose()), "{debug}");
}

#[tokio::test]
async fn confidential_client_logs_in_with_its_secret() {
    let idp = OidcProvider::start(60).await;
    let opts = LoginOptions {
        client_secret: Some(Secret::from(CONFIDENTIAL_CLIENT_SECRET)),
        ..options(&idp, CONFIDENTIAL_CLIENT_ID)
    };
    let (task, auth_url) = start(opts).await;
    let callback = complete_login(auth_url.as_str()).await.unwrap();
    assert_eq!(
        http_client().get(callback).send().await.unwrap().status(),
        200
    );
    let outcome = finish(task).await.unwrap();
    assert_eq!(outcome.client_id, CONFIDENTIAL_CLIENT_ID);
    let response = TokenResponse::parse(outcome.token_response.expose()).unwrap();
    assert!(response.refresh_token.is_some());
    assert_eq!(
        idp.userinfo_status(response.access_token.expose()).await,
        200
    );
}

#[tokio::test]
async fn listener_ignores_other_paths_and_methods() {
    let idp = OidcProvider::start(60).await;
    let (task, auth_url) = start(options(&idp, PUBLIC_CLIENT_ID)).await;
    let port = listener_port(&auth_url);
    let base = format!("http://127.0.0.1:{port}");
    let c = http_client();
    assert_eq!(
        c.get(format!("{base}/favicon.ico"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        c.post(format!("{base}/callback"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert!(!task.is_finished());
    // The real callback still works afterwards.
    let callback = complete_login(auth_url.as_str()).await.unwrap();
    assert_eq!(c.get(callback).send().await.unwrap().status(), 200);
    finish(task).await.unwrap();
}

#[tokio::test]
async fn a_wrong_state_is_refused_and_the_real_callback_still_completes() {
    let idp = OidcProvider::start(60).await;
    let (task, auth_url) = start(options(&idp, PUBLIC_CLIENT_ID)).await;
    let port = listener_port(&auth_url);
    let genuine = complete_login(auth_url.as_str()).await.unwrap();
    let mut forged = genuine.clone();
    let pairs: Vec<(String, String)> = genuine
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "state" {
                format!("{v}x")
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    forged.query_pairs_mut().clear().extend_pairs(&pairs);

    // A forged callback is refused, and cannot end the login.
    let page = http_client().get(forged.clone()).send().await.unwrap();
    assert_eq!(page.status(), 400);
    assert!(!task.is_finished(), "a wrong state must not end the login");
    let page = http_client().get(forged).send().await.unwrap();
    assert_eq!(page.status(), 400);

    // The browser's real redirect still completes it.
    let page = http_client().get(genuine).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let outcome = finish(task).await.expect("login completes");
    assert!(outcome.token_response.expose().contains("refresh_token"));
    assert!(port_closed(port).await);
}

#[tokio::test]
async fn access_denied_callback_is_a_clear_error() {
    let idp = OidcProvider::start(60).await;
    let (task, auth_url) = start(options(&idp, PUBLIC_CLIENT_ID)).await;
    let port = listener_port(&auth_url);
    let state = param(&auth_url, "state").unwrap();
    let mut callback = Url::parse(&format!("http://127.0.0.1:{port}/callback")).unwrap();
    callback
        .query_pairs_mut()
        .append_pair("error", "access_denied")
        .append_pair("error_description", "End-User aborted interaction")
        .append_pair("state", &state)
        // oidc-provider advertises RFC 9207, so its callbacks must carry `iss`.
        .append_pair("iss", idp.issuer());
    assert_eq!(
        http_client().get(callback).send().await.unwrap().status(),
        400
    );
    let err = finish(task).await.unwrap_err();
    assert!(
        matches!(&err, LoginError::Denied { error, .. } if error == "access_denied"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("End-User aborted interaction"),
        "{err}"
    );
}

#[tokio::test]
async fn timeout_is_an_error_and_closes_the_listener() {
    let idp = OidcProvider::start(60).await;
    let opts = LoginOptions {
        timeout: Duration::from_millis(300),
        ..options(&idp, PUBLIC_CLIENT_ID)
    };
    let (task, auth_url) = start(opts).await;
    let port = listener_port(&auth_url);
    let err = finish(task).await.unwrap_err();
    assert!(matches!(err, LoginError::TimedOut { .. }), "{err:?}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(
        port_closed(port).await,
        "port {port} still accepts after the timeout"
    );
}

#[tokio::test]
async fn dropping_the_login_future_closes_the_listener() {
    let idp = OidcProvider::start(60).await;
    let (task, auth_url) = start(options(&idp, PUBLIC_CLIENT_ID)).await;
    let port = listener_port(&auth_url);
    assert!(
        !port_closed(port).await,
        "listener should be up while waiting"
    );
    task.abort();
    let joined = task.await;
    assert!(joined.unwrap_err().is_cancelled());
    assert!(
        port_closed(port).await,
        "port {port} leaked after cancellation"
    );
}

#[tokio::test]
async fn missing_client_id_without_register_is_a_usage_error() {
    let idp = OidcProvider::start(60).await;
    let opts = LoginOptions {
        client_id: None,
        ..options(&idp, PUBLIC_CLIENT_ID)
    };
    let (tx, _rx) = mpsc::unbounded_channel();
    let err = login(&http(), opts, &mut CaptureUi(tx)).await.unwrap_err();
    assert!(matches!(err, LoginError::Usage(_)), "{err:?}");
}
