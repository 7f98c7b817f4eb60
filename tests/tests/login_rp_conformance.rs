//! OpenID Connect relying-party conformance of `broker-ctl login` (docs/security.md,
//! "ID token checks"): the OpenID Foundation's Basic RP tests, by name, against
//! the fake IdP's hostile mode, in the code flow and in the device flow.
//!
//! Each login runs `kontext_broker_ctl::cli::login` in-process against a real broker
//! process, while the test plays the browser (it follows the authorization
//! redirect and requests the loopback callback). Every refusal asserts the
//! message, that the broker holds no profile, that no token the IdP issued
//! appears in stdout, stderr or the browser's page, and that the refused
//! response's tokens are revoked. Needs `cargo build --workspace --bins`.

use std::io::Write;
use std::time::Duration;

use kontext_broker_client::BrokerClient;
use kontext_broker_ctl::cli::exit;
use kontext_broker_ctl::cli::login::{self, LoginArgs, DEFAULT_TIMEOUT_SECS};
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess};
use kontext_broker_tests::fake_idp::{
    Failure as IdpFailure, FakeIdp, FakeIdpConfig, IdTokenForgery, IssParameter,
};
use tokio::sync::mpsc;
use url::Url;

/// Safety net for waiting on real events; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(30);

/// A `Write` that forwards every complete line to a channel and keeps a copy.
struct LineSink {
    partial: Vec<u8>,
    all: Vec<u8>,
    tx: mpsc::UnboundedSender<String>,
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.all.extend_from_slice(buf);
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

/// What the browser got from the loopback callback.
#[derive(Debug)]
struct Page {
    status: u16,
    csp: Option<String>,
    body: String,
}

/// Everything a login run left behind.
struct Run {
    result: Result<(), kontext_broker_ctl::cli::Failure>,
    out: String,
    err: String,
    page: Option<Page>,
}

impl Run {
    fn message(&self) -> String {
        match &self.result {
            Ok(()) => panic!("the login succeeded; out: {}; err: {}", self.out, self.err),
            Err(f) => f.message.clone(),
        }
    }
}

struct Setup {
    idp: FakeIdp,
    broker: BrokerProcess,
}

async fn setup() -> Setup {
    setup_with(FakeIdpConfig::default()).await
}

async fn setup_with(config: FakeIdpConfig) -> Setup {
    Setup {
        idp: FakeIdp::start(config).await,
        broker: BrokerProcess::start(BrokerOptions::default()),
    }
}

fn args(idp: &FakeIdp, device: bool) -> LoginArgs {
    LoginArgs {
        profile: "rp".into(),
        issuer: idp.issuer(),
        client_id: Some(idp.client_id().to_owned()),
        credential: Default::default(),
        scopes: Vec::new(),
        device,
        no_browser: true,
        register: false,
        endpoints: Default::default(),
        timeout: DEFAULT_TIMEOUT_SECS,
    }
}

/// The browser's plain HTTP client: no redirects followed.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(PATIENCE)
        .build()
        .unwrap()
}

/// Follows `/authorize` to the loopback callback: the callback URL.
async fn authorize(url: &Url) -> Url {
    let resp = browser().get(url.as_str()).send().await.unwrap();
    assert_eq!(resp.status(), 302, "the fake IdP approves at once");
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    Url::parse(&location).unwrap()
}

async fn fetch_page(callback: &Url) -> Page {
    let resp = browser().get(callback.as_str()).send().await.unwrap();
    Page {
        status: resp.status().as_u16(),
        csp: resp
            .headers()
            .get("content-security-policy")
            .map(|v| v.to_str().unwrap().to_owned()),
        body: resp.text().await.unwrap(),
    }
}

/// Runs `login` with `args`; the browser (code flow) calls `before_authorize`
/// once the URL is shown, then completes the login.
async fn run_login(s: &Setup, args: LoginArgs, before_authorize: impl FnOnce()) -> Run {
    let device = args.device;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut err = LineSink {
        partial: Vec::new(),
        all: Vec::new(),
        tx,
    };
    let mut out = Vec::new();
    let socket = s.broker.socket().to_owned();
    let cli = async {
        let result = login::run_until(
            args,
            Some(&socket),
            &mut out,
            &mut err,
            std::future::pending(),
        )
        .await;
        // Ends the browser's wait when no URL ever comes.
        let (tx, _) = mpsc::unbounded_channel();
        err.tx = tx;
        result
    };
    let user = async {
        let url = loop {
            // `None`: the login ended without showing a URL.
            let line = tokio::time::timeout(PATIENCE, rx.recv())
                .await
                .expect("the login neither showed a URL nor ended")?;
            if line.starts_with("http://") {
                break Url::parse(&line).expect("the URL line is exactly a URL");
            }
        };
        before_authorize();
        if device {
            return None; // the fake approved the device code already
        }
        let callback = authorize(&url).await;
        Some(fetch_page(&callback).await)
    };
    let (result, page) = tokio::time::timeout(PATIENCE * 2, async { tokio::join!(cli, user) })
        .await
        .expect("the login ended");
    Run {
        result,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8_lossy(&err.all).into_owned(),
        page,
    }
}

async fn profiles(s: &Setup) -> Vec<String> {
    let client = BrokerClient::connect_to(s.broker.socket()).await.unwrap();
    client
        .status()
        .await
        .unwrap()
        .profiles
        .into_iter()
        .map(|p| p.name)
        .collect()
}

/// No token, code or ID token the IdP handed out shows up anywhere the user sees.
fn assert_no_secret_shown(s: &Setup, run: &Run) {
    let mut seen = vec![run.out.clone(), run.err.clone()];
    if let Err(f) = &run.result {
        seen.push(f.message.clone());
    }
    if let Some(page) = &run.page {
        seen.push(page.body.clone());
    }
    for secret in s.idp.issued_secrets() {
        for text in &seen {
            assert!(
                !text.contains(&secret),
                "an issued secret was shown: {text}"
            );
        }
    }
}

fn assert_page_headers(page: &Page) {
    assert_eq!(
        page.csp.as_deref(),
        Some("default-src 'none'; style-src 'unsafe-inline'")
    );
}

/// Waits until `cond` holds (a condition, not a fixed sleep).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A refusal: the message, nothing stored, nothing shown, the page says so.
async fn assert_refused(s: &Setup, run: &Run, needle: &str) {
    let message = run.message();
    assert!(
        message.contains(needle),
        "expected `{needle}` in `{message}`"
    );
    assert_eq!(run.result.as_ref().unwrap_err().code, exit::OTHER);
    assert!(run.out.is_empty(), "stdout: {}", run.out);
    assert_eq!(profiles(s).await, Vec::<String>::new(), "nothing stored");
    assert_no_secret_shown(s, run);
    if let Some(page) = &run.page {
        assert_eq!(page.status, 400, "{}", page.body);
        assert!(page.body.contains("Login failed"), "{}", page.body);
        assert_page_headers(page);
    }
}

/// A refusal after the token response: also, its tokens die at the IdP.
async fn assert_refused_and_revoked(s: &Setup, run: &Run, needle: &str) {
    assert_refused(s, run, needle).await;
    eventually("the refused grant is revoked", || s.idp.live_grants() == 0).await;
}

async fn assert_accepted(s: &Setup, run: &Run) {
    if let Err(f) = &run.result {
        panic!("refused: {}", f.message);
    }
    assert!(
        run.out
            .starts_with("logged in profile `rp` as fake-user (client kontext-cli)"),
        "{}",
        run.out
    );
    assert_eq!(profiles(s).await, ["rp"]);
    assert_no_secret_shown(s, run);
    if let Some(page) = &run.page {
        assert_eq!(page.status, 200, "{}", page.body);
        assert!(
            page.body.contains("Logged in as fake-user."),
            "{}",
            page.body
        );
        assert!(page.body.contains(&s.idp.issuer()), "{}", page.body);
        assert!(page.body.contains("Profile: rp"), "{}", page.body);
        assert_page_headers(page);
    }
}

async fn code_login(s: &Setup, forgery: IdTokenForgery) -> Run {
    s.idp.set_id_token_forgery(forgery);
    run_login(s, args(&s.idp, false), || {}).await
}

// ---- The Basic RP tests, code flow ----

#[tokio::test]
async fn rp_id_token_sig_rs256() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::Honest).await;
    assert_accepted(&s, &run).await;
    assert_eq!(s.idp.jwks_calls(), 1);
}

#[tokio::test]
async fn rp_id_token_bad_sig_rs256() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::BadSignatureRs256).await;
    assert_refused_and_revoked(
        &s,
        &run,
        "the ID token is invalid: its signature does not verify with the provider's key (kid `k1`)",
    )
    .await;
    // The key named by `kid` is known: fetching the keys again cannot help.
    assert_eq!(s.idp.jwks_calls(), 1);
}

#[tokio::test]
async fn rp_id_token_bad_sig_hs256() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::Hs256WithPublicKey).await;
    assert_refused_and_revoked(
        &s,
        &run,
        "the ID token is invalid: it is signed with `HS256`, a shared-secret algorithm",
    )
    .await;
}

#[tokio::test]
async fn rp_id_token_sig_none() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::AlgNone).await;
    assert_refused_and_revoked(
        &s,
        &run,
        "the ID token is invalid: it is not signed (header `alg` is `none`)",
    )
    .await;
}

#[tokio::test]
async fn rp_id_token_issuer_mismatch() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::WrongIssuer).await;
    assert_refused_and_revoked(
        &s,
        &run,
        &format!(
            "the ID token is invalid: claim `iss` is `https://attacker.example`, not the discovered issuer `{}`",
            s.idp.issuer()
        ),
    )
    .await;
}

#[tokio::test]
async fn id_token_issuer_is_compared_exactly() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::IssuerWithTrailingSlash).await;
    assert_refused_and_revoked(&s, &run, "claim `iss` is ").await;
}

#[tokio::test]
async fn rp_id_token_aud() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::WrongAudience).await;
    assert_refused_and_revoked(
        &s,
        &run,
        "the ID token is invalid: claim `aud` does not contain this client (`kontext-cli`)",
    )
    .await;
}

#[tokio::test]
async fn id_token_extra_audience_without_azp() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::ExtraAudience).await;
    assert_refused_and_revoked(
        &s,
        &run,
        "the ID token is invalid: claim `aud` also names `someone-else`",
    )
    .await;
}

#[tokio::test]
async fn rp_id_token_iat() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::MissingIat).await;
    assert_refused_and_revoked(
        &s,
        &run,
        "the ID token is invalid: required claim `iat` is missing",
    )
    .await;
    assert!(!run.message().contains("unreadable"), "{}", run.message());
}

#[tokio::test]
async fn rp_id_token_sub() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::MissingSub).await;
    assert_refused_and_revoked(
        &s,
        &run,
        "the ID token is invalid: required claim `sub` is missing",
    )
    .await;
    assert!(!run.message().contains("rejected the token request"));
}

#[tokio::test]
async fn rp_nonce_invalid() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::WrongNonce).await;
    assert_refused_and_revoked(
        &s,
        &run,
        "the ID token is invalid: claim `nonce` does not match the one sent with the login request",
    )
    .await;
}

#[tokio::test]
async fn id_token_without_the_nonce_sent() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::MissingNonce).await;
    assert_refused_and_revoked(&s, &run, "claim `nonce` is missing").await;
}

#[tokio::test]
async fn id_token_expired() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::Expired).await;
    assert_refused_and_revoked(
        &s,
        &run,
        "the ID token is invalid: claim `exp` is in the past",
    )
    .await;
}

#[tokio::test]
async fn rp_id_token_kid_absent_single_jwks() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::NoKid).await;
    assert_accepted(&s, &run).await;
}

#[tokio::test]
async fn rp_id_token_kid_absent_multiple_jwks() {
    let s = setup().await;
    // Two keys published; the token, without `kid`, is signed by the second.
    s.idp.set_signing_keys(&["k1", "k2"], "k2");
    let run = code_login(&s, IdTokenForgery::NoKid).await;
    assert_accepted(&s, &run).await;
    assert_eq!(
        s.idp.jwks_calls(),
        1,
        "the first key failing is no reason to re-fetch"
    );
}

#[tokio::test]
async fn kid_absent_and_no_published_key_verifies() {
    let s = setup().await;
    s.idp.set_signing_keys(&["k1", "k2"], "k2");
    let run = code_login(&s, IdTokenForgery::NoKidBadSignature).await;
    assert_refused_and_revoked(
        &s,
        &run,
        "its signature does not verify with the provider's key (no kid) even after refreshing the provider's keys",
    )
    .await;
    assert_eq!(s.idp.jwks_calls(), 2);
}

#[tokio::test]
async fn rp_key_rotation_op_sign_key() {
    let s = setup().await;
    // The keys are fetched before the URL is shown; the provider rotates its
    // signing key while the user is in the browser.
    let run = run_login(&s, args(&s.idp, false), || {
        assert_eq!(s.idp.jwks_calls(), 1);
        s.idp.rotate_signing_key();
    })
    .await;
    assert_accepted(&s, &run).await;
    assert_eq!(s.idp.jwks_calls(), 2, "exactly one extra JWKS fetch");
}

#[tokio::test]
async fn unknown_kid_is_refused_after_one_refresh() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::UnknownKid("k9".into())).await;
    assert_refused_and_revoked(
        &s,
        &run,
        "the ID token is invalid: it is signed with an unknown key (kid `k9`) even after refreshing the provider's keys",
    )
    .await;
    assert_eq!(s.idp.jwks_calls(), 2);
}

#[tokio::test]
async fn rp_discovery_issuer_not_matching_config() {
    let s = setup().await;
    s.idp.set_discovery_issuer("https://attacker.example");
    let run = run_login(&s, args(&s.idp, false), || {}).await;
    assert_refused(&s, &run, "names issuer `https://attacker.example`").await;
    assert!(run.page.is_none(), "no URL was shown");
    assert_eq!(s.idp.token_calls(), 0);
}

#[tokio::test]
async fn issuer_typed_with_a_trailing_slash_still_logs_in() {
    let s = setup().await;
    let typed = LoginArgs {
        issuer: format!("{}/", s.idp.issuer()),
        ..args(&s.idp, false)
    };
    let run = run_login(&s, typed, || {}).await;
    assert_accepted(&s, &run).await;
}

#[tokio::test]
async fn at_hash_mismatch() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::WrongAtHash).await;
    assert_refused_and_revoked(
        &s,
        &run,
        "the ID token is invalid: `at_hash` does not match the access token",
    )
    .await;
}

#[tokio::test]
async fn id_token_missing_from_the_code_flow_response() {
    let s = setup().await;
    let run = code_login(&s, IdTokenForgery::Omitted).await;
    assert_refused_and_revoked(
        &s,
        &run,
        "the ID token is invalid: the token response carries no `id_token` although the `openid` scope was requested",
    )
    .await;
}

#[tokio::test]
async fn no_refresh_token_is_refused_and_the_access_token_revoked() {
    let s = setup().await;
    s.idp.set_omit_refresh_token(true);
    let run = code_login(&s, IdTokenForgery::Honest).await;
    assert_refused(&s, &run, "issued no refresh token").await;
    eventually("the access token is revoked", || {
        s.idp.revocation_calls() >= 1
    })
    .await;
}

// ---- RFC 9207 ----

#[tokio::test]
async fn rfc9207_correct_iss_is_accepted() {
    let s = setup().await;
    s.idp.set_iss_parameter(IssParameter::Correct);
    let run = code_login(&s, IdTokenForgery::Honest).await;
    assert_accepted(&s, &run).await;
}

#[tokio::test]
async fn rfc9207_wrong_iss_is_refused_before_the_exchange() {
    let s = setup().await;
    s.idp.set_iss_parameter(IssParameter::Wrong);
    let run = code_login(&s, IdTokenForgery::Honest).await;
    assert_refused(
        &s,
        &run,
        "the login callback came from issuer `https://attacker.example`",
    )
    .await;
    assert_eq!(s.idp.token_calls(), 0, "the code was never redeemed");
}

#[tokio::test]
async fn rfc9207_missing_iss_is_refused_when_advertised() {
    let s = setup().await;
    s.idp.set_iss_parameter(IssParameter::Missing);
    let run = code_login(&s, IdTokenForgery::Honest).await;
    assert_refused(
        &s,
        &run,
        "the login callback carried no `iss` although the provider promises one",
    )
    .await;
    assert_eq!(s.idp.token_calls(), 0, "the code was never redeemed");
}

// ---- The same ID-token checks in the device flow (no nonce there) ----

#[tokio::test]
async fn device_flow_runs_the_same_id_token_checks() {
    let refusals = [
        (
            IdTokenForgery::BadSignatureRs256,
            "its signature does not verify with the provider's key (kid `k1`)",
        ),
        (
            IdTokenForgery::Hs256WithPublicKey,
            "it is signed with `HS256`, a shared-secret algorithm",
        ),
        (
            IdTokenForgery::AlgNone,
            "it is not signed (header `alg` is `none`)",
        ),
        (
            IdTokenForgery::WrongIssuer,
            "claim `iss` is `https://attacker.example`",
        ),
        (IdTokenForgery::IssuerWithTrailingSlash, "claim `iss` is "),
        (
            IdTokenForgery::WrongAudience,
            "claim `aud` does not contain this client",
        ),
        (
            IdTokenForgery::ExtraAudience,
            "claim `aud` also names `someone-else`",
        ),
        (
            IdTokenForgery::MissingIat,
            "required claim `iat` is missing",
        ),
        (
            IdTokenForgery::MissingSub,
            "required claim `sub` is missing",
        ),
        (IdTokenForgery::Expired, "claim `exp` is in the past"),
        (
            IdTokenForgery::WrongAtHash,
            "`at_hash` does not match the access token",
        ),
        (
            IdTokenForgery::UnknownKid("k9".into()),
            "it is signed with an unknown key (kid `k9`) even after refreshing the provider's keys",
        ),
    ];
    for (forgery, needle) in refusals {
        let s = setup().await;
        s.idp.set_id_token_forgery(forgery.clone());
        let run = run_login(&s, args(&s.idp, true), || {}).await;
        assert!(run.page.is_none());
        let message = run.message();
        assert!(
            message.contains(&format!("the ID token is invalid: {needle}")),
            "{forgery:?}: {message}"
        );
        assert_refused_and_revoked(&s, &run, needle).await;
    }

    // Accepted: honest, no `kid` with several keys, a rotation mid-login, and a
    // `nonce` claim the device flow never sent (nothing to compare it with).
    for forgery in [
        IdTokenForgery::Honest,
        IdTokenForgery::NoKid,
        IdTokenForgery::WrongNonce,
    ] {
        let s = setup().await;
        s.idp.set_signing_keys(&["k1", "k2"], "k2");
        s.idp.set_id_token_forgery(forgery.clone());
        let run = run_login(&s, args(&s.idp, true), || {}).await;
        assert_accepted(&s, &run).await;
    }
    let s = setup().await;
    s.idp.rotate_signing_key_on_device_authorization();
    let run = run_login(&s, args(&s.idp, true), || {}).await;
    assert_accepted(&s, &run).await;
    assert_eq!(s.idp.jwks_calls(), 2, "exactly one extra JWKS fetch");
}

// ---- The browser's page (loopback callback) ----

#[tokio::test]
async fn page_is_held_until_the_exchange_ends() {
    use std::io::Read;

    let s = setup().await;
    let hold = s.idp.hold_token_calls();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut err = LineSink {
        partial: Vec::new(),
        all: Vec::new(),
        tx,
    };
    let mut out = Vec::new();
    let socket = s.broker.socket().to_owned();
    let cli = login::run_until(
        args(&s.idp, false),
        Some(&socket),
        &mut out,
        &mut err,
        std::future::pending(),
    );
    let browser = async {
        let url = loop {
            let line = rx.recv().await.expect("a URL line");
            if line.starts_with("http://") {
                break Url::parse(&line).unwrap();
            }
        };
        let callback = authorize(&url).await;
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", callback.port().unwrap())).unwrap();
        write!(
            stream,
            "GET {}?{} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            callback.path(),
            callback.query().unwrap()
        )
        .unwrap();
        // The exchange has begun and is held at the IdP: no answer may exist yet.
        tokio::time::timeout(PATIENCE, s.idp.wait_for_token_calls(1))
            .await
            .expect("the code exchange reached the IdP");
        stream.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let early = stream.read(&mut byte);
        assert!(
            matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the browser was answered before the exchange ended: {early:?}"
        );
        drop(hold);
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        tokio::task::spawn_blocking(move || {
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            response
        })
        .await
        .unwrap()
    };
    let (result, response) = tokio::join!(cli, browser);
    result.unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.contains(
        "\r\nContent-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n"
    ));
    assert!(response.contains("Logged in as fake-user."), "{response}");
}

#[tokio::test]
async fn failure_page_after_a_failed_exchange() {
    let s = setup().await;
    s.idp.push_failure(IdpFailure::InvalidGrant);
    let run = run_login(&s, args(&s.idp, false), || {}).await;
    assert_refused(&s, &run, "invalid_grant").await;
    let page = run.page.as_ref().unwrap();
    assert!(page.body.contains("invalid_grant"), "{}", page.body);
    assert!(page.body.contains("Nothing was stored"), "{}", page.body);
}

#[tokio::test]
async fn page_holds_no_code_state_or_token_and_escapes_provider_text() {
    let s = setup_with(FakeIdpConfig {
        subject: "<script>alert(1)</script>".into(),
        ..FakeIdpConfig::default()
    })
    .await;
    let run = run_login(&s, args(&s.idp, false), || {}).await;
    run.result.as_ref().unwrap();
    let page = run.page.as_ref().unwrap();
    assert!(!page.body.contains("<script>"), "{}", page.body);
    assert!(
        page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{}",
        page.body
    );
    for external in ["src=", "href=", "url(", "@import"] {
        assert!(!page.body.contains(external), "{}", page.body);
    }
    // Every code, token and ID token the IdP issued; and the state of the URL.
    assert_no_secret_shown(&s, &run);
    let url = run
        .err
        .lines()
        .find(|l| l.starts_with("http://"))
        .map(|l| Url::parse(l).unwrap())
        .unwrap();
    let state = url
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    assert!(!page.body.contains(&state));
}

// ---- Ctrl-C and --timeout, through the real binary ----

#[tokio::test]
async fn ctrl_c_prints_cancelled_and_exits_130() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let s = setup().await;
    let mut child =
        tokio::process::Command::new(kontext_broker_tests::scenario::broker_ctl_binary())
            .arg("--socket")
            .arg(s.broker.socket())
            .args(["login", "--no-browser", "--issuer", &s.idp.issuer()])
            .args(["--client-id", s.idp.client_id()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .expect("broker-ctl showed a URL")
            .unwrap()
            .expect("stderr closed before the URL");
        let is_url = line.starts_with("http://");
        seen.push(line);
        if is_url {
            break;
        }
    }
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    while let Some(line) = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
    {
        seen.push(line);
    }
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(130), "{seen:#?}");
    assert!(
        seen.iter()
            .any(|l| l == "broker-ctl: login cancelled (Ctrl-C); nothing was stored"),
        "{seen:#?}"
    );
    assert_eq!(profiles(&s).await, Vec::<String>::new());
}

#[tokio::test]
async fn timeout_flag_bounds_the_wait() {
    let s = setup().await;
    let out = kontext_broker_tests::scenario::broker_ctl(
        s.broker.socket(),
        &[
            "login",
            "--no-browser",
            "--timeout",
            "1",
            "--issuer",
            &s.idp.issuer(),
            "--client-id",
            s.idp.client_id(),
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(i32::from(exit::OTHER)), "{stderr}");
    assert!(stderr.contains("login timed out after 1s"), "{stderr}");
}

// ---- The JWKS re-fetch is rate-limited per issuer (injected clock) ----

/// An RS256-looking token naming `kid`, which no key of the fake has.
fn token_with_unknown_kid(idp: &FakeIdp, kid: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({ "alg": "RS256", "kid": kid });
    let claims = serde_json::json!({
        "iss": idp.issuer(), "sub": "fake-user", "aud": idp.client_id(),
        "exp": now + 300, "iat": now,
    });
    format!(
        "{}.{}.c2lnbmF0dXJl",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

#[tokio::test]
async fn unknown_kid_storm_fetches_the_keys_at_most_once_per_interval() {
    use std::sync::Arc;

    use kontext_broker::clock::ManualClock;
    use kontext_broker::idp::Http;
    use kontext_broker_ctl::login::{
        verify_id_token, IdTokenCheck, IdTokenError, JwksCache, LoginError, MIN_REFRESH_INTERVAL,
    };

    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let clock = ManualClock::new(1_700_000_000_000);
    let http = Http::new(Duration::from_secs(5), Duration::from_secs(15), &[]).unwrap();
    let cache = JwksCache::new(http, &idp.jwks_uri(), Arc::new(clock.clone())).unwrap();
    let issuer = idp.issuer();
    let check = IdTokenCheck {
        issuer: &issuer,
        client_id: idp.client_id(),
        client_secret: None,
        nonce: None,
        access_token: "at",
    };
    let storm = |round: u32| {
        let tokens: Vec<String> = (0..50)
            .map(|i| token_with_unknown_kid(&idp, &format!("r{round}-{i}")))
            .collect();
        let (cache, check) = (&cache, &check);
        async move {
            // All at once: concurrent verifications share one re-fetch.
            let results =
                futures::future::join_all(tokens.iter().map(|t| verify_id_token(t, cache, check)))
                    .await;
            for result in results {
                assert!(
                    matches!(
                        result,
                        Err(LoginError::IdToken(IdTokenError::UnknownKey { .. }))
                    ),
                    "{result:?}"
                );
            }
        }
    };

    storm(0).await;
    // The first fetch, and one re-fetch for the first unknown kid.
    assert_eq!(idp.jwks_calls(), 2);
    clock.advance(MIN_REFRESH_INTERVAL - Duration::from_secs(1));
    storm(1).await;
    assert_eq!(idp.jwks_calls(), 2, "still inside the interval");
    clock.advance(Duration::from_secs(1));
    storm(2).await;
    assert_eq!(idp.jwks_calls(), 3, "one more per interval");
    assert_eq!(cache.fetches().await, 3);
    let e = verify_id_token(&token_with_unknown_kid(&idp, "k7"), &cache, &check)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("signed with an unknown key (kid `k7`), and the provider's keys were refreshed moments ago"),
        "{e}"
    );
}
