use serde::{Deserialize, Serialize};

/// An error the broker reports to a client, carried on the wire.
///
/// Variant order is part of the wire format (see `WIRE.md`); append, never reorder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum BrokerError {
    /// The refresh token is dead; a human must log in again. `message` says how.
    #[error("{message}")]
    ReauthRequired { profile: String, message: String },
    /// No profile of that name exists.
    #[error("unknown profile `{profile}`; list profiles with `broker-ctl status`")]
    UnknownProfile { profile: String },
    /// The IdP cannot be reached and no valid token is cached.
    #[error("identity provider unavailable ({detail}); retrying in {retry_after_secs}s")]
    IdpUnavailable {
        retry_after_secs: u64,
        detail: String,
    },
    /// The broker's identity is passphrase-protected and not unlocked.
    #[error("broker is locked; run `broker-ctl unlock`")]
    Locked,
    /// The request was malformed, unsupported or invalid.
    #[error("bad request: {detail}")]
    BadRequest { detail: String },
    /// Client and broker speak different protocol versions.
    #[error("protocol version mismatch: broker speaks {broker}, client speaks {client}; upgrade the older side")]
    VersionMismatch { broker: u32, client: u32 },
    /// A bug or an unexpected local failure (disk, permissions).
    #[error("internal broker error: {detail}")]
    Internal { detail: String },
    /// The IdP rejected the client (not the grant); `message` names the issuer, client and fix.
    #[error("{message}")]
    ClientRejected { profile: String, message: String },
}

/// Stable, machine-readable error codes. The numbers never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    ReauthRequired = 1,
    UnknownProfile = 2,
    IdpUnavailable = 3,
    Locked = 4,
    BadRequest = 5,
    VersionMismatch = 6,
    Internal = 7,
    ClientRejected = 8,
}

impl ErrorCode {
    /// The snake_case name used in JSON output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ReauthRequired => "reauth_required",
            ErrorCode::UnknownProfile => "unknown_profile",
            ErrorCode::IdpUnavailable => "idp_unavailable",
            ErrorCode::Locked => "locked",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::Internal => "internal",
            ErrorCode::ClientRejected => "client_rejected",
        }
    }
}

impl BrokerError {
    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            BrokerError::ReauthRequired { .. } => ErrorCode::ReauthRequired,
            BrokerError::UnknownProfile { .. } => ErrorCode::UnknownProfile,
            BrokerError::IdpUnavailable { .. } => ErrorCode::IdpUnavailable,
            BrokerError::Locked => ErrorCode::Locked,
            BrokerError::BadRequest { .. } => ErrorCode::BadRequest,
            BrokerError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            BrokerError::Internal { .. } => ErrorCode::Internal,
            BrokerError::ClientRejected { .. } => ErrorCode::ClientRejected,
        }
    }

    /// Shorthand for [`BrokerError::BadRequest`].
    pub fn bad_request(detail: impl Into<String>) -> Self {
        BrokerError::BadRequest {
            detail: detail.into(),
        }
    }

    /// Shorthand for [`BrokerError::Internal`].
    pub fn internal(detail: impl Into<String>) -> Self {
        BrokerError::Internal {
            detail: detail.into(),
        }
    }
}

/// Errors of this crate: framing, encoding and path resolution.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the socket failed.
    #[error("socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A frame announced more than [`crate::MAX_FRAME_LEN`] bytes.
    #[error("frame of {len} bytes exceeds the {max} byte limit")]
    FrameTooLarge { len: usize, max: usize },
    /// A frame started but did not finish within [`crate::STALL_TIMEOUT`].
    #[error("peer stalled in the middle of a frame")]
    Stalled,
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The payload is not a valid message.
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// A message could not be encoded (for example, it is too large).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// No path could be resolved: the named variables are all unset.
    #[error("cannot resolve {what}: set {hint}")]
    NoPath {
        what: &'static str,
        hint: &'static str,
    },
}
