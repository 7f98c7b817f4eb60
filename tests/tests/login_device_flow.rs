//! The device authorization login (RFC 8628, contract §6 `--device`) against the
//! real `oidc-provider` (device flow with `interval: 1`). The test approves or
//! aborts the code on the provider's devInteractions pages.
//! Needs `node` and `npm ci --prefix tests/idp`.

use std::time::{Duration, Instant};

use kontext_broker::idp::{Http, TokenResponse};
use kontext_broker_ctl::login::{login, Flow, LoginError, LoginOptions, LoginOutcome, LoginUi};
use kontext_broker_tests::html_form::{approve_device_code, parse_single_form};
use kontext_broker_tests::oidc_provider::{OidcProvider, PUBLIC_CLIENT_ID};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use url::Url;

/// Safety net for waiting on real events; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct DeviceCode {
    verification_uri: String,
    user_code: String,
    complete_uri: Option<String>,
}

struct CaptureUi(mpsc::UnboundedSender<DeviceCode>);

impl LoginUi for CaptureUi {
    fn show_url(&mut self, _: &str) {
        panic!("the device flow showed a redirect URL");
    }
    fn show_device_code(
        &mut self,
        verification_uri: &str,
        user_code: &str,
        complete: Option<&str>,
    ) {
        let _ = self.0.send(DeviceCode {
            verification_uri: verification_uri.to_owned(),
            user_code: user_code.to_owned(),
            complete_uri: complete.map(str::to_owned),
        });
    }
}

fn options(idp: &OidcProvider) -> LoginOptions {
    LoginOptions {
        client_id: Some(PUBLIC_CLIENT_ID.to_owned()),
        scopes: vec!["openid".into()],
        flow: Flow::Device,
        timeout: Duration::from_secs(60),
        ..LoginOptions::new(idp.issuer())
    }
}

async fn start(opts: LoginOptions) -> (JoinHandle<Result<LoginOutcome, LoginError>>, DeviceCode) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let http = Http::new(Duration::from_secs(5), Duration::from_secs(15), &[]).unwrap();
        login(&http, opts, &mut CaptureUi(tx)).await
    });
    let code = tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("the login showed no device code")
        .expect("the login ended without showing a device code");
    (task, code)
}

async fn finish(
    task: JoinHandle<Result<LoginOutcome, LoginError>>,
) -> Result<LoginOutcome, LoginError> {
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("login did not finish")
        .expect("login task panicked")
}

#[tokio::test]
async fn device_flow_end_to_end_yields_working_tokens_with_refresh_token() {
    let idp = OidcProvider::start(60).await;
    let started = Instant::now();
    let (task, code) = start(options(&idp)).await;
    assert_eq!(code.verification_uri, format!("{}/device", idp.issuer()));
    let complete = Url::parse(
        code.complete_uri
            .as_deref()
            .expect("verification_uri_complete"),
    )
    .unwrap();
    assert!(complete
        .query_pairs()
        .any(|(k, v)| k == "user_code" && v == code.user_code.as_str()));

    approve_device_code(idp.issuer(), &code.user_code)
        .await
        .unwrap();
    let outcome = finish(task).await.unwrap();
    let elapsed = started.elapsed();
    eprintln!("FIGURE device-flow login against local oidc-provider (interval 1 s): {elapsed:?}");

    assert_eq!(outcome.client_id, PUBLIC_CLIENT_ID);
    assert_eq!(outcome.subject.as_deref(), Some("test-user"));
    let response = TokenResponse::parse(outcome.token_response.expose()).unwrap();
    let refresh_token = response.refresh_token.expect("a refresh token");
    assert_eq!(
        idp.userinfo_status(response.access_token.expose()).await,
        200
    );
    assert!(idp.introspect_active(refresh_token.expose()).await);
    let granted = response.scope.unwrap_or_default();
    assert!(
        granted.split(' ').any(|s| s == "offline_access"),
        "{granted}"
    );
}

/// Presses the confirmation page's `[ Abort ]` button for `user_code`.
async fn abort_device_code(issuer: &str, user_code: &str) {
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut start = Url::parse(&format!("{issuer}/device")).unwrap();
    start.query_pairs_mut().append_pair("user_code", user_code);
    // GET with the code answers an auto-submitting form (xsrf + user_code).
    let page = client
        .get(start.clone())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut form = parse_single_form(&page, &start).unwrap();
    form.fields.push(("abort".into(), "yes".into()));
    let resp = client
        .post(form.action)
        .form(&form.fields)
        .send()
        .await
        .unwrap();
    let html = resp.text().await.unwrap();
    assert!(html.contains("was interrupted"), "abort page: {html}");
}

#[tokio::test]
async fn aborting_on_the_device_page_gives_access_denied() {
    let idp = OidcProvider::start(60).await;
    let (task, code) = start(options(&idp)).await;
    abort_device_code(idp.issuer(), &code.user_code).await;
    let err = finish(task).await.unwrap_err();
    assert!(
        matches!(&err, LoginError::Denied { error, .. } if error == "access_denied"),
        "{err:?}"
    );
    assert!(err.to_string().contains("refused the login"), "{err}");
}

#[tokio::test]
async fn device_login_times_out_when_nobody_approves() {
    let idp = OidcProvider::start(60).await;
    let opts = LoginOptions {
        timeout: Duration::from_millis(500),
        ..options(&idp)
    };
    let (task, _code) = start(opts).await;
    let err = finish(task).await.unwrap_err();
    assert!(matches!(err, LoginError::TimedOut { .. }), "{err:?}");
}
