//! The broker crate's one error type.
//!
//! Each variant says what failed and, where a user can act, how to fix it.
//! Errors never carry secret values: variants hold paths, names and messages only.

use std::path::PathBuf;

use kontext_broker_protocol::BrokerError;

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside the broker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- process and configuration ----
    /// The config file exists but is invalid.
    #[error("invalid config {}: {detail}", path.display())]
    Config { path: PathBuf, detail: String },
    /// A file or directory has permissions that would expose secrets.
    #[error("refusing to use {}: {problem}; fix with `{fix}`", path.display())]
    UnsafePermissions {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    /// Another broker holds the state directory lock.
    #[error("already running (pid {pid})")]
    AlreadyRunning { pid: u32 },
    /// An I/O operation failed; `context` says which.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Path resolution or framing failed.
    #[error(transparent)]
    Protocol(#[from] kontext_broker_protocol::Error),

    // ---- store ----
    /// The store's identity is passphrase-protected and not unlocked.
    #[error("broker is locked; run `broker-ctl unlock`")]
    Locked,
    /// The passphrase did not decrypt the identity.
    #[error("wrong passphrase")]
    WrongPassphrase,
    /// A profile file could not be decrypted or parsed. It was moved aside.
    #[error("profile `{profile}` is unreadable ({detail}); the file was kept as {}", kept.display())]
    CorruptProfile {
        profile: String,
        detail: String,
        kept: PathBuf,
    },
    /// Encryption or identity handling failed.
    #[error("encryption: {0}")]
    Crypto(String),
    /// The OS keyring is unavailable or failed.
    #[error("keyring: {0}")]
    Keyring(String),
    /// No profile of that name exists.
    #[error("unknown profile `{0}`")]
    UnknownProfile(String),
    /// The profile's engine stopped while a request waited on it.
    #[error("the engine of profile `{0}` stopped (shutdown, logout, lock or re-login); retry")]
    EngineStopped(String),
    /// A file in the state directory is not a regular file, or is larger than
    /// a broker file may be; it was not read.
    #[error("refusing to read {}: {problem}; move it out of the state directory", path.display())]
    RefusedFile { path: PathBuf, problem: String },
    /// The profile name is not `[A-Za-z0-9._-]{{1,64}}`.
    #[error("invalid profile name `{0}`: use 1-64 of A-Z a-z 0-9 . _ - and do not start with `.`")]
    InvalidProfileName(String),

    // ---- identity provider ----
    /// Input from a user or client was invalid (issuer URL, token response, ...).
    #[error("{0}")]
    Invalid(String),
    /// The IdP could not be reached or answered with a transient error.
    #[error("identity provider unavailable: {0}")]
    IdpTransient(String),
}

impl Error {
    /// An [`Error::Io`] with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The wire error a client sees for this error.
    pub fn to_wire(&self) -> BrokerError {
        match self {
            Error::Locked => BrokerError::Locked,
            Error::UnknownProfile(profile) => BrokerError::UnknownProfile {
                profile: profile.clone(),
            },
            Error::InvalidProfileName(_) | Error::Invalid(_) | Error::WrongPassphrase => {
                BrokerError::bad_request(self.to_string())
            }
            Error::IdpTransient(detail) => BrokerError::IdpUnavailable {
                retry_after_secs: 1,
                detail: detail.clone(),
            },
            other => BrokerError::internal(other.to_string()),
        }
    }
}
