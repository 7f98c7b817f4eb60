//! `Watch` streams: the current state first, then every event of the profile's slot, across engines.

use futures::stream::{self, BoxStream, StreamExt};
use kontext_broker_protocol::{BrokerError, ProfileState, WatchEvent};
use tokio::sync::broadcast;

use super::registry::Entry;
use super::{unknown, Service};

/// Pushed events for one `Watch` request.
pub type WatchStream = BoxStream<'static, WatchEvent>;

impl Service {
    /// Subscribes to `profile`'s tokens and state changes. The stream starts with
    /// the current state and lives on through logout and a later login of the
    /// same name, so a long-running watcher never has to notice either.
    pub fn watch(&self, profile: &str) -> Result<WatchStream, BrokerError> {
        let (initial, rx) = {
            let profiles = self.inner.profiles.lock();
            let slot = profiles.get(profile).ok_or_else(|| unknown(profile))?;
            let rx = slot.events.subscribe();
            (current_events(profile, &slot.entry), rx)
        };
        let service = self.clone();
        let name = profile.to_owned();
        let live = stream::unfold(Some(rx), move |rx| {
            let service = service.clone();
            let name = name.clone();
            async move {
                let mut rx = rx?;
                match rx.recv().await {
                    Ok(event) => Some((vec![event], Some(rx))),
                    // Too slow for the backlog: send where things stand now.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        Some((service.events_now(&name), Some(rx)))
                    }
                    Err(broadcast::error::RecvError::Closed) => None,
                }
            }
        })
        .flat_map(stream::iter);
        Ok(stream::iter(initial).chain(live).boxed())
    }

    fn events_now(&self, profile: &str) -> Vec<WatchEvent> {
        self.inner
            .profiles
            .lock()
            .get(profile)
            .map(|slot| current_events(profile, &slot.entry))
            .unwrap_or_default()
    }
}

/// What a new (or lagging) watcher of `profile` is told first.
fn current_events(profile: &str, entry: &Entry) -> Vec<WatchEvent> {
    let state = match entry {
        Entry::Engine(engine) => return engine.current_events(),
        Entry::Locked => ProfileState::Locked,
        Entry::Failed { .. } => ProfileState::Error,
        Entry::Absent { .. } => {
            return vec![WatchEvent::Removed {
                profile: profile.to_owned(),
            }]
        }
    };
    vec![WatchEvent::State {
        profile: profile.to_owned(),
        state,
        generation: 0,
        expires_at: None,
    }]
}
