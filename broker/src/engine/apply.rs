//! Record arithmetic: how a job's outcome or a command changes a
//! [`ProfileRecord`]. Pure functions; the actor decides when they apply.

use kontext_broker_protocol::{ClientAuthMethod, ClientCredential};

use super::Refreshed;
use crate::store::{ProfileRecord, StoredAccessToken};

/// The record after a successful refresh at `now_secs`.
pub(super) fn apply(
    mut record: ProfileRecord,
    refreshed: Refreshed,
    now_secs: u64,
    default_lifetime_secs: u64,
) -> ProfileRecord {
    let (lifetime, source) = super::lifetime::lifetime(
        refreshed.expires_in.map(|d| d.as_secs()),
        refreshed.access_token.expose(),
        now_secs,
        default_lifetime_secs,
    );
    let scopes = refreshed.scopes.unwrap_or_else(|| {
        record
            .access_token
            .as_ref()
            .map_or_else(|| record.scopes.clone(), |a| a.scopes.clone())
    });
    record.access_token = Some(StoredAccessToken {
        token: refreshed.access_token,
        token_type: refreshed.token_type,
        issued_at: now_secs,
        expires_at: now_secs + lifetime,
        scopes,
        lifetime_source: Some(source),
    });
    if let Some(rotated) = refreshed.refresh_token {
        record.refresh_token = Some(rotated);
    }
    if let Some(method) = refreshed.client_auth_detected {
        record.client_auth_detected = Some(method);
    }
    record.client_rejected = None;
    record.generation += 1;
    record
}

/// The record after the IdP rejected the grant: the dead refresh token (and
/// its access token) go; the metadata stays so a new login can reuse it.
pub(super) fn grant_rejected(mut record: ProfileRecord) -> ProfileRecord {
    record.refresh_token = None;
    record.access_token = None;
    record.client_rejected = None;
    record
}

/// The record after the IdP rejected the client: the grant stays, and the
/// rejection is remembered so it survives a restart.
pub(super) fn client_rejected(mut record: ProfileRecord, detail: &str) -> ProfileRecord {
    record.client_rejected = Some(detail.to_owned());
    record
}

/// The record with a new client credential and method; the grant stays.
pub(super) fn with_client(
    mut record: ProfileRecord,
    credential: ClientCredential,
    client_auth: Option<ClientAuthMethod>,
) -> ProfileRecord {
    (record.client_secret, record.client_key) = match credential {
        ClientCredential::None => (None, None),
        ClientCredential::Secret(s) => (Some(s), None),
        ClientCredential::PrivateKey(k) => (None, Some(k)),
    };
    record.client_auth = client_auth;
    record.client_rejected = None;
    record
}

/// A replacing record (import or login) after `current`: generations only
/// grow, so watchers always see a re-login as a new token.
pub(super) fn replacing(mut record: ProfileRecord, current: &ProfileRecord) -> ProfileRecord {
    record.generation = record.generation.max(current.generation + 1);
    record
}
