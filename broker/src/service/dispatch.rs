//! One request to its handler: [`Service::call`] for every request but `Watch`, and the cached-token fast path.

use std::sync::Arc;

use kontext_broker_protocol::codec::EncodedToken;
use kontext_broker_protocol::{BrokerError, Request, Response};
use tracing::info;

use super::Service;

impl Service {
    /// Handles every request except `Watch` (see [`Service::watch`]).
    pub async fn call(&self, request: Request) -> Result<Response, BrokerError> {
        match request {
            Request::GetToken {
                profile,
                min_valid_secs,
            } => self
                .engine(&profile)?
                .get_token(min_valid_secs)
                .await
                .map(Response::Token),
            Request::Invalidate {
                profile,
                generation,
            } => self
                .engine(&profile)?
                .invalidate(generation)
                .await
                .map(Response::Token),
            Request::Refresh { profile } => {
                self.engine(&profile)?.refresh().await.map(Response::Token)
            }
            Request::Status => Ok(Response::Status(self.status(None))),
            Request::StatusPage { after } => Ok(Response::Status(self.status(Some(&after)))),
            Request::Import(import) => self.import(import).await.map(Response::Imported),
            Request::Logout { profile, revoke } => self.logout(&profile, revoke).await,
            Request::Unlock { passphrase } => {
                self.unlock(passphrase).await.map(|()| Response::Done)
            }
            Request::Lock => self.lock().await.map(|()| Response::Done),
            Request::Shutdown => {
                info!("shutdown requested by a client");
                self.inner.shutdown.cancel();
                Ok(Response::Done)
            }
            Request::Ping => Ok(Response::Pong),
            Request::SetClient(set) => self.set_client(set).await.map(Response::Token),
            Request::Watch { .. } => Err(BrokerError::bad_request(
                "Watch is a subscription; the connection handler serves it",
            )),
        }
    }

    /// The ready answer frame of a `GetToken` that the profile's cached token
    /// serves, found without waiting or allocating. `None` means "ask [`Service::call`]",
    /// which also produces every error.
    pub fn cached_token_frame(
        &self,
        profile: &str,
        min_valid_secs: u64,
    ) -> Option<Arc<EncodedToken>> {
        self.inner
            .profiles
            .running(profile)?
            .cached_frame(min_valid_secs)
    }
}
