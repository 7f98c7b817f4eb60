//! `broker-ctl`: the command line for users and scripts (contract §7).
//!
//! Data goes to stdout; every failure is one line on stderr naming the cause and
//! the fix, and the exit code says which kind of failure it was (see [`exit`]).

pub mod doctor;
pub mod endpoints;
pub mod fast;
pub mod login;
mod logout;
mod render;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{CommandFactory, Parser, Subcommand};
use futures::StreamExt;
use kontext_broker_client::{BrokerClient, Error as ClientError};
use kontext_broker_protocol::{
    paths, ClientAuthMethod, ClientCredential, ImportRequest, Request, Response, Secret,
    SetClientRequest, Token, DEFAULT_PROFILE,
};

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

/// Control the kontext token broker.
#[derive(Debug, Parser)]
#[command(name = "broker-ctl", version, about)]
pub struct Cli {
    /// Broker socket [default: $XDG_RUNTIME_DIR/kontext/broker.sock, else ${TMPDIR:-/tmp}/kontext-$UID/broker.sock]
    #[arg(
        long,
        global = true,
        env = "KONTEXT_BROKER_SOCKET",
        value_name = "PATH"
    )]
    pub socket: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `broker-ctl` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check that the broker answers.
    Ping,
    /// Show the broker and its profiles.
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ask the broker to exit.
    Shutdown,
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print an access token (only the token and a newline).
    Token {
        /// Profile name.
        #[arg(long, default_value = DEFAULT_PROFILE, value_parser = profile_name)]
        profile: String,
        /// Minimum remaining validity in seconds (the broker caps it, contract §5).
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        min_valid: u64,
    },
    /// Refresh now and print the new expiry (RFC 3339).
    Refresh {
        /// Profile name.
        #[arg(long, default_value = DEFAULT_PROFILE, value_parser = profile_name)]
        profile: String,
    },
    /// Report the token of GENERATION as rejected; the broker refreshes if it is current.
    Invalidate {
        /// Profile name.
        #[arg(long, default_value = DEFAULT_PROFILE, value_parser = profile_name)]
        profile: String,
        /// Generation of the rejected token (see `watch` or `status`).
        #[arg(long, value_name = "N")]
        generation: u64,
    },
    /// Stream token and state events, one line each.
    Watch {
        /// Profile name.
        #[arg(long, default_value = DEFAULT_PROFILE, value_parser = profile_name)]
        profile: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Add a profile from a token endpoint response (RFC 6749 §5.1 JSON) on stdin.
    Import {
        /// Profile name.
        #[arg(long, default_value = DEFAULT_PROFILE, value_parser = profile_name)]
        profile: String,
        /// Issuer URL (discovery runs against it).
        #[arg(long, value_name = "URL")]
        issuer: String,
        /// OAuth client id the tokens were issued to.
        // Generated ids may start with '-' (base64url): never a flag here.
        #[arg(long, value_name = "ID", allow_hyphen_values = true)]
        client_id: String,
        /// The client's credential, from files (never as arguments).
        #[command(flatten)]
        credential: CredentialArgs,
        /// Scope (repeatable).
        #[arg(long = "scope", value_name = "S")]
        scopes: Vec<String>,
        #[command(flatten)]
        endpoints: endpoints::EndpointArgs,
    },
    /// Replace a profile's client credential, keep its grant, and refresh at once
    /// (the way out of `client_rejected` after a secret rotation).
    Client {
        /// Profile name.
        #[arg(long, default_value = DEFAULT_PROFILE, value_parser = profile_name)]
        profile: String,
        /// The new credential.
        #[command(flatten)]
        credential: CredentialArgs,
    },
    /// Revoke the refresh token at the IdP and delete the profile (exit 9: deleted, not revoked).
    Logout {
        /// Profile name.
        #[arg(long, default_value = DEFAULT_PROFILE, value_parser = profile_name)]
        profile: String,
        /// Delete without revoking at the IdP.
        #[arg(long)]
        no_revoke: bool,
    },
    /// Unlock a passphrase-protected store (reads the tty without echo).
    Unlock {
        /// Read the passphrase from this file descriptor instead.
        #[arg(long, value_name = "N")]
        passphrase_fd: Option<i32>,
    },
    /// Drop all decrypted secrets from the broker's memory.
    Lock,
    /// Log in to an identity provider and store the tokens in the broker.
    Login(login::LoginArgs),
    /// Check paths, permissions, the broker, IdP discovery and clock skew.
    Doctor,
}

/// A client credential given on the command line: a secret file or a key file
/// (PEM, RSA or EC P-256, for `private_key_jwt`), and optionally the method.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CredentialArgs {
    /// File holding the client secret (never pass secrets as arguments).
    #[arg(long, value_name = "FILE", conflicts_with = "client_key_file")]
    pub client_secret_file: Option<PathBuf>,
    /// PEM private key (RSA or EC P-256) for `private_key_jwt` client authentication.
    #[arg(long, value_name = "FILE")]
    pub client_key_file: Option<PathBuf>,
    /// Client authentication method: client_secret_basic, client_secret_post,
    /// private_key_jwt or none [default: from the server's metadata].
    #[arg(long, value_name = "METHOD", value_parser = auth_method)]
    pub client_auth: Option<ClientAuthMethod>,
}

impl CredentialArgs {
    /// Reads the files into a credential. Errors name the file, never its content.
    pub fn read(&self) -> Result<ClientCredential, Failure> {
        Ok(match (&self.client_secret_file, &self.client_key_file) {
            (Some(f), _) => ClientCredential::Secret(read_secret_file(f)?),
            (None, Some(f)) => {
                let key = read_key_file(f)?;
                kontext_broker::idp::client_auth::check_client_key(&key).map_err(|e| Failure {
                    code: exit::USAGE,
                    message: format!("{}: {e}", f.display()),
                })?;
                ClientCredential::PrivateKey(key)
            }
            (None, None) => ClientCredential::None,
        })
    }
}

fn auth_method(s: &str) -> Result<ClientAuthMethod, String> {
    ClientAuthMethod::parse(s).ok_or_else(|| {
        "use client_secret_basic, client_secret_post, private_key_jwt or none".to_owned()
    })
}

/// Checks a `--profile` value locally, so a typo is a usage error (exit 2).
fn profile_name(s: &str) -> Result<String, String> {
    if paths::is_valid_profile_name(s) {
        Ok(s.to_owned())
    } else {
        Err(
            "profile names are 1-64 characters of A-Z a-z 0-9 . _ - and do not start with `.`"
                .to_owned(),
        )
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
