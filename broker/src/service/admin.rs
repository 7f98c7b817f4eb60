//! Admin operations: import, logout, lock, unlock and set-client, serialized by one async mutex.

use std::sync::Arc;

use kontext_broker_protocol::paths::is_valid_profile_name;
use kontext_broker_protocol::{
    BrokerError, ClientAuthMethod, ClientCredential, ImportRequest, ProfileState, ProfileStatus,
    Response, Secret, SetClientRequest, Token, WatchEvent,
};
use tracing::{info, warn};

use super::registry::{self, Entry};
use super::{unknown, Service};
use crate::engine::{self, EngineHandle};
use crate::idp::{self, TokenResponse};
use crate::store::{IssuedToken, ProfileRecord};
use crate::Error;

impl Service {
    /// `SetClient`: checks the new credential, then lets the profile's engine
    /// swap it in and refresh at once (the way out of `client_rejected`).
    pub(super) async fn set_client(&self, set: SetClientRequest) -> Result<Token, BrokerError> {
        check_credential(&set.credential, set.client_auth).map_err(|e| e.to_wire())?;
        self.engine(&set.profile)?
            .set_client(set.credential, set.client_auth)
            .await
    }

    pub(super) async fn import(&self, import: ImportRequest) -> Result<ProfileStatus, BrokerError> {
        let record = self
            .record_from_import(import)
            .await
            .map_err(|e| e.to_wire())?;
        self.install(record).await.map_err(|e| e.to_wire())
    }

    /// Builds the record for an import: checks the name and response, discovers endpoints.
    async fn record_from_import(&self, import: ImportRequest) -> crate::Result<ProfileRecord> {
        if !is_valid_profile_name(&import.profile) {
            return Err(Error::InvalidProfileName(import.profile));
        }
        crate::bounds::check_import(&import)?;
        let now_secs = self.inner.deps.clock.now_secs();
        let default_lifetime = self
            .inner
            .config
            .default_token_lifetime_for(&import.profile);
        let token = issued_token(
            TokenResponse::parse(import.token_response.expose())?,
            now_secs,
            default_lifetime,
        )?;
        check_credential(&import.credential, import.client_auth)?;
        idp::validate_issuer(&import.issuer)?;
        let overrides = self
            .inner
            .config
            .merged_overrides(&import.profile, &import.endpoints);
        let endpoints =
            idp::discover_with(self.inner.idp.http(), &import.issuer, &overrides).await?;
        Ok(ProfileRecord::from_import(
            import, token, endpoints, now_secs,
        ))
    }

    /// Saves `record` and starts (or updates) its engine. Watchers learn at once.
    pub async fn install(&self, record: ProfileRecord) -> crate::Result<ProfileStatus> {
        let _admin = self.inner.admin.lock().await;
        if self.inner.store.is_locked() {
            return Err(Error::Locked);
        }
        let name = record.name.clone();
        let status = match self.inner.profiles.running(&name) {
            Some(engine) => engine.replace(record).await?,
            None => {
                let mut record = record;
                let events = {
                    let profiles = self.inner.profiles.lock();
                    if let Some(Entry::Absent { last_generation }) =
                        profiles.get(&name).map(|s| &s.entry)
                    {
                        // A stale client of the old session must not hit a live generation.
                        record.generation = record.generation.max(last_generation + 1);
                    }
                    registry::events_in(&profiles, &name)
                };
                let engine = self.create_new(record, events).await?;
                let mut profiles = self.inner.profiles.lock();
                if self.closing() {
                    return Err(Error::Invalid("the broker is shutting down".into()));
                }
                let status = engine.status();
                registry::set_entry(&mut profiles, &name, Entry::Engine(engine));
                status
            }
        };
        info!(profile = %name, generation = status.generation, "profile imported");
        Ok(status)
    }

    pub(super) async fn logout(
        &self,
        profile: &str,
        revoke: bool,
    ) -> Result<Response, BrokerError> {
        let _admin = self.inner.admin.lock().await;
        if self.closing() {
            return Err(BrokerError::bad_request(
                "the broker is shutting down; log out after it restarts",
            ));
        }
        // Hide the profile first, so nothing is served while it is revoked.
        let previous = {
            let mut profiles = self.inner.profiles.lock();
            let slot = profiles.get_mut(profile).ok_or_else(|| unknown(profile))?;
            let last_generation = match &slot.entry {
                Entry::Locked => return Err(BrokerError::Locked),
                Entry::Absent { .. } => return Err(unknown(profile)),
                Entry::Engine(engine) => engine.status().generation,
                Entry::Failed { .. } => 0,
            };
            std::mem::replace(&mut slot.entry, Entry::Absent { last_generation })
        };
        // Delete first, through the engine (the only writer of the file); the
        // grant is revoked after, from the record the engine hands back. A
        // failed delete changes nothing: the profile is put back as it was.
        let record = match &previous {
            Entry::Engine(engine) => match engine.remove().await {
                Ok(record) => Some(record),
                Err(e) => return Err(self.restore(profile, previous, e)),
            },
            // An unreadable file has no engine; logout deletes it itself.
            _ => {
                let name = profile.to_owned();
                match self
                    .inner
                    .store
                    .run_blocking(move |s| s.delete(&name))
                    .await
                {
                    Ok(()) | Err(Error::UnknownProfile(_)) => None,
                    Err(e) => return Err(self.restore(profile, previous, e)),
                }
            }
        };
        let (revoked, revoke_error) = self.revoke_after_logout(record.as_ref(), revoke).await;
        if let Some(slot) = self.inner.profiles.lock().get(profile) {
            let _ = slot.events.send(WatchEvent::Removed {
                profile: profile.to_owned(),
            });
        }
        info!(profile, revoked, "profile logged out");
        Ok(Response::LoggedOut {
            revoked,
            revoke_error,
        })
    }

    /// Revokes the grant of a logged-out profile (when asked and possible):
    /// whether it was revoked, and why not when that is news to the user.
    async fn revoke_after_logout(
        &self,
        record: Option<&ProfileRecord>,
        revoke: bool,
    ) -> (bool, Option<String>) {
        let record = match (record, revoke) {
            (_, false) => return (false, Some("revocation skipped (--no-revoke)".to_owned())),
            (None, true) => {
                return (
                    false,
                    Some(
                        "the profile could not be read, so its refresh token is unknown".to_owned(),
                    ),
                )
            }
            // The grant is already dead at the IdP: nothing to revoke, nothing failed.
            (Some(r), true) if r.refresh_token.is_none() => return (false, None),
            (Some(r), true) => r,
        };
        let Some(target) = self.revocation_target(record).await else {
            return (
                false,
                Some(
                    "the issuer advertises no revocation endpoint in either discovery document"
                        .to_owned(),
                ),
            );
        };
        let auth = self.inner.idp.client_auth(&target);
        match idp::revoke(self.inner.idp.http(), &auth, &target).await {
            Ok(()) => (true, None),
            Err(e) => {
                warn!(profile = %record.name, error = %e, "revocation failed; the profile is deleted, its grant stays valid at the IdP");
                (false, Some(e.to_string()))
            }
        }
    }

    /// Puts a profile hidden by a logout back as it was, after its file could
    /// not be deleted; returns the error for the caller.
    fn restore(&self, profile: &str, previous: Entry, e: Error) -> BrokerError {
        warn!(profile, error = %e, "logout could not delete the profile; it stays");
        if let Some(slot) = self.inner.profiles.lock().get_mut(profile) {
            slot.entry = previous;
        }
        e.to_wire()
    }

    /// `record` with a revocation endpoint, if one can be found. A profile saved
    /// before the broker read both discovery documents may lack one the issuer
    /// has: discovery runs again (best effort) in that case.
    async fn revocation_target(&self, record: &ProfileRecord) -> Option<ProfileRecord> {
        if record.endpoints.revocation.is_some() {
            return Some(record.clone());
        }
        let overrides = self.inner.config.endpoint_overrides(&record.name);
        match idp::discover_with(self.inner.idp.http(), &record.issuer, &overrides).await {
            Ok(endpoints) => endpoints.revocation.map(|revocation| {
                let mut target = record.clone();
                target.endpoints.revocation = Some(revocation);
                target
            }),
            Err(e) => {
                warn!(profile = %record.name, error = %e, "discovery for revocation failed");
                None
            }
        }
    }

    pub(super) async fn unlock(&self, passphrase: Secret) -> Result<(), BrokerError> {
        // The throttle's penalty must not hold the admin lock (it would stall
        // imports and logouts). An import that slips in before the load below is
        // safe: `load_profiles` never replaces a running engine.
        self.inner
            .throttle
            .unlock(self.inner.store.clone(), passphrase)
            .await
            .map_err(|e| e.to_wire())?;
        let _admin = self.inner.admin.lock().await;
        let needs_load = self
            .inner
            .profiles
            .lock()
            .values()
            .any(|s| matches!(s.entry, Entry::Locked));
        if needs_load {
            self.load_profiles().await.map_err(|e| e.to_wire())?;
        }
        info!("broker unlocked");
        Ok(())
    }

    pub(super) async fn lock(&self) -> Result<(), BrokerError> {
        let _admin = self.inner.admin.lock().await;
        self.inner.store.lock();
        if !self.inner.store.is_locked() {
            return Err(BrokerError::bad_request(
                "this broker's identity cannot be locked; use identity = \"passphrase\" in the config",
            ));
        }
        let engines: Vec<(String, Arc<EngineHandle>)> = {
            let mut profiles = self.inner.profiles.lock();
            profiles
                .iter_mut()
                .filter_map(|(name, slot)| {
                    match std::mem::replace(&mut slot.entry, Entry::Locked) {
                        Entry::Engine(engine) => Some((name.clone(), engine)),
                        other => {
                            slot.entry = other;
                            None
                        }
                    }
                })
                .collect()
        };
        // Each engine finishes (and saves) its running refresh, then drops its secrets.
        for (name, engine) in engines {
            engine.stop().await;
            let _ = engine.events().send(WatchEvent::State {
                profile: name,
                state: ProfileState::Locked,
                generation: 0,
                expires_at: None,
            });
        }
        info!("broker locked");
        Ok(())
    }
}

/// Checks a client credential (and method) sent with `Import` or `SetClient`:
/// an unusable key or a method that does not fit is refused before anything is saved.
fn check_credential(
    credential: &ClientCredential,
    method: Option<ClientAuthMethod>,
) -> crate::Result<()> {
    if let ClientCredential::Secret(s) | ClientCredential::PrivateKey(s) = credential {
        if s.is_empty() {
            return Err(Error::Invalid("the client credential is empty".into()));
        }
    }
    if let ClientCredential::PrivateKey(key) = credential {
        idp::client_auth::check_client_key(key)?;
    }
    if let Some(method) = method {
        idp::client_auth::check_method(credential, method)?;
    }
    Ok(())
}

/// Reads an imported token response obtained at `now_secs`. Without
/// `expires_in`, the lifetime is the access token's JWT `exp`, else
/// `default_lifetime_secs`. A response without a refresh token is refused.
fn issued_token(
    response: TokenResponse,
    now_secs: u64,
    default_lifetime_secs: u64,
) -> crate::Result<IssuedToken> {
    let Some(refresh_token) = response.refresh_token.clone() else {
        return Err(Error::Invalid(
            "the token response has no refresh_token; the broker needs one to keep the \
             session alive (request the offline_access scope)"
                .into(),
        ));
    };
    let (lifetime, lifetime_source) = engine::lifetime::lifetime(
        response.expires_in,
        response.access_token.expose(),
        now_secs,
        default_lifetime_secs,
    );
    // An import may carry an already expired token (`expires_in: 0`): keep 0, so
    // the first request refreshes it instead of serving it for a second.
    let lifetime_secs = if response.expires_in == Some(0) {
        0
    } else {
        lifetime
    };
    let mut secrets = idp::sanitize::Secrets::none();
    secrets.add(response.access_token.expose());
    secrets.add(refresh_token.expose());
    let subject = response
        .id_token
        .as_deref()
        .and_then(|t| idp::subject_from_id_token(t, &secrets));
    Ok(IssuedToken {
        granted_scopes: response.scopes(),
        access_token: response.access_token,
        token_type: response.token_type,
        refresh_token,
        lifetime_secs,
        lifetime_source,
        subject,
    })
}
