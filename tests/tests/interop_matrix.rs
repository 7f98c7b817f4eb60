//! The end-to-end interoperability matrix: every case runs against both real
//! authorization servers, oidc-provider (`oidc_provider::*`) and
//! django-oauth-toolkit configured like Ory Hydra (`dot::*`). Each case is
//! written once, parameterised by [`Kind`]; [`Server`] hides the differences.
//! The broker is the real binary; logins run the real `broker-ctl` while the
//! test plays the user on the server's own pages.
//!
//! Needs `node` with `npm ci --prefix tests/idp`, `python3` (the DOT venv is
//! created on first use), and `cargo build --workspace --bins`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use kontext_broker_client::{BrokerClient, Error, ProfileState, Token, WatchEvent};
use kontext_broker_protocol::{ClientCredential, ImportRequest, Secret};
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess};
use kontext_broker_tests::matrix::{Kind, Server};
use kontext_broker_tests::oidc_provider::http_client;
use kontext_broker_tests::scenario::{broker_ctl, broker_ctl_binary, connect};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use url::Url;

const PROFILE: &str = "default";
const REAUTH_MESSAGE: &str = "Session expired, run `kontext login` to re-authenticate";
/// Safety net for events that take milliseconds to seconds; never a budget.
const PATIENCE: Duration = Duration::from_secs(60);

/// Writes both wrappers of every case: `oidc_provider::CASE` and `dot::CASE`.
macro_rules! matrix {
    ($($case:ident),* $(,)?) => {
        mod oidc_provider {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Kind::OidcProvider).await
                }
            )*
        }
        mod dot {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Kind::Dot).await
                }
            )*
        }
    };
}

matrix!(
    import,
    refresh_across_lifetimes,
    forced_and_concurrent_refresh,
    admin_revocation_means_reauth_once_then_silence,
    kill_9_and_restart,
    code_flow_login,
    device_login,
    confidential_client,
    logout_revokes,
);

/// A server, a broker and a connected client.
struct Setup {
    idp: Server,
    broker: BrokerProcess,
    client: BrokerClient,
}

/// `None` only when DOT cannot run outside CI (no python3; reported by the fixture).
async fn setup(kind: Kind, ttl: u64) -> Option<Setup> {
    let idp = Server::start(kind, ttl).await?;
    let broker = BrokerProcess::start(BrokerOptions::default());
    let client = connect(broker.socket()).await;
    Some(Setup {
        idp,
        broker,
        client,
    })
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in the token response"))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Mints a grant of the public client and imports it as [`PROFILE`].
async fn import_minted(s: &Setup) -> (Value, Token) {
    let minted = s.idp.mint(s.idp.public_client()).await;
    let status = s
        .client
        .import(ImportRequest {
            profile: PROFILE.into(),
            issuer: s.idp.issuer().into(),
            client_id: s.idp.public_client().into(),
            credential: ClientCredential::None,
            client_auth: None,
            endpoints: Default::default(),
            scopes: s.idp.grant_scopes().iter().map(|s| s.to_string()).collect(),
            token_response: Secret::new(minted.to_string()),
        })
        .await
        .expect("import");
    assert_eq!(status.state, ProfileState::Valid, "{status:?}");
    let token = s.client.get_token(PROFILE, Duration::ZERO).await.unwrap();
    assert_eq!(token.generation, status.generation);
    (minted, token)
}

async fn assert_active(idp: &Server, token: &Token, what: &str) {
    assert!(
        idp.token_active(token.access_token.expose()).await,
        "{}: {what} (generation {}) is not active",
        idp.name(),
        token.generation
    );
}

fn assert_reauth(result: Result<Token, Error>) {
    match result {
        Err(Error::ReauthRequired { profile, message }) => {
            assert_eq!(profile, PROFILE);
            assert_eq!(message, REAUTH_MESSAGE);
        }
        Err(other) => panic!("expected ReauthRequired, got {other:?}"),
        Ok(t) => panic!("expected ReauthRequired, got generation {}", t.generation),
    }
}

async fn import(kind: Kind) {
    let Some(s) = setup(kind, 60).await else {
        return;
    };
    let (minted, token) = import_minted(&s).await;
    assert_eq!(token.access_token.expose(), str_of(&minted, "access_token"));
    assert_active(&s.idp, &token, "the imported token").await;

    let refreshed = s.client.refresh(PROFILE).await.unwrap();
    assert!(refreshed.generation > token.generation);
    assert_active(&s.idp, &refreshed, "the refreshed token").await;
    let stats = s.idp.stats().await;
    assert_eq!(
        (stats.refresh_grants, stats.refresh_errors, stats.replays),
        (1, 0, 0),
        "{stats:?}"
    );
    let state = s.client.status().await.unwrap();
    assert_eq!(state.profiles[0].refresh_count, 1, "{state:?}");
}

/// Three proactive refreshes of 4 s tokens while a watcher keeps the profile in
/// use: each new token is live at the server and arrives before its
/// predecessor expires; no replay, no error.
async fn refresh_across_lifetimes(kind: Kind) {
    const ROTATIONS: usize = 3;
    let Some(s) = setup(kind, 4).await else {
        return;
    };
    let (_, first) = import_minted(&s).await;
    let mut watch = s.client.watch(PROFILE).await.unwrap();
    let mut previous = first;
    let mut seen = 0;
    while seen < ROTATIONS {
        let event = tokio::time::timeout(PATIENCE, watch.next())
            .await
            .expect("no new token pushed in time");
        let token = match event {
            Some(Ok(WatchEvent::Token { token, .. })) => token,
            Some(Ok(_)) => continue,
            other => panic!("watch ended: {other:?}"),
        };
        if token.generation <= previous.generation {
            continue;
        }
        let arrived_ms = unix_ms();
        assert!(
            arrived_ms < previous.expires_at * 1000,
            "generation {} arrived {} ms after its predecessor expired",
            token.generation,
            arrived_ms - previous.expires_at * 1000
        );
        assert_active(&s.idp, &token, "a proactively refreshed token").await;
        if kind == Kind::Dot {
            // Like Hydra, DOT deletes the previous access token as it rotates.
            assert!(
                !s.idp.token_active(previous.access_token.expose()).await,
                "DOT kept generation {} alive after rotating it",
                previous.generation
            );
        }
        previous = token;
        seen += 1;
    }
    let stats = s.idp.stats().await;
    assert_eq!((stats.refresh_errors, stats.replays), (0, 0), "{stats:?}");
    // One grant per rotation; a fourth may have started while we looked.
    assert!(
        (ROTATIONS as u64..=ROTATIONS as u64 + 1).contains(&stats.refresh_grants),
        "{stats:?}"
    );
}

/// A forced refresh, then rounds of 200 concurrent invalidations of the current
/// generation from 4 connections: exactly one refresh per generation.
async fn forced_and_concurrent_refresh(kind: Kind) {
    const ROUNDS: u64 = 3;
    const CALLERS: usize = 200;
    let Some(s) = setup(kind, 60).await else {
        return;
    };
    let (_, token) = import_minted(&s).await;
    let forced = s.client.refresh(PROFILE).await.unwrap();
    assert!(forced.generation > token.generation);
    assert_eq!(s.idp.stats().await.refresh_grants, 1);

    let mut clients = vec![s.client.clone()];
    for _ in 1..4 {
        clients.push(connect(s.broker.socket()).await);
    }
    let mut current = forced;
    for round in 1..=ROUNDS {
        let calls = (0..CALLERS).map(|i| {
            let client = clients[i % clients.len()].clone();
            let stale = current.clone();
            async move { client.invalidate(PROFILE, &stale).await }
        });
        let answers = futures::future::join_all(calls).await;
        let generations: std::collections::BTreeSet<u64> = answers
            .into_iter()
            .map(|a| a.expect("invalidate").generation)
            .collect();
        assert_eq!(generations.len(), 1, "round {round}: {generations:?}");
        let next = *generations.first().unwrap();
        assert!(next > current.generation, "round {round}");
        let stats = s.idp.stats().await;
        assert_eq!(stats.refresh_grants, 1 + round, "round {round}: {stats:?}");
        current = s.client.get_token(PROFILE, Duration::ZERO).await.unwrap();
        assert_eq!(current.generation, next);
        assert_active(&s.idp, &current, "the token after the invalidations").await;
    }
    let stats = s.idp.stats().await;
    assert_eq!((stats.refresh_errors, stats.replays), (0, 0), "{stats:?}");
}

/// An administrator kills the grant: the next refresh fails once with
/// `invalid_grant`, the profile says reauth required, and nothing the clients
/// do afterwards reaches the server again.
async fn admin_revocation_means_reauth_once_then_silence(kind: Kind) {
    let Some(s) = setup(kind, 60).await else {
        return;
    };
    let (_, token) = import_minted(&s).await;
    s.idp
        .admin_revoke(s.idp.public_client(), token.access_token.expose())
        .await;
    assert!(!s.idp.token_active(token.access_token.expose()).await);
    let before = s.idp.stats().await;

    assert_reauth(s.client.refresh(PROFILE).await);
    let after = s.idp.stats().await;
    assert_eq!(after.refresh_grants, before.refresh_grants + 1, "{after:?}");
    assert_eq!(after.refresh_errors, before.refresh_errors + 1, "{after:?}");

    for _ in 0..10 {
        assert_reauth(s.client.get_token(PROFILE, Duration::ZERO).await);
        assert_reauth(s.client.invalidate(PROFILE, &token).await);
    }
    assert_reauth(s.client.refresh(PROFILE).await);
    for args in [&["token"][..], &["refresh"][..]] {
        let out = broker_ctl(s.broker.socket(), args).await;
        assert_eq!(out.status.code(), Some(4), "broker-ctl {args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("kontext login"));
    }
    let status = s.client.status().await.unwrap();
    assert_eq!(status.profiles[0].state, ProfileState::ReauthRequired);
    assert_eq!(s.idp.stats().await, after, "the server was called again");
    let log = s.broker.stderr();
    assert_eq!(log.matches("a new login is required").count(), 1, "{log}");
    assert_eq!(after.replays, 0, "{after:?}");
}

/// `kill -9` between refreshes loses nothing: the restarted broker serves the
/// persisted token without calling the server, then refreshes with the newest
/// refresh token (no replay).
async fn kill_9_and_restart(kind: Kind) {
    let Some(mut s) = setup(kind, 60).await else {
        return;
    };
    import_minted(&s).await;
    s.client.refresh(PROFILE).await.unwrap();
    let last = s.client.refresh(PROFILE).await.unwrap();
    let before = s.idp.stats().await;
    assert_eq!(before.refresh_grants, 2);

    tokio::task::block_in_place(|| {
        s.broker.sigkill();
        s.broker.wait_exit(PATIENCE);
        s.broker.restart();
    });
    let client = connect(s.broker.socket()).await;
    let served = client.get_token(PROFILE, Duration::ZERO).await.unwrap();
    assert_eq!(served.generation, last.generation);
    assert_eq!(served.access_token.expose(), last.access_token.expose());
    assert_eq!(s.idp.stats().await, before, "the restart called the server");

    let refreshed = client.refresh(PROFILE).await.unwrap();
    assert!(refreshed.generation > last.generation);
    assert_active(&s.idp, &refreshed, "the first token after the restart").await;
    let stats = s.idp.stats().await;
    assert_eq!(
        (stats.refresh_grants, stats.refresh_errors, stats.replays),
        (3, 0, 0),
        "{stats:?}"
    );
}

/// A running `broker-ctl login`: its stderr lines arrive on a channel.
struct CtlLogin {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    stderr_seen: Vec<String>,
}

impl CtlLogin {
    fn spawn(socket: &Path, args: &[String]) -> CtlLogin {
        let mut child = tokio::process::Command::new(broker_ctl_binary())
            .arg("--socket")
            .arg(socket)
            .arg("login")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn broker-ctl login");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = r.next_line().await {
                let _ = tx.send(line);
            }
        });
        CtlLogin {
            child,
            lines,
            stderr_seen: Vec::new(),
        }
    }

    /// The first stderr line that is a URL on its own; panics with everything
    /// said so far if the command ends first.
    async fn url(&mut self) -> Url {
        loop {
            let line = tokio::time::timeout(PATIENCE, self.lines.recv())
                .await
                .expect("broker-ctl login printed no URL");
            let Some(line) = line else {
                let out = self.child.wait().await;
                panic!(
                    "broker-ctl login ended ({out:?}) without a URL; stderr:\n{}",
                    self.stderr_seen.join("\n")
                );
            };
            self.stderr_seen.push(line.clone());
            if line.starts_with("http://") || line.starts_with("https://") {
                return Url::parse(&line).expect("the URL line is exactly a URL");
            }
        }
    }

    /// Waits for the command; returns its stdout, panicking unless it exited 0.
    async fn success(mut self) -> String {
        let mut stdout = String::new();
        use tokio::io::AsyncReadExt as _;
        let mut pipe = self.child.stdout.take().unwrap();
        let status = tokio::time::timeout(PATIENCE, async {
            pipe.read_to_string(&mut stdout).await.unwrap();
            self.child.wait().await.unwrap()
        })
        .await
        .expect("broker-ctl login did not finish");
        while let Ok(line) = self.lines.try_recv() {
            self.stderr_seen.push(line);
        }
        assert!(
            status.success(),
            "broker-ctl login: {status}; stdout {stdout:?}; stderr:\n{}",
            self.stderr_seen.join("\n")
        );
        stdout
    }
}

fn login_args(idp: &Server, client_id: &str, device: bool) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--profile".into(),
        PROFILE.into(),
        "--issuer".into(),
        idp.issuer().into(),
        "--client-id".into(),
        client_id.into(),
        "--no-browser".into(),
    ];
    if device {
        args.push("--device".into());
    }
    args.extend(idp.login_flags(device));
    args
}

/// After a login: the broker serves a live token and renews it.
async fn assert_logged_in(s: &Setup, client_id: &str) {
    let status = s.client.status().await.unwrap();
    let p = status.profiles.iter().find(|p| p.name == PROFILE).unwrap();
    assert_eq!(p.client_id, client_id);
    assert_eq!(p.state, ProfileState::Valid, "{p:?}");
    let token = s.client.get_token(PROFILE, Duration::ZERO).await.unwrap();
    assert_active(&s.idp, &token, "the token from the login").await;
    let refreshed = s.client.refresh(PROFILE).await.unwrap();
    assert!(refreshed.generation > token.generation);
    assert_active(&s.idp, &refreshed, "the refreshed token").await;
    let stats = s.idp.stats().await;
    assert_eq!(
        (stats.refresh_grants, stats.refresh_errors, stats.replays),
        (1, 0, 0),
        "{stats:?}"
    );
}

/// `broker-ctl login` (authorization code + PKCE on a loopback redirect) with
/// the server's default scopes: no `--scope` workaround.
async fn code_flow_login(kind: Kind) {
    let Some(s) = setup(kind, 60).await else {
        return;
    };
    let client_id = s.idp.public_client();
    let mut login = CtlLogin::spawn(s.broker.socket(), &login_args(&s.idp, client_id, false));
    let url = login.url().await;
    assert!(url
        .query_pairs()
        .any(|(k, v)| k == "code_challenge_method" && v == "S256"));
    let callback = s
        .idp
        .complete_login(url.as_str())
        .await
        .expect("login pages");
    let refused: Vec<String> = callback
        .query_pairs()
        .filter(|(k, _)| k == "error" || k == "error_description")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    assert!(
        refused.is_empty(),
        "{} refused the login: {refused:?}",
        s.idp.name()
    );
    let page = http_client().get(callback).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let out = login.success().await;
    assert!(out.starts_with("logged in profile `default`"), "{out}");
    assert_logged_in(&s, client_id).await;
}

/// `broker-ctl login --device` (RFC 8628); DOT needs its endpoint named.
async fn device_login(kind: Kind) {
    let Some(s) = setup(kind, 60).await else {
        return;
    };
    let client_id = s.idp.device_client();
    let mut login = CtlLogin::spawn(s.broker.socket(), &login_args(&s.idp, client_id, true));
    let url = login.url().await;
    s.idp.approve_device(&url).await.expect("device pages");
    let out = login.success().await;
    assert!(out.starts_with("logged in profile `default`"), "{out}");
    assert_logged_in(&s, client_id).await;
}

/// A confidential client with a secret full of characters HTTP Basic auth must
/// form-encode, imported with `broker-ctl import --client-secret-file`: the
/// broker authenticates every refresh, and the secret shows up nowhere.
async fn confidential_client(kind: Kind) {
    let Some(s) = setup(kind, 60).await else {
        return;
    };
    let (client_id, secret) = s.idp.confidential_client();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("client-secret");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let minted = s.idp.mint(client_id).await;

    let mut args: Vec<String> = vec![
        "--socket".into(),
        s.broker.socket().display().to_string(),
        "import".into(),
        "--issuer".into(),
        s.idp.issuer().into(),
        "--client-id".into(),
        client_id.into(),
        "--client-secret-file".into(),
        secret_file.display().to_string(),
    ];
    for scope in s.idp.grant_scopes() {
        args.extend(["--scope".to_owned(), scope.to_string()]);
    }
    let mut child = tokio::process::Command::new(broker_ctl_binary())
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // A broker-ctl that exits before reading (a usage error) breaks the pipe;
    // its exit status and stderr below say why.
    let _ = stdin.write_all(minted.to_string().as_bytes()).await;
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut last = s.client.get_token(PROFILE, Duration::ZERO).await.unwrap();
    for _ in 0..2 {
        let next = s.client.refresh(PROFILE).await.unwrap();
        assert!(next.generation > last.generation);
        assert_active(&s.idp, &next, "a confidential client's token").await;
        last = next;
    }
    let stats = s.idp.stats().await;
    assert_eq!(
        (stats.refresh_grants, stats.refresh_errors, stats.replays),
        (2, 0, 0),
        "{stats:?}"
    );
    let log = s.broker.stderr();
    assert!(!log.contains(secret), "the client secret reached the log");
}

/// `broker-ctl logout` revokes the refresh token (RFC 7009) at the revocation
/// endpoint from discovery, exits 0, and the server then calls both the
/// refresh token and its access token inactive.
async fn logout_revokes(kind: Kind) {
    let Some(s) = setup(kind, 60).await else {
        return;
    };
    let (minted, token) = import_minted(&s).await;
    let refresh_token = str_of(&minted, "refresh_token");
    assert!(s.idp.token_active(refresh_token).await);
    assert_active(&s.idp, &token, "the imported token").await;

    let out = broker_ctl(s.broker.socket(), &["logout"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "logout: {stdout} {stderr}");
    assert!(
        stdout.contains("refresh token revoked"),
        "{stdout} {stderr}"
    );
    assert!(
        !s.idp.token_active(refresh_token).await,
        "{}: the refresh token is still active after logout",
        s.idp.name()
    );
    assert!(
        !s.idp.token_active(token.access_token.expose()).await,
        "{}: the access token is still active after logout",
        s.idp.name()
    );
    let out = broker_ctl(s.broker.socket(), &["token"]).await;
    assert_eq!(out.status.code(), Some(6), "unknown profile after logout");
}
