//! Launcher for the real, certified OpenID Provider (`oidc-provider` on Node),
//! defined in `tests/idp/provider.mjs`. TEST FIXTURE ONLY.
//!
//! Needs `node` on `PATH` and `npm ci --prefix tests/idp` run once.
//! The provider keeps everything in memory, so [`OidcProvider::restart`] kills
//! every grant: all refresh tokens then answer `invalid_grant`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};

/// The public native client (`token_endpoint_auth_method: none`) registered in
/// the provider, with the authorization code, refresh and device code grants and
/// the loopback redirect `http://127.0.0.1:8765/callback` (any port works).
pub const PUBLIC_CLIENT_ID: &str = "kontext-cli";
/// The confidential client (`client_secret_basic`), same grants and redirect.
pub const CONFIDENTIAL_CLIENT_ID: &str = "kontext-confidential";
/// The confidential client's secret: a fixed test value, mirrored in provider.mjs.
pub const CONFIDENTIAL_CLIENT_SECRET: &str = "kontext-confidential-test-secret-not-for-production";
/// A confidential client fixed to `client_secret_post` (same secret and grants as
/// [`CONFIDENTIAL_CLIENT_ID`]), although discovery lists both secret methods.
pub const POST_CLIENT_ID: &str = "kontext-post";
/// Redirect URI registered for both clients.
pub const REDIRECT_URI: &str = "http://127.0.0.1:8765/callback";

/// How long the provider may take to print `READY`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `oidc-provider` child process; killed on drop.
#[derive(Debug)]
pub struct OidcProvider {
    issuer: String,
    port: u16,
    access_ttl_secs: u64,
    child: Child,
    /// Held open for the child's lifetime: the provider exits when its stdin
    /// closes, so even a SIGKILLed test run leaves no orphan node process.
    _stdin: ChildStdin,
    http: reqwest::Client,
}

/// Directory of the Node project (`tests/idp`).
pub fn idp_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("idp")
}

/// A reqwest client for talking to loopback fixtures: no proxy, no redirects.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15))
        .build()
        .expect("build reqwest client")
}

impl OidcProvider {
    /// Spawns `node tests/idp/provider.mjs` on a port the OS picks, with access
    /// tokens living `access_ttl_secs`, and waits for its `READY` line.
    ///
    /// Panics if `tests/idp/node_modules` is missing, or the provider fails to start.
    pub async fn start(access_ttl_secs: u64) -> OidcProvider {
        let (child, stdin, issuer) = spawn(access_ttl_secs, 0)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = url::Url::parse(&issuer)
            .ok()
            .and_then(|u| u.port())
            .unwrap_or_else(|| panic!("provider printed a bad issuer {issuer:?}"));
        OidcProvider {
            issuer,
            port,
            access_ttl_secs,
            child,
            _stdin: stdin,
            http: http_client(),
        }
    }

    /// The issuer URL, `http://127.0.0.1:PORT` (no trailing slash).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The token endpoint.
    pub fn token_endpoint(&self) -> String {
        format!("{}/token", self.issuer)
    }

    /// Mints a grant for `client_id` (subject `test-user`) through the fixture's
    /// test-only route and returns its RFC 6749 §5.1 token response
    /// (`access_token`, `token_type`, `expires_in`, `refresh_token`, `scope`, and
    /// an `id_token` signed by the provider when `scopes` has `openid`).
    pub async fn mint(&self, client_id: &str, scopes: &[&str]) -> Value {
        self.mint_for(client_id, scopes, "test-user").await
    }

    /// Like [`OidcProvider::mint`], for the subject `sub`.
    pub async fn mint_for(&self, client_id: &str, scopes: &[&str], sub: &str) -> Value {
        let scope = scopes.join(" ");
        let resp = self
            .http
            .post(format!("{}/test/mint", self.issuer))
            .form(&[
                ("client_id", client_id),
                ("scope", scope.as_str()),
                ("sub", sub),
            ])
            .send()
            .await
            .expect("POST /test/mint");
        let status = resp.status();
        let body: Value = resp.json().await.expect("mint answers JSON");
        assert!(status.is_success(), "mint failed with {status}: {body}");
        body
    }

    /// Status of `GET /me` (userinfo) with this bearer token: 200 when the
    /// provider accepts it, 401 when it is expired, revoked or unknown.
    pub async fn userinfo_status(&self, access_token: &str) -> u16 {
        self.http
            .get(format!("{}/me", self.issuer))
            .bearer_auth(access_token)
            .send()
            .await
            .expect("GET /me")
            .status()
            .as_u16()
    }

    /// Whether RFC 7662 introspection (as the confidential client) says `active`.
    pub async fn introspect_active(&self, token: &str) -> bool {
        let resp = self
            .http
            .post(format!("{}/token/introspection", self.issuer))
            .basic_auth(CONFIDENTIAL_CLIENT_ID, Some(CONFIDENTIAL_CLIENT_SECRET))
            .form(&[("token", token)])
            .send()
            .await
            .expect("POST /token/introspection");
        let status = resp.status();
        let body: Value = resp.json().await.expect("introspection answers JSON");
        assert!(
            status.is_success(),
            "introspection failed with {status}: {body}"
        );
        body["active"].as_bool().unwrap_or(false)
    }

    /// Registers a client dynamically (RFC 7591): `metadata` (a JSON object) over
    /// native-app defaults with the code and refresh grants and the loopback
    /// redirect. Returns the registration response (`client_id`, `client_secret`...).
    pub async fn register(&self, metadata: Value) -> Value {
        let mut body = serde_json::json!({
            "application_type": "native",
            "redirect_uris": [REDIRECT_URI],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
        });
        for (k, v) in metadata.as_object().expect("metadata is an object") {
            body[k] = v.clone();
        }
        let resp = self
            .http
            .post(format!("{}/reg", self.issuer))
            .json(&body)
            .send()
            .await
            .expect("POST /reg");
        let status = resp.status();
        let answer: Value = resp.json().await.expect("registration answers JSON");
        assert!(
            status.is_success(),
            "registration failed with {status}: {answer}"
        );
        answer
    }

    /// Changes a dynamically registered client's secret, as an admin rotating it
    /// at the IdP would (test-only route `POST /test/client-secret`).
    pub async fn set_client_secret(&self, client_id: &str, secret: &str) {
        let resp = self
            .http
            .post(format!("{}/test/client-secret", self.issuer))
            .form(&[("client_id", client_id), ("client_secret", secret)])
            .send()
            .await
            .expect("POST /test/client-secret");
        assert_eq!(resp.status().as_u16(), 204, "changing the client secret");
    }

    /// How many calls of `client_id` to the token, revocation and device
    /// endpoints carried client authentication `method` (`client_secret_basic`,
    /// `client_secret_post`, `private_key_jwt`, `none`), counted by the provider.
    pub async fn client_auth_calls(&self, client_id: &str, method: &str) -> u64 {
        let stats: Value = self
            .http
            .get(format!("{}/test/stats", self.issuer))
            .send()
            .await
            .expect("GET /test/stats")
            .json()
            .await
            .expect("stats answer JSON");
        stats["client_auth"][client_id][method]
            .as_u64()
            .unwrap_or(0)
    }

    /// Stops the provider and starts a new one on the same port and issuer.
    /// Storage is in memory, so every grant and refresh token is gone afterwards.
    pub async fn restart(&mut self) {
        self.child.start_kill().ok();
        self.child.wait().await.expect("wait for the old provider");
        // The port was ours a moment ago, but another process may grab it in
        // between; retry a few times before giving up.
        let mut attempt = 0;
        let (child, stdin, issuer) = loop {
            attempt += 1;
            match spawn(self.access_ttl_secs, self.port).await {
                Ok(spawned) => break spawned,
                Err(e) if attempt < 10 => {
                    eprintln!("[oidc-provider] restart attempt {attempt} failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(issuer, self.issuer, "restarted provider changed its issuer");
        self.child = child;
        self._stdin = stdin;
    }
}

/// Spawns the provider and waits for `READY`. Panics on set-up errors (no
/// node_modules, no node); returns `Err` when the child dies or stays silent.
async fn spawn(access_ttl_secs: u64, port: u16) -> Result<(Child, ChildStdin, String), String> {
    let dir = idp_dir();
    assert!(
        dir.join("node_modules").join("oidc-provider").is_dir(),
        "{}/node_modules is missing: run `npm ci --prefix tests/idp` first",
        dir.display()
    );
    let mut child = Command::new("node")
        .arg("provider.mjs")
        .current_dir(&dir)
        .env("PORT", port.to_string())
        .env("ACCESS_TOKEN_TTL", access_ttl_secs.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn `node provider.mjs` (is node on PATH?): {e}"));
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");

    // Forward stderr to the test's stderr, minus the noise it always prints: the
    // start-up warnings (Node 20 runtime, in-memory adapter, dev keys,
    // devInteractions) and "default function called" notices.
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if !line.starts_with("oidc-provider WARNING:")
                && !line.starts_with("oidc-provider NOTICE:")
            {
                eprintln!("[oidc-provider] {line}");
            }
        }
    });

    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(READY_TIMEOUT, async {
        while let Some(line) = lines.next_line().await.ok().flatten() {
            if let Some(issuer) = line.strip_prefix("READY ") {
                return Some(issuer.trim().to_owned());
            }
            eprintln!("[oidc-provider] {line}");
        }
        None
    })
    .await;
    let issuer = match ready {
        Ok(Some(issuer)) => issuer,
        Ok(None) => {
            return Err(format!(
                "oidc-provider exited before READY ({:?}); see its stderr above",
                child.wait().await
            ))
        }
        // `child` is killed on drop.
        Err(_) => {
            return Err(format!(
                "oidc-provider printed no READY line within {READY_TIMEOUT:?}"
            ))
        }
    };
    // Keep draining stdout so the child can never block on a full pipe.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[oidc-provider] {line}");
        }
    });
    Ok((child, stdin, issuer))
}
