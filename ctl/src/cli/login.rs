//! `broker-ctl login` (docs/contract.md §6): run the OAuth flow in this process and import
//! the result into the running broker.
//!
//! The broker is pinged before anything else, so no browser opens for a login
//! that could not be stored. Instructions and the URL go to stderr (messages);
//! the one-line summary goes to stdout (data), like `import`. Ctrl-C cancels
//! the login (exit 130, nothing stored); `--timeout` bounds the wait for the user.

use std::io::Write;
use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use kontext_broker_protocol::{paths, ClientCredential, ImportRequest, DEFAULT_PROFILE};

use super::render::escape_controls;
use super::{connect, exit, rfc3339, CredentialArgs, Failure};
use crate::login::{self, Flow, LoginError, LoginOptions, LoginUi};
use kontext_broker::config::Config;
use kontext_broker::idp::Http;

/// Arguments of `broker-ctl login`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoginArgs {
    #[arg(long, default_value = DEFAULT_PROFILE)]
    pub profile: String,
    /// Issuer URL (https://, or http:// on loopback).
    #[arg(long, value_name = "URL")]
    pub issuer: String,
    /// OAuth client id (required unless --register).
    #[arg(
        long,
        value_name = "ID",
        // Generated ids may start with '-' (base64url): never a flag here.
        allow_hyphen_values = true,
        required_unless_present = "register",
        conflicts_with = "register"
    )]
    pub client_id: Option<String>,
    /// The client's credential (not with --register, which makes a public client).
    #[command(flatten)]
    pub credential: CredentialArgs,
    /// Scope (repeatable); default `openid`. `offline_access` is added unless
    /// the server lists scopes without it.
    #[arg(long = "scope", value_name = "S")]
    pub scopes: Vec<String>,
    #[command(flatten)]
    pub endpoints: super::endpoints::EndpointArgs,
    /// Use the device authorization grant (RFC 8628) instead of a browser redirect.
    #[arg(long)]
    pub device: bool,
    /// Do not start a browser; only print the URL.
    #[arg(long)]
    pub no_browser: bool,
    /// Register a new public client first (RFC 7591 dynamic registration).
    #[arg(long)]
    pub register: bool,
    /// How long to wait for the user to finish in the browser (or approve the device code).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout: u64,
}

/// Default of `--timeout`, in seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = crate::login::DEFAULT_TIMEOUT.as_secs();

/// Longest wait, after the outcome is printed, for the login's background work
/// (the browser's answer page, revoking refused tokens) before the process exits.
pub const BACKGROUND_GRACE: Duration = Duration::from_secs(20);

/// Work a login leaves behind in this process; see [`finish_background`].
static BACKGROUND: LazyLock<TaskTracker> = LazyLock::new(TaskTracker::new);

/// Waits (at most [`BACKGROUND_GRACE`]) for the work logins left behind.
pub async fn finish_background() {
    BACKGROUND.close();
    let _ = tokio::time::timeout(BACKGROUND_GRACE, BACKGROUND.wait()).await;
}

/// Prints the flow's instructions to the message stream (stderr).
struct TerminalUi<'a> {
    err: &'a mut (dyn Write + Send),
    browser: bool,
}

impl LoginUi for TerminalUi<'_> {
    fn show_url(&mut self, url: &str) {
        let intro = if self.browser {
            "Opening a browser to log in. If none opens, visit this URL:"
        } else {
            "Open this URL in a browser to log in:"
        };
        let _ = writeln!(self.err, "{intro}\n{}", escape_controls(url));
        let _ = self.err.flush();
    }

    fn show_device_code(
        &mut self,
        verification_uri: &str,
        user_code: &str,
        complete_uri: Option<&str>,
    ) {
        // The device authorization response is IdP text.
        let verification_uri = escape_controls(verification_uri);
        let user_code = escape_controls(user_code);
        let complete_uri = complete_uri.map(escape_controls);
        let _ = match complete_uri {
            Some(complete) => writeln!(
                self.err,
                "Open this URL in a browser on any device to log in:\n{complete}\n(or open {verification_uri} and enter the code {user_code})"
            ),
            None => writeln!(
                self.err,
                "Open this URL in a browser on any device:\n{verification_uri}\nand enter the code {user_code}"
            ),
        };
        let _ = self.err.flush();
    }

    fn notice(&mut self, message: &str) {
        let _ = writeln!(self.err, "{}", escape_controls(message));
    }
}

/// The exit code for a failed login flow.
fn failure(e: LoginError) -> Failure {
    let code = match &e {
        e if e.is_transient() => exit::IDP_UNAVAILABLE,
        LoginError::Usage(_) => exit::USAGE,
        LoginError::ClientRejected { .. } => exit::CLIENT_REJECTED,
        _ => exit::OTHER,
    };
    Failure {
        code,
        message: e.to_string().replace('\n', " "),
    }
}

/// Runs `broker-ctl login`: messages (and the URL) to `err`, the summary to
/// `out`. SIGINT (Ctrl-C) during the flow ends it with [`exit::CANCELLED`].
pub async fn run(
    args: LoginArgs,
    socket: Option<&Path>,
    out: &mut dyn Write,
    err: &mut (dyn Write + Send),
) -> Result<(), Failure> {
    // Installed first, so a Ctrl-C at any point of the flow is ours to report.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| Failure::other(format!("cannot watch for Ctrl-C: {e}")))?;
    let cancelled = async move {
        interrupt.recv().await;
    };
    run_until(args, socket, out, err, cancelled).await
}

/// [`run`], cancelled when `cancelled` completes instead of on SIGINT.
pub async fn run_until(
    args: LoginArgs,
    socket: Option<&Path>,
    out: &mut dyn Write,
    err: &mut (dyn Write + Send),
    cancelled: impl std::future::Future<Output = ()>,
) -> Result<(), Failure> {
    let timeout = Duration::from_secs(args.timeout);
    if !paths::is_valid_profile_name(&args.profile) {
        return Err(Failure {
            code: exit::USAGE,
            message: format!(
                "invalid profile name `{}`: use 1-64 of A-Z a-z 0-9 . _ - and do not start with `.`",
                args.profile
            ),
        });
    }
    // First: is there a broker to hand the tokens to?
    let broker = connect(socket).await?;
    broker.ping().await?;

    let config = Config::load(paths::config_path(None).as_deref())
        .map_err(|e| Failure::other(e.to_string()))?;
    let http = Http::new(
        Duration::from_secs(config.http_connect_timeout_secs),
        Duration::from_secs(config.http_timeout_secs),
        &config.extra_root_certs,
    )
    .map_err(|e| Failure::other(e.to_string()))?;
    if args.register
        && (args.credential.client_secret_file.is_some()
            || args.credential.client_key_file.is_some())
    {
        return Err(Failure {
            code: exit::USAGE,
            message:
                "--register makes a public client; drop --client-secret-file/--client-key-file"
                    .into(),
        });
    }
    let (client_secret, client_key) = match args.credential.read()? {
        ClientCredential::Secret(s) => (Some(s), None),
        ClientCredential::PrivateKey(k) => (None, Some(k)),
        ClientCredential::None => (None, None),
    };
    // The flag wins; else the config file's setting for this profile.
    let client_auth = args
        .credential
        .client_auth
        .or_else(|| config.client_auth_for(&args.profile));
    let flow = if args.device {
        Flow::Device
    } else {
        Flow::CodePkce {
            open_browser: !args.no_browser,
        }
    };
    // Flags win over the profile's config table; the broker applies the same rule.
    let endpoints = config.merged_overrides(&args.profile, &args.endpoints.overrides());
    let opts = LoginOptions {
        endpoints: endpoints.clone(),
        client_id: args.client_id.clone(),
        client_secret,
        client_key,
        client_auth,
        scopes: args.scopes.clone(),
        flow,
        register: args.register,
        timeout,
        profile: Some(args.profile.clone()),
        tasks: BACKGROUND.clone(),
        ..LoginOptions::new(args.issuer.clone())
    };
    let mut ui = TerminalUi {
        err,
        browser: !args.no_browser && !args.device,
    };
    let outcome = tokio::select! {
        outcome = login::login(&http, opts, &mut ui) => outcome.map_err(failure)?,
        () = cancelled => {
            return Err(Failure {
                code: exit::CANCELLED,
                message: "login cancelled (Ctrl-C); nothing was stored".into(),
            })
        }
    };

    let status = broker
        .import(ImportRequest {
            profile: args.profile.clone(),
            issuer: args.issuer.clone(),
            client_id: outcome.client_id.clone(),
            credential: match (outcome.client_key, outcome.client_secret) {
                (Some(key), _) => ClientCredential::PrivateKey(key),
                (None, Some(secret)) => ClientCredential::Secret(secret),
                (None, None) => ClientCredential::None,
            },
            client_auth: outcome.client_auth,
            scopes: outcome.scopes,
            endpoints,
            token_response: outcome.token_response,
        })
        .await?;
    let who = outcome
        .subject
        .map(|s| format!(" as {}", kontext_broker::idp::sanitize::text(&s)))
        .unwrap_or_default();
    writeln!(
        out,
        "logged in profile `{}`{who} (client {}); access token expires {}",
        status.name,
        outcome.client_id,
        status
            .access_token_expires_at
            .map_or_else(|| "-".to_owned(), rfc3339)
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};

    fn parse(args: &[&str]) -> Result<super::LoginArgs, clap::Error> {
        Cli::try_parse_from([&["broker-ctl", "login"], args].concat()).map(|cli| {
            match cli.command {
                Command::Login(a) => a,
                other => panic!("parsed as {other:?}"),
            }
        })
    }

    #[test]
    fn client_id_is_required_unless_register() {
        let e = parse(&["--issuer", "https://idp.example"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let a = parse(&["--issuer", "https://idp.example", "--register", "--device"]).unwrap();
        assert!(a.register && a.device && a.client_id.is_none());
        assert_eq!(a.profile, "default");
        let e = parse(&["--issuer", "x", "--client-id", "c", "--register"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn a_client_id_may_start_with_a_hyphen() {
        // oidc-provider's generated ids are base64url, so some start with '-'.
        let a = parse(&["--issuer", "https://idp.example", "--client-id", "-dX4q"]).unwrap();
        assert_eq!(a.client_id.as_deref(), Some("-dX4q"));
    }

    #[test]
    fn all_spec_flags_parse() {
        let a = parse(&[
            "--issuer",
            "https://idp.example",
            "--client-id",
            "c",
            "--client-secret-file",
            "/dev/null",
            "--scope",
            "a",
            "--scope",
            "b",
            "--no-browser",
            "--profile",
            "p",
            "--token-endpoint",
            "https://idp.example/token",
            "--revocation-endpoint",
            "https://idp.example/revoke",
            "--device-authorization-endpoint",
            "http://127.0.0.1:9/device",
        ])
        .unwrap();
        let o = a.endpoints.overrides();
        assert_eq!(o.token.as_deref(), Some("https://idp.example/token"));
        assert_eq!(o.revocation.as_deref(), Some("https://idp.example/revoke"));
        assert_eq!(
            o.device_authorization.as_deref(),
            Some("http://127.0.0.1:9/device")
        );
        // Endpoint flags obey the issuer rule: a plain-http remote URL is a usage error.
        let e = parse(&[
            "--issuer",
            "https://idp.example",
            "--client-id",
            "c",
            "--revocation-endpoint",
            "http://idp.example/revoke",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        assert_eq!(a.scopes, ["a", "b"]);
        assert!(a.no_browser && !a.device);
        assert_eq!(a.profile, "p");
        assert_eq!(a.client_id.as_deref(), Some("c"));
        assert!(Cli::try_parse_from(["broker-ctl", "doctor"]).is_ok());
    }

    #[test]
    fn credential_flags_parse_and_conflict() {
        let a = parse(&[
            "--issuer",
            "https://idp.example",
            "--client-id",
            "c",
            "--client-key-file",
            "/k.pem",
            "--client-auth",
            "private_key_jwt",
        ])
        .unwrap();
        assert_eq!(
            a.credential.client_key_file.as_deref(),
            Some(std::path::Path::new("/k.pem"))
        );
        assert_eq!(
            a.credential.client_auth,
            Some(kontext_broker_protocol::ClientAuthMethod::PrivateKeyJwt)
        );
        let e = parse(&[
            "--issuer",
            "x",
            "--client-id",
            "c",
            "--client-secret-file",
            "/s",
            "--client-key-file",
            "/k",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        let e = parse(&[
            "--issuer",
            "x",
            "--client-id",
            "c",
            "--client-auth",
            "basic",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        let client = Cli::try_parse_from([
            "broker-ctl",
            "client",
            "--profile",
            "p",
            "--client-secret-file",
            "/s",
            "--client-auth",
            "client_secret_post",
        ])
        .unwrap();
        assert!(matches!(client.command, Command::Client { .. }));
    }
}
