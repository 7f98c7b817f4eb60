//! The publisher: after every actor turn, the [`Snapshot`] that readers use
//! (the fast path, `status`) and the watch events for what changed.
//!
//! Everything published is derived from the phase and the record alone.

use std::sync::Arc;

use kontext_broker_protocol::codec::EncodedToken;
use kontext_broker_protocol::{ProfileState, ProfileStatus, WatchEvent};

use super::phase::Phase;
use super::state::Core;
use super::{policy, PhaseKind, Snapshot};

/// Refresh counters shown in `status`.
#[derive(Default)]
pub(super) struct Counters {
    pub refresh_count: u64,
    pub refresh_failures: u64,
    pub last_refresh_at: Option<u64>,
    pub last_error: Option<String>,
}

/// What watchers were last told, so every change is pushed exactly once.
#[derive(Default)]
pub(super) struct Published {
    state: Option<ProfileState>,
    token_generation: u64,
}

impl Core {
    /// Publishes the snapshot for `phase` and pushes what changed to watchers.
    pub(super) fn publish(&mut self, phase: &Phase) {
        let now = self.now();
        let token = self.serveable(phase);
        let snapshot = Snapshot {
            // Encoded here, once per change, so cached answers cost a copy only.
            wire: token
                .as_ref()
                .and_then(|t| EncodedToken::new(t).ok())
                .map(Arc::new),
            token: token.clone(),
            phase: phase.kind(),
            refresh_due_ms: self.refresh_due_ms(),
            status: self.status(phase),
            client_rejected: matches!(phase, Phase::ClientRejected)
                .then(|| self.client_rejected_message()),
        };
        let state = snapshot.state(now);
        let mut status = snapshot.status.clone();
        status.state = state;
        self.snapshot.send_replace(Snapshot { status, ..snapshot });

        let profile = self.record.name.clone();
        let event = match token {
            Some(token)
                if token.generation != self.published.token_generation
                    && policy::unexpired(&token, now) =>
            {
                self.published.token_generation = token.generation;
                Some(WatchEvent::Token { profile, token })
            }
            _ if self.published.state == Some(state) => None,
            _ if state == ProfileState::ReauthRequired => Some(WatchEvent::ReauthRequired {
                profile,
                message: self.deps.config.reauth_message.clone(),
            }),
            _ if state == ProfileState::ClientRejected => Some(WatchEvent::ClientRejected {
                profile,
                message: self.client_rejected_message(),
            }),
            _ => Some(WatchEvent::State {
                profile,
                state,
                generation: self.record.generation,
                expires_at: self.record.access_token.as_ref().map(|a| a.expires_at),
            }),
        };
        self.published.state = Some(state);
        if let Some(event) = event {
            // No receivers is fine: nobody is watching.
            let _ = self.events.send(event);
        }
    }

    /// Status fields except the time-derived state.
    fn status(&self, phase: &Phase) -> ProfileStatus {
        let r = &self.record;
        let next_refresh_at = match phase.kind() {
            PhaseKind::Backoff { until_ms } => Some(until_ms / 1000),
            PhaseKind::Idle => self.refresh_due_ms().map(|ms| ms / 1000),
            PhaseKind::Busy | PhaseKind::ReauthRequired | PhaseKind::ClientRejected => None,
        };
        ProfileStatus {
            name: r.name.clone(),
            issuer: r.issuer.clone(),
            client_id: r.client_id.clone(),
            subject: r.subject.clone(),
            state: ProfileState::Valid,
            access_token_expires_at: r.access_token.as_ref().map(|a| a.expires_at),
            generation: r.generation,
            refresh_count: self.counters.refresh_count,
            refresh_failures: self.counters.refresh_failures,
            last_refresh_at: self.counters.last_refresh_at,
            next_refresh_at,
            last_error: self.counters.last_error.clone(),
            lifetime_source: r.access_token.as_ref().and_then(|a| a.lifetime_source),
        }
    }
}

/// The snapshot a new engine holds before its first publish.
pub(super) fn placeholder_snapshot() -> Snapshot {
    Snapshot {
        token: None,
        wire: None,
        phase: PhaseKind::Idle,
        refresh_due_ms: None,
        status: ProfileStatus::bare("", ProfileState::Expired, None),
        client_rejected: None,
    }
}
