//! Message types. Field and variant order is wire format: see `WIRE.md`.
//!
//! A connection starts with the client's [`ClientMessage::Hello`] and the broker's
//! [`ServerMessage::Welcome`]. After that the client sends [`RequestFrame`]s, each
//! with a caller-chosen `id`, and the broker answers each with a [`ResponseFrame`]
//! carrying the same id, in any order. A `Watch` request is answered once with
//! [`Response::Watching`] and then pushes [`ServerMessage::Event`]s with its id.

use serde::{Deserialize, Serialize};

use crate::{BrokerError, Secret};

/// First frame of every connection, sent by the client.
///
/// Invariant: `Hello` is variant 0 of [`ClientMessage`] and `protocol_version` is its
/// first field, in every protocol version, so any broker can read the version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub client_name: String,
    pub client_version: String,
}

/// The broker's answer to a compatible [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u32,
    pub broker_version: String,
    pub pid: u32,
}

/// Everything a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    Hello(Hello),
    Request(RequestFrame),
}

/// A request with the id its response will echo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub id: u64,
    pub request: Request,
}

/// Everything the broker sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    Welcome(Welcome),
    Response(ResponseFrame),
    /// A pushed event for the `Watch` request whose id is `id`.
    Event {
        id: u64,
        event: WatchEvent,
    },
    /// A connection-level error (bad frame, version mismatch). The broker closes next.
    Error(BrokerError),
}

/// The answer to the request with the same `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseFrame {
    pub id: u64,
    pub result: Result<Response, BrokerError>,
}

/// A request. Profile names are `[A-Za-z0-9._-]{1,64}`; clients send
/// [`crate::DEFAULT_PROFILE`] when the user named none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A token valid for at least `min_valid_secs` more seconds (capped; see `WIRE.md` §6).
    GetToken {
        profile: String,
        min_valid_secs: u64,
    },
    /// The token of `generation` was rejected; refresh if it is still current.
    Invalidate {
        profile: String,
        generation: u64,
    },
    /// Push every new token and state change of `profile`.
    Watch {
        profile: String,
    },
    Status,
    Import(ImportRequest),
    Logout {
        profile: String,
        revoke: bool,
    },
    /// Refresh now, whatever the current token's validity.
    Refresh {
        profile: String,
    },
    Unlock {
        passphrase: Secret,
    },
    Lock,
    Shutdown,
    Ping,
    /// Replace a profile's client credential, keep its grant, and refresh at once.
    SetClient(SetClientRequest),
    /// The next page of `Status`: profiles whose names sort after `after`.
    StatusPage {
        after: String,
    },
}

impl Request {
    /// The request's name, for logs and metrics. Never includes arguments.
    pub fn name(&self) -> &'static str {
        match self {
            Request::GetToken { .. } => "GetToken",
            Request::Invalidate { .. } => "Invalidate",
            Request::Watch { .. } => "Watch",
            Request::Status => "Status",
            Request::Import(_) => "Import",
            Request::Logout { .. } => "Logout",
            Request::Refresh { .. } => "Refresh",
            Request::Unlock { .. } => "Unlock",
            Request::Lock => "Lock",
            Request::Shutdown => "Shutdown",
            Request::Ping => "Ping",
            Request::SetClient(_) => "SetClient",
            Request::StatusPage { .. } => "StatusPage",
        }
    }
}

/// How the broker authenticates a profile's client at the IdP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClientAuthMethod {
    /// A public client: only `client_id` is sent.
    None,
    /// RFC 6749 §2.3.1 HTTP Basic.
    ClientSecretBasic,
    /// RFC 6749 §2.3.1 form fields.
    ClientSecretPost,
    /// RFC 7523 §2.2 signed assertion (OpenID Connect Core §9).
    PrivateKeyJwt,
}

impl ClientAuthMethod {
    /// The RFC 8414 / OpenID Connect registry name.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuthMethod::None => "none",
            ClientAuthMethod::ClientSecretBasic => "client_secret_basic",
            ClientAuthMethod::ClientSecretPost => "client_secret_post",
            ClientAuthMethod::PrivateKeyJwt => "private_key_jwt",
        }
    }

    /// Parses a registry name.
    pub fn parse(name: &str) -> Option<Self> {
        [
            ClientAuthMethod::None,
            ClientAuthMethod::ClientSecretBasic,
            ClientAuthMethod::ClientSecretPost,
            ClientAuthMethod::PrivateKeyJwt,
        ]
        .into_iter()
        .find(|m| m.as_str() == name)
    }
}

/// A client's credential. Both secrets are held encrypted at rest, never printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientCredential {
    /// A public client.
    None,
    /// A client secret (`client_secret_basic` or `client_secret_post`).
    Secret(Secret),
    /// A PEM private key (RSA or EC P-256) for `private_key_jwt`.
    PrivateKey(Secret),
}

/// Endpoints that replace or fill what discovery found, per profile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointOverrides {
    pub token: Option<String>,
    pub revocation: Option<String>,
    pub device_authorization: Option<String>,
}

/// New client credentials for an existing profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetClientRequest {
    pub profile: String,
    pub credential: ClientCredential,
    /// `None` lets the broker choose from the server's metadata.
    pub client_auth: Option<ClientAuthMethod>,
}

/// Adds or replaces a profile from a token endpoint response obtained elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRequest {
    pub profile: String,
    pub issuer: String,
    pub client_id: String,
    pub credential: ClientCredential,
    /// `None` lets the broker choose from the server's metadata.
    pub client_auth: Option<ClientAuthMethod>,
    pub scopes: Vec<String>,
    pub endpoints: EndpointOverrides,
    /// The RFC 6749 §5.1 JSON body, verbatim. It holds tokens, hence `Secret`.
    pub token_response: Secret,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// For `GetToken`, `Invalidate`, `Refresh` and `SetClient`.
    Token(Token),
    /// For `Watch`: events with this request's id follow.
    Watching,
    /// For `Status` and `StatusPage`.
    Status(StatusReport),
    Imported(ProfileStatus),
    LoggedOut {
        /// True when the IdP confirmed revocation of the refresh token.
        revoked: bool,
        /// Why revocation was skipped or failed, if it was. `None` with
        /// `revoked: false` means there was nothing to revoke (the profile held
        /// no refresh token: its grant was already dead).
        revoke_error: Option<String>,
    },
    /// For `Unlock`, `Lock` and `Shutdown`.
    Done,
    Pong,
}

/// An access token as served to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub access_token: Secret,
    pub token_type: String,
    /// Unix seconds.
    pub expires_at: u64,
    /// Unix seconds.
    pub issued_at: u64,
    /// +1 for every new token of the profile.
    pub generation: u64,
    pub scopes: Vec<String>,
}

impl Token {
    /// Seconds of validity left at unix time `now` (0 when expired).
    pub fn remaining_secs(&self, now: u64) -> u64 {
        self.expires_at.saturating_sub(now)
    }
}

/// An event pushed to watchers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchEvent {
    /// A new token (also sent once, right after `Watching`, when one is valid).
    Token { profile: String, token: Token },
    /// The profile's state changed.
    State {
        profile: String,
        state: ProfileState,
        generation: u64,
        expires_at: Option<u64>,
    },
    /// The refresh token is dead. Sticky until a login or import.
    ReauthRequired { profile: String, message: String },
    /// The profile was logged out or deleted.
    Removed { profile: String },
    /// The IdP rejected the client (not the grant). Sticky until the client changes.
    ClientRejected { profile: String, message: String },
}

impl WatchEvent {
    /// The profile this event is about.
    pub fn profile(&self) -> &str {
        match self {
            WatchEvent::Token { profile, .. }
            | WatchEvent::State { profile, .. }
            | WatchEvent::ReauthRequired { profile, .. }
            | WatchEvent::Removed { profile }
            | WatchEvent::ClientRejected { profile, .. } => profile,
        }
    }
}

/// The state of one profile's token engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProfileState {
    /// A valid access token is cached.
    Valid,
    /// A token-endpoint call is in flight.
    Refreshing,
    /// The last refresh failed transiently; retrying later.
    Backoff,
    /// The access token expired and no refresh has run since.
    Expired,
    /// The refresh token is dead; a login is needed.
    ReauthRequired,
    /// The store is locked; secrets are not in memory.
    Locked,
    /// The profile file could not be read or decrypted.
    Error,
    /// The IdP rejected the client's credential; the grant is kept.
    ClientRejected,
}

impl ProfileState {
    /// The snake_case name used in `status` output.
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileState::Valid => "valid",
            ProfileState::Refreshing => "refreshing",
            ProfileState::Backoff => "backoff",
            ProfileState::Expired => "expired",
            ProfileState::ReauthRequired => "reauth_required",
            ProfileState::Locked => "locked",
            ProfileState::Error => "error",
            ProfileState::ClientRejected => "client_rejected",
        }
    }
}

/// The answer to `Status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub broker: BrokerStatus,
    pub profiles: Vec<ProfileStatus>,
    /// Set when more profiles follow: ask `StatusPage { after }` with this name.
    pub next_after: Option<String>,
}

/// Broker-wide figures for `Status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerStatus {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub socket: String,
    pub state_dir: String,
    pub locked: bool,
    /// Connections open now.
    pub connections: u64,
    /// Peers closed since start because their uid differed.
    pub rejected_peers: u64,
    /// Connections closed since start because no complete `Hello` came in time.
    pub handshake_timeouts: u64,
}

/// One profile in `Status`. Times are unix seconds; `broker-ctl` renders RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileStatus {
    pub name: String,
    pub issuer: String,
    pub client_id: String,
    pub subject: Option<String>,
    pub state: ProfileState,
    pub access_token_expires_at: Option<u64>,
    pub generation: u64,
    pub refresh_count: u64,
    pub refresh_failures: u64,
    pub last_refresh_at: Option<u64>,
    pub next_refresh_at: Option<u64>,
    pub last_error: Option<String>,
    /// Where the current token's lifetime came from; `None` without a token.
    pub lifetime_source: Option<LifetimeSource>,
}

impl ProfileStatus {
    /// The status of a profile known only by name (locked, unreadable): `state`
    /// and `last_error`, every other field empty.
    pub fn bare(name: &str, state: ProfileState, last_error: Option<String>) -> ProfileStatus {
        ProfileStatus {
            name: name.to_owned(),
            issuer: String::new(),
            client_id: String::new(),
            subject: None,
            state,
            access_token_expires_at: None,
            generation: 0,
            refresh_count: 0,
            refresh_failures: 0,
            last_refresh_at: None,
            next_refresh_at: None,
            last_error,
            lifetime_source: None,
        }
    }
}

/// Where an access token's lifetime came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LifetimeSource {
    /// The token response's `expires_in`.
    ExpiresIn,
    /// The access token's JWT `exp` claim, read without verification.
    JwtExp,
    /// The profile's `default_token_lifetime`.
    Default,
}

impl LifetimeSource {
    /// The snake_case name used in `status` output.
    pub fn as_str(self) -> &'static str {
        match self {
            LifetimeSource::ExpiresIn => "expires_in",
            LifetimeSource::JwtExp => "jwt_exp",
            LifetimeSource::Default => "default",
        }
    }
}
