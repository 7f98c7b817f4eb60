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
        let live = stream::unfold(
            (rx, self.clone(), profile.to_owned()),
            |(mut rx, service, name)| async move {
                let events = match rx.recv().await {
                    Ok(event) => coalesce(event, &mut rx),
                    Err(broadcast::error::RecvError::Lagged(_)) => None,
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                // Too slow for the backlog: send where things stand now.
                let events = events.unwrap_or_else(|| service.events_now(&name));
                Some((events, (rx, service, name)))
            },
        )
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

/// `first` and the events already queued behind it, without those a later
/// one supersedes: a `State` is superseded by any later event, a `Token` by a
/// later `Token`. A watcher that falls behind (thousands of watchers woken by
/// one refresh) is sent where things stand, not every step on the way
/// (protocol/WIRE.md §8). `None` when the backlog overflowed meanwhile.
fn coalesce(
    first: WatchEvent,
    rx: &mut broadcast::Receiver<WatchEvent>,
) -> Option<Vec<WatchEvent>> {
    let mut events = vec![first];
    loop {
        match rx.try_recv() {
            Ok(next) => events.push(next),
            Err(broadcast::error::TryRecvError::Lagged(_)) => return None,
            Err(_) => break,
        }
    }
    Some(supersede(events))
}

/// `events` (oldest first) without the superseded ones; see [`coalesce`].
fn supersede(events: Vec<WatchEvent>) -> Vec<WatchEvent> {
    if events.len() == 1 {
        return events;
    }
    let mut kept: Vec<WatchEvent> = Vec::with_capacity(events.len());
    // Walk from the newest: an event survives unless something newer supersedes it.
    let mut newer_any = false;
    let mut newer_token = false;
    for event in events.into_iter().rev() {
        let superseded = match event {
            WatchEvent::State { .. } => newer_any,
            WatchEvent::Token { .. } => newer_token,
            _ => false,
        };
        newer_any = true;
        newer_token |= matches!(event, WatchEvent::Token { .. });
        if !superseded {
            kept.push(event);
        }
    }
    kept.reverse();
    kept
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

#[cfg(test)]
mod tests {
    use kontext_broker_protocol::{Secret, Token};

    use super::*;

    fn token(generation: u64) -> WatchEvent {
        WatchEvent::Token {
            profile: "p".into(),
            token: Token {
                access_token: Secret::new(format!("at-{generation}")),
                token_type: "Bearer".into(),
                expires_at: 4_000_000_000,
                issued_at: 3_999_999_000,
                scopes: vec![],
                generation,
            },
        }
    }

    fn state(state: ProfileState) -> WatchEvent {
        WatchEvent::State {
            profile: "p".into(),
            state,
            generation: 1,
            expires_at: None,
        }
    }

    #[test]
    fn a_state_is_superseded_by_any_later_event_and_a_token_by_a_later_token() {
        let removed = WatchEvent::Removed {
            profile: "p".into(),
        };
        let kept = supersede(vec![
            state(ProfileState::Refreshing),
            token(2),
            state(ProfileState::Refreshing),
            token(3),
            removed.clone(),
            state(ProfileState::Expired),
        ]);
        assert_eq!(kept, vec![token(3), removed, state(ProfileState::Expired)]);
    }

    #[test]
    fn a_lone_event_and_sticky_events_are_never_dropped() {
        assert_eq!(supersede(vec![token(2)]), vec![token(2)]);
        let reauth = WatchEvent::ReauthRequired {
            profile: "p".into(),
            message: "log in".into(),
        };
        let rejected = WatchEvent::ClientRejected {
            profile: "p".into(),
            message: "fix the client".into(),
        };
        let removed = WatchEvent::Removed {
            profile: "p".into(),
        };
        let sticky = vec![reauth, rejected, removed];
        let mut events = sticky.clone();
        events.push(token(2));
        let mut expected = sticky;
        expected.push(token(2));
        assert_eq!(supersede(events), expected);
    }

    #[tokio::test]
    async fn a_watcher_behind_gets_the_latest_and_one_that_overflowed_gets_none() {
        let (tx, mut rx) = broadcast::channel(4);
        tx.send(state(ProfileState::Refreshing)).unwrap();
        tx.send(token(2)).unwrap();
        let first = rx.recv().await.unwrap();
        assert_eq!(coalesce(first, &mut rx), Some(vec![token(2)]));

        tx.send(token(3)).unwrap();
        let first = rx.recv().await.unwrap();
        for g in 4..10 {
            tx.send(token(g)).unwrap();
        }
        assert_eq!(coalesce(first, &mut rx), None);
    }
}
