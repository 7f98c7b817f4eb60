//! The client's one error type.
//!
//! Every variant names a cause and, where the user can act, a fix. No variant
//! ever holds a token: broker messages are copied as-is, and the broker never puts
//! secrets in them.

use std::path::PathBuf;
use std::time::Duration;

use kontext_broker_protocol::BrokerError;

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a broker call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing listens at the socket path (ENOENT or ECONNREFUSED).
    #[error("broker not running at {}; start it with `kontext-broker`", path.display())]
    BrokerNotRunning {
        /// The socket path that was tried.
        path: PathBuf,
    },
    /// The socket or its peer belongs to another user; nothing was sent.
    #[error("{reason}; refusing to send credentials")]
    PeerRejected {
        /// The socket path that was tried.
        path: PathBuf,
        /// Why, naming both uids.
        reason: String,
    },
    /// Client and broker speak different protocol versions.
    #[error("protocol version mismatch: broker speaks {broker}, client speaks {client}; upgrade the older side")]
    VersionMismatch {
        /// The broker's protocol version.
        broker: u32,
        /// This client's protocol version.
        client: u32,
    },
    /// The broker did not answer in time (connect, handshake or request timeout).
    #[error("broker did not answer in time; check it with `broker-ctl status` or restart it")]
    Timeout,
    /// The connection to the broker closed before the answer arrived.
    #[error("connection to the broker was lost; it may be restarting, retry or check `broker-ctl status`")]
    Disconnected,
    /// The refresh token is dead; a human must log in again. `message` says how.
    #[error("{message}")]
    ReauthRequired {
        /// The profile that needs a new login.
        profile: String,
        /// The broker's instruction, e.g. "Session expired, run `kontext login` ...".
        message: String,
    },
    /// The IdP rejected the client's credential (not the grant). `message` names the fix.
    #[error("{message}")]
    ClientRejected {
        /// The profile whose client was rejected.
        profile: String,
        /// The broker's explanation: issuer, client id and `broker-ctl client`.
        message: String,
    },
    /// The IdP is unreachable and no valid token is cached.
    #[error("identity provider unavailable ({detail}); the broker retries in {}s", retry_after.as_secs())]
    Unavailable {
        /// When the broker will try again.
        retry_after: Duration,
        /// What failed, without secrets.
        detail: String,
    },
    /// The broker's store is locked.
    #[error("broker is locked; run `broker-ctl unlock`")]
    Locked,
    /// No profile of that name exists.
    #[error("unknown profile `{profile}`; list profiles with `broker-ctl status`")]
    UnknownProfile {
        /// The requested profile.
        profile: String,
    },
    /// The broker rejected the request as malformed or invalid.
    #[error("bad request: {detail}")]
    BadRequest {
        /// The broker's explanation.
        detail: String,
    },
    /// The broker failed internally, or answered with an unexpected message.
    #[error("internal broker error: {detail}")]
    Internal {
        /// What went wrong.
        detail: String,
    },
    /// Framing or decoding failed.
    #[error("protocol error: {0}")]
    Protocol(#[from] kontext_broker_protocol::Error),
    /// A local I/O operation failed while reaching the broker (e.g. EACCES on
    /// the socket); the message names the path.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// True for failures of the connection itself (not running, lost, timed out,
    /// refused peer, socket I/O): the caller cannot reach a trustworthy broker.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Error::BrokerNotRunning { .. }
                | Error::PeerRejected { .. }
                | Error::Timeout
                | Error::Disconnected
                | Error::Io(_)
        )
    }

    pub(crate) fn unexpected(expected: &str) -> Self {
        Error::Internal {
            detail: format!("unexpected response from broker (expected {expected})"),
        }
    }
}

impl From<BrokerError> for Error {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::ReauthRequired { profile, message } => {
                Error::ReauthRequired { profile, message }
            }
            BrokerError::UnknownProfile { profile } => Error::UnknownProfile { profile },
            BrokerError::IdpUnavailable {
                retry_after_secs,
                detail,
            } => Error::Unavailable {
                retry_after: Duration::from_secs(retry_after_secs),
                detail,
            },
            BrokerError::Locked => Error::Locked,
            BrokerError::BadRequest { detail } => Error::BadRequest { detail },
            BrokerError::VersionMismatch { broker, client } => {
                Error::VersionMismatch { broker, client }
            }
            BrokerError::Internal { detail } => Error::Internal { detail },
            BrokerError::ClientRejected { profile, message } => {
                Error::ClientRejected { profile, message }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_errors_map_to_variants() {
        let e: Error = BrokerError::IdpUnavailable {
            retry_after_secs: 7,
            detail: "timeout".into(),
        }
        .into();
        assert!(
            matches!(e, Error::Unavailable { retry_after, .. } if retry_after == Duration::from_secs(7))
        );
        let e: Error = BrokerError::Locked.into();
        assert!(matches!(e, Error::Locked));
        let e: Error = BrokerError::ReauthRequired {
            profile: "p".into(),
            message: "run login".into(),
        }
        .into();
        assert_eq!(e.to_string(), "run login");
    }

    #[test]
    fn not_running_message_names_path_and_fix() {
        let e = Error::BrokerNotRunning {
            path: "/run/user/0/kontext/broker.sock".into(),
        };
        assert_eq!(
            e.to_string(),
            "broker not running at /run/user/0/kontext/broker.sock; start it with `kontext-broker`"
        );
        assert!(e.is_unreachable());
    }
}
