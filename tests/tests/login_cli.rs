//! `broker-ctl login` and `broker-ctl doctor` against a real broker process
//! and the real `oidc-provider`. The commands run in-process
//! (`kontext_broker_ctl::cli::{login, doctor}`), with stdout and stderr captured,
//! while the test plays the user. Needs `node`, `npm ci --prefix tests/idp`
//! and the broker binary (`cargo build --workspace --bins`).

use std::io::Write;
use std::time::Duration;

use kontext_broker_client::BrokerClient;
use kontext_broker_ctl::cli::doctor::{self, Level};
use kontext_broker_ctl::cli::exit;
use kontext_broker_ctl::cli::login::{self, LoginArgs};
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess};
use kontext_broker_tests::html_form::{approve_device_code, complete_login};
use kontext_broker_tests::oidc_provider::{http_client, OidcProvider, PUBLIC_CLIENT_ID};
use tokio::sync::mpsc;
use url::Url;

const PATIENCE: Duration = Duration::from_secs(30);

/// A `Write` that forwards every complete line to a channel (the fake terminal).
struct LineSink {
    partial: Vec<u8>,
    tx: mpsc::UnboundedSender<String>,
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(i) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let _ = self
                .tx
                .send(String::from_utf8_lossy(&line).trim_end().to_owned());
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn sink() -> (LineSink, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        LineSink {
            partial: Vec::new(),
            tx,
        },
        rx,
    )
}

/// Waits for the first stderr line that is a URL on its own.
async fn url_line(rx: &mut mpsc::UnboundedReceiver<String>) -> Url {
    loop {
        let line = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .expect("no URL line on stderr")
            .expect("stderr closed without a URL line");
        if line.starts_with("http://") || line.starts_with("https://") {
            return Url::parse(&line).expect("the URL line is exactly a URL");
        }
    }
}

fn args(idp: &OidcProvider, profile: &str) -> LoginArgs {
    LoginArgs {
        profile: profile.into(),
        issuer: idp.issuer().into(),
        client_id: Some(PUBLIC_CLIENT_ID.into()),
        credential: Default::default(),
        scopes: Vec::new(),
        device: false,
        no_browser: true,
        register: false,
        endpoints: Default::default(),
        timeout: PATIENCE.as_secs(),
    }
}

#[tokio::test]
async fn login_code_flow_imports_into_the_broker() {
    let idp = OidcProvider::start(60).await;
    let broker = BrokerProcess::start(BrokerOptions::default());
    let (mut err, mut err_rx) = sink();
    let mut out = Vec::new();

    let user = async {
        let url = url_line(&mut err_rx).await;
        let callback = complete_login(url.as_str()).await.unwrap();
        assert_eq!(
            http_client().get(callback).send().await.unwrap().status(),
            200
        );
    };
    let (result, ()) = tokio::join!(
        login::run(
            args(&idp, "work"),
            Some(broker.socket()),
            &mut out,
            &mut err
        ),
        user
    );
    result.unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.starts_with("logged in profile `work` as test-user (client kontext-cli)"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 1, "{out}");

    let client = BrokerClient::connect_to(broker.socket()).await.unwrap();
    let token = client.get_token("work", Duration::ZERO).await.unwrap();
    assert_eq!(idp.userinfo_status(token.access_token.expose()).await, 200);
    assert!(!out.contains(token.access_token.expose()));
    let status = client.status().await.unwrap();
    let p = status.profiles.iter().find(|p| p.name == "work").unwrap();
    assert_eq!(p.client_id, PUBLIC_CLIENT_ID);
    assert_eq!(p.subject.as_deref(), Some("test-user"));

    // The broker renews with the imported refresh token.
    let refreshed = client.refresh("work").await.unwrap();
    assert!(refreshed.generation > token.generation);
    assert_eq!(
        idp.userinfo_status(refreshed.access_token.expose()).await,
        200
    );
}

#[tokio::test]
async fn login_device_flow_prints_the_complete_uri_and_imports() {
    let idp = OidcProvider::start(60).await;
    let broker = BrokerProcess::start(BrokerOptions::default());
    let (mut err, mut err_rx) = sink();
    let mut out = Vec::new();
    let user = async {
        let url = url_line(&mut err_rx).await;
        let code = url
            .query_pairs()
            .find(|(k, _)| k == "user_code")
            .map(|(_, v)| v.into_owned())
            .expect("the printed URL carries the user code");
        approve_device_code(idp.issuer(), &code).await.unwrap();
    };
    let device = LoginArgs {
        device: true,
        ..args(&idp, "default")
    };
    let (result, ()) = tokio::join!(
        login::run(device, Some(broker.socket()), &mut out, &mut err),
        user
    );
    result.unwrap();
    let token = BrokerClient::connect_to(broker.socket())
        .await
        .unwrap()
        .get_token("default", Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(idp.userinfo_status(token.access_token.expose()).await, 200);
}

#[tokio::test]
async fn login_without_a_broker_fails_before_showing_any_url() {
    let idp = OidcProvider::start(60).await;
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("nobody-here.sock");
    let (mut err, mut err_rx) = sink();
    let mut out = Vec::new();
    let failure = login::run(args(&idp, "default"), Some(&socket), &mut out, &mut err)
        .await
        .unwrap_err();
    assert_eq!(failure.code, exit::UNREACHABLE, "{}", failure.message);
    drop(err);
    assert_eq!(err_rx.recv().await, None, "nothing was shown to the user");
    assert!(out.is_empty());
}

#[tokio::test]
async fn doctor_passes_on_a_healthy_setup_and_checks_each_profile() {
    let idp = OidcProvider::start(60).await;
    let broker = BrokerProcess::start(BrokerOptions::default());
    let grant = idp
        .mint(PUBLIC_CLIENT_ID, &["openid", "offline_access"])
        .await;
    BrokerClient::connect_to(broker.socket())
        .await
        .unwrap()
        .import(kontext_broker_protocol::ImportRequest {
            profile: "default".into(),
            issuer: idp.issuer().into(),
            client_id: PUBLIC_CLIENT_ID.into(),
            credential: kontext_broker_protocol::ClientCredential::None,
            client_auth: None,
            endpoints: Default::default(),
            scopes: vec!["openid".into(), "offline_access".into()],
            token_response: grant.to_string().into(),
        })
        .await
        .unwrap();

    let checks = doctor::checks(Some(broker.socket())).await;
    let text: Vec<String> = checks
        .iter()
        .map(|c| format!("{:?} {}", c.level, c.message))
        .collect();
    assert!(checks.iter().all(|c| c.level == Level::Ok), "{text:#?}");
    assert!(
        text.iter().any(|l| l.contains("socket directory")),
        "{text:#?}"
    );
    assert!(
        text.iter().any(|l| l.contains("state directory")),
        "{text:#?}"
    );
    assert!(text.iter().any(|l| l.contains("discovery")), "{text:#?}");
    assert!(text.iter().any(|l| l.contains("clock within")), "{text:#?}");

    let mut out = Vec::new();
    doctor::run(Some(broker.socket()), &mut out).await.unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(out.lines().count(), checks.len());
    assert!(out.lines().all(|l| l.starts_with("ok ")), "{out}");
}

#[tokio::test]
async fn doctor_fails_without_a_broker() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("run").join("broker.sock");
    let mut out = Vec::new();
    let failure = doctor::run(Some(&socket), &mut out).await.unwrap_err();
    assert_eq!(failure.code, exit::OTHER);
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.lines()
            .any(|l| l.starts_with("fail") && l.contains("socket directory")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("fail") && l.contains("broker")),
        "{out}"
    );
}
