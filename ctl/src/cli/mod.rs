//! `broker-ctl`: the command line for users and scripts (contract §7).
//!
//! Data goes to stdout; every failure is one line on stderr naming the cause and
//! the fix, and the exit code says which kind of failure it was (see [`exit`]).

mod args;
pub mod doctor;
pub mod endpoints;
pub mod fast;
pub mod login;
mod logout;
mod render;

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{CommandFactory, Parser};
use futures::StreamExt;
use kontext_broker_client::{BrokerClient, Error as ClientError};
use kontext_broker_protocol::{
    paths, ImportRequest, Request, Response, Secret, SetClientRequest, Token,
};

pub use args::{Cli, Command, CredentialArgs};
pub use render::{escape_controls, rfc3339, status_json, status_table, watch_json, watch_line};

/// Exit codes of `broker-ctl` (contract §7). Scripts rely on these numbers.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Any failure without a more specific code.
    pub const OTHER: u8 = 1;
    /// Bad command line (clap's own exit code).
    pub const USAGE: u8 = 2;
    /// Broker not running, unreachable (socket I/O error), timed out, or refused
    /// as a foreign peer.
    pub const UNREACHABLE: u8 = 3;
    /// The profile needs a new login.
    pub const REAUTH_REQUIRED: u8 = 4;
    /// The identity provider is unavailable and no valid token is cached.
    pub const IDP_UNAVAILABLE: u8 = 5;
    /// No such profile.
    pub const UNKNOWN_PROFILE: u8 = 6;
    /// The broker's store is locked.
    pub const LOCKED: u8 = 7;
    /// The IdP rejected the profile's client credential; the grant is kept.
    pub const CLIENT_REJECTED: u8 = 8;
    /// `logout` deleted the profile locally, but its refresh token was not
    /// revoked at the IdP (no revocation endpoint known, or the call failed).
    pub const NOT_REVOKED: u8 = 9;
    /// The user cancelled (Ctrl-C during `login`): 128 + SIGINT, as shells report it.
    pub const CANCELLED: u8 = 130;
}

/// The exit code for a client error.
pub fn exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::BrokerNotRunning { .. }
        | ClientError::PeerRejected { .. }
        | ClientError::Timeout
        | ClientError::Disconnected
        | ClientError::Io(_) => exit::UNREACHABLE,
        ClientError::ReauthRequired { .. } => exit::REAUTH_REQUIRED,
        ClientError::Unavailable { .. } => exit::IDP_UNAVAILABLE,
        ClientError::UnknownProfile { .. } => exit::UNKNOWN_PROFILE,
        ClientError::Locked => exit::LOCKED,
        ClientError::ClientRejected { .. } => exit::CLIENT_REJECTED,
        ClientError::VersionMismatch { .. }
        | ClientError::BadRequest { .. }
        | ClientError::Internal { .. }
        | ClientError::Protocol(_) => exit::OTHER,
    }
}

/// A failure: the exit code and the one-line message for stderr.
#[derive(Debug)]
pub struct Failure {
    /// Process exit code, from [`exit`].
    pub code: u8,
    /// Cause and fix, on one line, without the `broker-ctl: ` prefix.
    pub message: String,
}

impl Failure {
    fn other(message: impl Into<String>) -> Self {
        Failure {
            code: exit::OTHER,
            message: message.into(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure {
            code: exit_code(&e),
            // Error messages may span lines (broker detail); keep stderr to one.
            message: e.to_string().replace('\n', " "),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::other(format!("cannot write output: {e}"))
    }
}

/// Entry point of the `broker-ctl` binary.
pub fn main() -> ExitCode {
    // broker-ctl handles passphrases, token responses and access tokens too:
    // no core dumps, no ptrace by other processes of this user.
    let _ = kontext_broker::hardening::harden_process();
    let mut stdout = std::io::stdout();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(token) = fast::parse_token(&args) {
        return finish(fast::token(&token, &mut stdout), &mut stdout);
    }
    let cli = Cli::parse(); // exits 2 on usage errors
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("broker-ctl: cannot start the async runtime: {e}");
            return ExitCode::from(exit::OTHER);
        }
    };
    let mut stdin = std::io::stdin();
    let result = rt.block_on(run(cli, &mut stdin, &mut stdout));
    let code = finish(result, &mut stdout);
    // After the outcome is printed: let a login's browser page and token
    // revocations finish (bounded).
    rt.block_on(login::finish_background());
    code
}

/// The exit code of a command, after its failure (if any) went to stderr.
fn finish(result: Result<(), Failure>, stdout: &mut dyn Write) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            let _ = stdout.flush();
            eprintln!("broker-ctl: {}", render::escape_controls(&f.message));
            ExitCode::from(f.code)
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn connect(cli_socket: Option<&std::path::Path>) -> Result<BrokerClient, Failure> {
    Ok(BrokerClient::builder()
        .socket(paths::socket_path(cli_socket))
        .client_name("broker-ctl")
        // Admin requests can outlast a token request: a logout may wait for a
        // running refresh and then revoke (15 s each); an import discovers with
        // up to two 15 s calls.
        .request_timeout(ADMIN_REQUEST_TIMEOUT)
        .connect()
        .await?)
}

/// Per-request timeout of broker-ctl: above the broker's worst case for any request.
const ADMIN_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(75);

/// Runs one parsed command, reading stdin (for `import`) and writing data to `out`.
pub async fn run(cli: Cli, input: &mut dyn Read, out: &mut dyn Write) -> Result<(), Failure> {
    let socket = cli.socket.as_deref();
    match cli.command {
        Command::Completions { shell } => {
            // Generate into memory: clap_complete panics on a write error
            // (e.g. a closed pipe), and we want a clean exit instead.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "broker-ctl", &mut script);
            out.write_all(&script)?;
        }
        Command::Ping => {
            let c = connect(socket).await?;
            c.ping().await?;
            let w = c.welcome();
            writeln!(out, "ok: broker {} (pid {})", w.broker_version, w.pid)?;
        }
        Command::Status { json } => {
            let report = connect(socket).await?.status().await?;
            if json {
                writeln!(out, "{}", status_json(&report))?;
            } else {
                write!(out, "{}", status_table(&report, now()))?;
            }
        }
        Command::Shutdown => {
            connect(socket).await?.shutdown().await?;
            writeln!(out, "broker is shutting down")?;
        }
        Command::Token { profile, min_valid } => {
            let t = connect(socket)
                .await?
                .get_token(&profile, Duration::from_secs(min_valid))
                .await?;
            // The broker accepts only b64token characters; a token from an
            // older store that breaks the rule never reaches a header here.
            if !kontext_broker::bounds::is_b64token(t.access_token.expose()) {
                return Err(Failure::other(
                    "the broker served an access token with characters outside RFC 6750 b64token; refusing to print it (run `broker-ctl refresh`)",
                ));
            }
            writeln!(out, "{}", t.access_token.expose())?;
        }
        Command::Refresh { profile } => {
            let t = connect(socket).await?.refresh(&profile).await?;
            writeln!(out, "{}", rfc3339(t.expires_at))?;
        }
        Command::Invalidate {
            profile,
            generation,
        } => {
            let r = connect(socket)
                .await?
                .request(Request::Invalidate {
                    profile,
                    generation,
                })
                .await?;
            let Response::Token(t) = r else {
                return Err(Failure::other(
                    "unexpected answer from the broker to Invalidate; check versions with `broker-ctl ping`",
                ));
            };
            writeln!(out, "{}", describe(&t))?;
        }
        Command::Watch { profile, json } => {
            let c = connect(socket).await?;
            let mut events = c.watch(&profile).await?;
            while let Some(ev) = events.next().await {
                let ev = ev?;
                if json {
                    writeln!(out, "{}", watch_json(&ev))?;
                } else {
                    writeln!(out, "{}", watch_line(&ev, now()))?;
                }
                out.flush()?;
            }
        }
        Command::Import {
            profile,
            issuer,
            client_id,
            credential,
            scopes,
            endpoints,
        } => {
            let token_response = read_token_response(input)?;
            let client_auth = credential.client_auth;
            let credential = credential.read()?;
            let p = connect(socket)
                .await?
                .import(ImportRequest {
                    profile,
                    issuer,
                    client_id,
                    credential,
                    client_auth,
                    scopes,
                    endpoints: endpoints.overrides(),
                    token_response,
                })
                .await?;
            writeln!(
                out,
                "imported profile `{}` ({}); access token expires {}",
                render::escape_controls(&p.name),
                p.state.as_str(),
                p.access_token_expires_at
                    .map_or_else(|| "-".to_owned(), rfc3339)
            )?;
        }
        Command::Client {
            profile,
            credential,
        } => {
            if credential.client_secret_file.is_none() && credential.client_key_file.is_none() {
                return Err(Failure {
                    code: exit::USAGE,
                    message: "give the new credential with --client-secret-file FILE or --client-key-file FILE".into(),
                });
            }
            let client_auth = credential.client_auth;
            let credential = credential.read()?;
            let r = connect(socket)
                .await?
                .request(Request::SetClient(SetClientRequest {
                    profile: profile.clone(),
                    credential,
                    client_auth,
                }))
                .await?;
            let Response::Token(t) = r else {
                return Err(Failure::other(
                    "unexpected answer from the broker to SetClient; check versions with `broker-ctl ping`",
                ));
            };
            writeln!(
                out,
                "client of `{profile}` replaced; refreshed, {}",
                describe(&t)
            )?;
        }
        Command::Logout { profile, no_revoke } => {
            logout::run(socket, &profile, no_revoke, out).await?;
        }
        Command::Unlock { passphrase_fd } => {
            let passphrase = match passphrase_fd {
                Some(fd) => read_passphrase_fd(fd)?,
                None => read_passphrase_tty()?,
            };
            if passphrase.is_empty() {
                return Err(Failure::other(
                    "empty passphrase; nothing was sent to the broker",
                ));
            }
            connect(socket).await?.unlock(passphrase).await?;
            writeln!(out, "unlocked")?;
        }
        Command::Lock => {
            connect(socket).await?.lock().await?;
            writeln!(out, "locked")?;
        }
        Command::Login(args) => login::run(args, socket, out, &mut std::io::stderr()).await?,
        Command::Doctor => doctor::run(socket, out).await?,
    }
    Ok(())
}

/// Generation and expiry of a token, never the token.
fn describe(t: &Token) -> String {
    format!(
        "generation {} expires {}",
        t.generation,
        rfc3339(t.expires_at)
    )
}

/// The part of a token response checked locally before it is sent.
#[derive(serde::Deserialize)]
struct TokenResponseProbe {
    access_token: Option<Secret>,
    refresh_token: Option<Secret>,
}

/// Reads and checks the RFC 6749 §5.1 JSON. Errors never quote the input.
fn read_token_response(input: &mut dyn Read) -> Result<Secret, Failure> {
    let mut buf = String::new();
    let read = input.read_to_string(&mut buf);
    // Wrap first, so the bytes are zeroed on every path.
    let raw = Secret::new(buf);
    read.map_err(|e| Failure::other(format!("cannot read the token response on stdin: {e}")))?;
    let probe: TokenResponseProbe = serde_json::from_str(raw.expose()).map_err(|e| {
        Failure::other(format!(
            "stdin is not a token endpoint response (RFC 6749 §5.1 JSON): error at line {} column {}; pipe the IdP's token response into `broker-ctl import`",
            e.line(),
            e.column()
        ))
    })?;
    if probe.access_token.as_ref().is_none_or(Secret::is_empty) {
        return Err(Failure::other(
            "the token response on stdin has no access_token; pipe the IdP's token endpoint response unchanged",
        ));
    }
    if probe.refresh_token.as_ref().is_none_or(Secret::is_empty) {
        return Err(Failure::other(
            "the token response on stdin has no refresh_token, so the broker could not renew it; request the `offline_access` scope (or enable refresh tokens for the client) and run the flow again",
        ));
    }
    Ok(raw)
}

fn read_secret_file(path: &std::path::Path) -> Result<Secret, Failure> {
    let raw = Secret::new(std::fs::read_to_string(path).map_err(|e| {
        Failure::other(format!(
            "cannot read client secret file {}: {e}",
            path.display()
        ))
    })?);
    let trimmed = Secret::from(raw.expose().trim_end_matches(['\r', '\n']));
    if trimmed.is_empty() {
        return Err(Failure::other(format!(
            "client secret file {} is empty; put the secret in it",
            path.display()
        )));
    }
    Ok(trimmed)
}

fn read_key_file(path: &std::path::Path) -> Result<Secret, Failure> {
    let raw = Secret::new(std::fs::read_to_string(path).map_err(|e| {
        Failure::other(format!(
            "cannot read client key file {}: {e}",
            path.display()
        ))
    })?);
    if raw.expose().trim().is_empty() {
        return Err(Failure::other(format!(
            "client key file {} is empty; put a PEM private key in it",
            path.display()
        )));
    }
    Ok(raw)
}

fn read_passphrase_fd(fd: i32) -> Result<Secret, Failure> {
    use std::os::fd::FromRawFd;
    if fd < 0 {
        return Err(Failure {
            code: exit::USAGE,
            message: format!("--passphrase-fd {fd} is not a file descriptor"),
        });
    }
    // SAFETY: the caller handed this descriptor to us for the passphrase; the
    // ManuallyDrop keeps it open, so fds 0-2 or shared ones are not closed.
    let file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    // Read one line, not to EOF: the writer may keep its end of a pipe open.
    let mut buf = String::new();
    let read = std::io::BufRead::read_line(&mut std::io::BufReader::new(&*file), &mut buf);
    let raw = Secret::new(buf);
    read.map_err(|e| {
        Failure::other(format!(
            "cannot read the passphrase from fd {fd}: {e}; pass an open, readable descriptor"
        ))
    })?;
    // Only the first line counts, so `echo pass |` and here-strings work.
    Ok(Secret::from(raw.expose().lines().next().unwrap_or("")))
}

fn read_passphrase_tty() -> Result<Secret, Failure> {
    rpassword::prompt_password("broker passphrase: ")
        .map(Secret::new)
        .map_err(|e| {
            Failure::other(format!(
                "cannot read the passphrase from the terminal ({e}); use --passphrase-fd N"
            ))
        })
}

#[cfg(test)]
mod tests;
