//! The command line of `broker-ctl`: the clap definitions of its global
//! options, subcommands and credential flags, and the local checks of values.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kontext_broker_protocol::{paths, ClientAuthMethod, ClientCredential, DEFAULT_PROFILE};

use super::{endpoints, exit, login, read_key_file, read_secret_file, Failure};

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
