//! Launcher for django-oauth-toolkit (DOT 3.4.1 on Python, from PyPI), the second
//! real authorization server, defined in `tests/dot/`. TEST FIXTURE ONLY.
//!
//! On first use it creates a venv under the target directory
//! (`target/dot-venv`, by `tests/dot/setup-venv.sh`: `python3 -m venv`, then
//! `pip install -r tests/dot/requirements.txt` and a migrated template database),
//! and reuses it while the requirements file is unchanged. Without `python3`
//! [`DotServer::start`] returns `None` so a developer's run skips the DOT cases
//! loudly, except under `CI`, where it panics: CI must never skip them.
//!
//! DOT is configured like Ory Hydra (rotation, reuse protection without grace,
//! PKCE, OpenID Connect with a fresh RS256 key); see `tests/idp/README.md` for
//! its quirks.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use url::Url;

use crate::oidc_provider::http_client;

/// The public client (`kontext-cli`): authorization code + PKCE, redirect
/// [`REDIRECT_URI`] on any loopback port.
pub const PUBLIC_CLIENT_ID: &str = "kontext-cli";
/// The public client for the device grant (one DOT application has one grant type).
pub const DEVICE_CLIENT_ID: &str = "kontext-device";
/// The confidential client: authorization code, authenticated with a secret.
pub const CONFIDENTIAL_CLIENT_ID: &str = "kontext-confidential";
/// The confidential client's secret: a fixed test value, mirrored in
/// `tests/dot/serve.py`, with characters that HTTP Basic auth must form-encode.
pub const CONFIDENTIAL_CLIENT_SECRET: &str = "kontext-dot secret:+/=%&?\"'-not-for-production";
/// Redirect URI registered for the code-flow clients (RFC 8252 §7.3: any port).
pub const REDIRECT_URI: &str = "http://127.0.0.1/callback";
/// The user the fixture's mint and login create; its login page accepts any name.
pub const SUBJECT: &str = "test-user";
/// Scopes DOT grants by default (its `DEFAULT_SCOPES`); `offline_access` is unknown to it.
pub const DEFAULT_SCOPES: &[&str] = &["read", "write"];

/// How long the server may take to print `READY` (Django start-up on a loaded
/// machine takes seconds). A safety net, not a budget.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// What the token endpoint saw (`GET /test/stats`, `tests/dot/kontext_dot/stats.py`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub struct DotStats {
    /// `grant_type=refresh_token` requests, failed ones included.
    pub refresh_token_grants: u64,
    /// Those that did not answer 200.
    pub refresh_token_grant_errors: u64,
    /// Refresh grants presenting an already rotated or revoked refresh token.
    pub refresh_token_replays: u64,
    /// Old access tokens DOT deleted while rotating.
    pub access_tokens_deleted_on_rotation: u64,
}

/// A running DOT server (waitress on 127.0.0.1); killed on drop.
#[derive(Debug)]
pub struct DotServer {
    issuer: String,
    base: String,
    _child: Child,
    /// Held open for the child's lifetime: the server exits when its stdin closes.
    _stdin: ChildStdin,
    /// Holds the sqlite database.
    _db_dir: tempfile::TempDir,
    http: reqwest::Client,
}

/// Directory of the Django project (`tests/dot`).
pub fn dot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("dot")
}

/// The cargo target directory of the running test (`target/<profile>/deps/<test>`
/// → `target`), or `$CARGO_TARGET_DIR`.
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .nth(3)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Where the venv lives: `$KONTEXT_DOT_VENV`, else `<target>/dot-venv`.
pub fn venv_dir() -> PathBuf {
    std::env::var_os("KONTEXT_DOT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("dot-venv"))
}

/// Whether `python3` runs.
fn python3_available() -> bool {
    std::process::Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes sure the venv exists and matches `requirements.txt`; returns its path,
/// or `None` when `python3` is missing outside CI. Once per process; across
/// processes (test binaries run in parallel) a lock file serialises the set-up.
fn ensure_venv() -> Option<PathBuf> {
    static VENV: OnceLock<Option<PathBuf>> = OnceLock::new();
    VENV.get_or_init(|| {
        if !python3_available() {
            assert!(
                std::env::var_os("CI").is_none(),
                "python3 is missing: the django-oauth-toolkit tests need it (CI installs it in .ci/run)"
            );
            eprintln!(
                "SKIPPING the django-oauth-toolkit cases: python3 is not on PATH (install python3 and python3-venv)"
            );
            return None;
        }
        let venv = venv_dir();
        if let Some(parent) = venv.parent() {
            std::fs::create_dir_all(parent).expect("create the venv's parent directory");
        }
        let lock_path = venv.with_extension("lock");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", lock_path.display()));
        let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("lock {}: {e}", lock_path.display()));
        let started = Instant::now();
        let out = std::process::Command::new("sh")
            .arg(dot_dir().join("setup-venv.sh"))
            .arg(&venv)
            .stdin(Stdio::null())
            .output()
            .expect("run tests/dot/setup-venv.sh");
        assert!(
            out.status.success(),
            "tests/dot/setup-venv.sh {} failed ({}); is python3-venv installed and PyPI reachable?\n{}{}",
            venv.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        if said.contains("created") {
            eprintln!(
                "FIGURE django-oauth-toolkit venv created in {:?}: {}",
                started.elapsed(),
                said.trim()
            );
        }
        Some(venv)
    })
    .clone()
}

impl DotServer {
    /// Starts DOT on a port the OS picks, with access tokens living
    /// `access_ttl_secs`, and waits for its `READY` line. `None` when `python3` is
    /// missing outside CI (see the module doc). Panics on any other set-up error.
    pub async fn start(access_ttl_secs: u64) -> Option<DotServer> {
        let venv = tokio::task::spawn_blocking(ensure_venv)
            .await
            .expect("venv set-up panicked")?;
        Some(spawn(&venv, access_ttl_secs).await)
    }

    /// The issuer, `http://127.0.0.1:PORT/o` (no trailing slash).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The server's origin, `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The token endpoint.
    pub fn token_endpoint(&self) -> String {
        format!("{}/token/", self.issuer)
    }

    /// The device authorization endpoint, which DOT lists in no discovery document.
    pub fn device_authorization_endpoint(&self) -> String {
        format!("{}/device-authorization/", self.issuer)
    }

    /// The RFC 7009 revocation endpoint (listed only in DOT's RFC 8414 document).
    pub fn revocation_endpoint(&self) -> String {
        format!("{}/revoke_token/", self.issuer)
    }

    /// Mints a token family for `client_id` and [`SUBJECT`] through the test-only
    /// route and returns its RFC 6749 §5.1 token response (no `id_token`).
    pub async fn mint(&self, client_id: &str, scopes: &[&str]) -> Value {
        let scope = scopes.join(" ");
        let resp = self
            .http
            .post(format!("{}/test/mint", self.base))
            .form(&[
                ("client_id", client_id),
                ("scope", scope.as_str()),
                ("sub", SUBJECT),
            ])
            .send()
            .await
            .expect("POST /test/mint");
        let status = resp.status();
        let body: Value = resp.json().await.expect("mint answers JSON");
        assert!(status.is_success(), "mint failed with {status}: {body}");
        body
    }

    /// The token endpoint counters since this server started.
    pub async fn stats(&self) -> DotStats {
        let resp = self
            .http
            .get(format!("{}/test/stats", self.base))
            .send()
            .await
            .expect("GET /test/stats");
        assert!(resp.status().is_success(), "stats: {}", resp.status());
        resp.json().await.expect("stats answer JSON")
    }

    /// Deletes every refresh and access token of `client_id` for [`SUBJECT`], as an
    /// administrator would; returns how many refresh tokens were deleted.
    pub async fn revoke_grant(&self, client_id: &str) -> u64 {
        let resp = self
            .http
            .post(format!("{}/test/revoke-grant", self.base))
            .form(&[("client_id", client_id), ("sub", SUBJECT)])
            .send()
            .await
            .expect("POST /test/revoke-grant");
        assert!(
            resp.status().is_success(),
            "revoke-grant: {}",
            resp.status()
        );
        let body: Value = resp.json().await.expect("revoke-grant answers JSON");
        body["refresh_tokens"].as_u64().unwrap_or(0)
    }

    /// Whether DOT would accept `token` now: an unexpired access token, or a
    /// refresh token that is neither rotated nor revoked.
    pub async fn token_active(&self, token: &str) -> bool {
        let resp = self
            .http
            .post(format!("{}/test/active", self.base))
            .form(&[("token", token)])
            .send()
            .await
            .expect("POST /test/active");
        assert!(resp.status().is_success(), "active: {}", resp.status());
        let body: Value = resp.json().await.expect("active answers JSON");
        body["active"].as_bool().unwrap_or(false)
    }
}

/// Buttons a user presses on DOT's pages: "Authorize" on the consent page,
/// "Accept" on the device confirmation page.
const PRESS: &[(&str, &str)] = &[("allow", "Authorize"), ("action", "accept")];

/// Completes an authorization-code login on DOT's pages (the fixture's login
/// page, then DOT's consent page) from `authorization_url`, and returns the
/// redirect to the client's `redirect_uri` without requesting it.
pub async fn complete_login(authorization_url: &str) -> anyhow::Result<Url> {
    let start = Url::parse(authorization_url)?;
    match crate::html_form::drive_pressing(start, &Default::default(), PRESS).await? {
        crate::html_form::Outcome::Redirected(url) => Ok(url),
        crate::html_form::Outcome::Page { url, html } => {
            anyhow::bail!(
                "login ended on {url} without a redirect: {}",
                excerpt(&html)
            )
        }
    }
}

/// Approves a device authorization as the user would: opens `verification_url`
/// (the complete URI, with `user_code`), logs in, confirms the code and accepts.
pub async fn approve_device(verification_url: &Url, user_code: &str) -> anyhow::Result<()> {
    let fields = std::collections::HashMap::from([("user_code", user_code)]);
    match crate::html_form::drive_pressing(verification_url.clone(), &fields, PRESS).await? {
        crate::html_form::Outcome::Page { html, .. } if html.contains("Device Authorized") => {
            Ok(())
        }
        crate::html_form::Outcome::Page { url, html } => {
            anyhow::bail!("device approval ended on {url}: {}", excerpt(&html))
        }
        crate::html_form::Outcome::Redirected(url) => {
            anyhow::bail!("device approval left DOT for {url}")
        }
    }
}

/// The first few hundred characters of a page, for error messages.
fn excerpt(html: &str) -> String {
    html.chars().take(400).collect()
}

/// Spawns `serve.py` and waits for `READY`.
async fn spawn(venv: &Path, access_ttl_secs: u64) -> DotServer {
    let db_dir = tempfile::tempdir().expect("tempdir for the DOT database");
    let mut child = Command::new(venv.join("bin").join("python"))
        .arg("-u")
        .arg("serve.py")
        .current_dir(dot_dir())
        .env("PORT", "0")
        .env("DOT_ACCESS_TOKEN_TTL", access_ttl_secs.to_string())
        .env("DOT_DB", db_dir.path().join("db.sqlite3"))
        .env("DOT_TEMPLATE_DB", venv.join("migrated.sqlite3"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}/bin/python serve.py: {e}", venv.display()));
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[dot] {line}");
        }
    });
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(READY_TIMEOUT, async {
        while let Some(line) = lines.next_line().await.ok().flatten() {
            if let Some(issuer) = line.strip_prefix("READY ") {
                return Some(issuer.trim().to_owned());
            }
            eprintln!("[dot] {line}");
        }
        None
    })
    .await;
    let issuer = match ready {
        Ok(Some(issuer)) => issuer,
        Ok(None) => panic!(
            "the DOT server exited before READY ({:?}); see its stderr above",
            child.wait().await
        ),
        Err(_) => panic!("the DOT server printed no READY line within {READY_TIMEOUT:?}"),
    };
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[dot] {line}");
        }
    });
    let base = issuer
        .strip_suffix("/o")
        .unwrap_or_else(|| panic!("DOT printed an unexpected issuer {issuer:?}"))
        .to_owned();
    DotServer {
        issuer,
        base,
        _child: child,
        _stdin: stdin,
        _db_dir: db_dir,
        http: http_client(),
    }
}
