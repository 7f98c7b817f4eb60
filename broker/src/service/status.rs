//! `Status` and `StatusPage`: the broker's counters and one page of profiles that fits a frame.

use std::ops::Bound::{Excluded, Unbounded};
use std::sync::atomic::Ordering;

use kontext_broker_protocol::{BrokerStatus, ProfileState, ProfileStatus, StatusReport};

use super::registry::Entry;
use super::Service;

/// Encoded bytes of profile entries in one `status` page, with the broker
/// entry. The rest of the 64 KiB frame is headroom for the envelope (ids,
/// tags, `next_after`); every field of an entry is bounded (see
/// [`crate::bounds`]), so each entry is a few KiB at most.
const STATUS_PAGE_BUDGET: usize = kontext_broker_protocol::MAX_FRAME_LEN - 1024;

/// Bytes `value` takes on the wire.
fn encoded_len<T: serde::Serialize>(value: &T) -> usize {
    kontext_broker_protocol::codec::encode(value).map_or(usize::MAX / 2, |v| v.len())
}

impl Service {
    /// One page of `status`: the profiles whose names sort after `after` (all
    /// from the first when `None`), as many as fit [`STATUS_PAGE_BUDGET`]
    /// encoded bytes; `next_after` names the last one when more follow.
    pub(super) fn status(&self, after: Option<&str>) -> StatusReport {
        let broker = self.broker_status();
        let budget = STATUS_PAGE_BUDGET.saturating_sub(encoded_len(&broker));
        let mut used = 0;
        let mut profiles = Vec::new();
        let mut next_after = None;
        let slots = self.inner.profiles.lock();
        let range = match after {
            Some(after) => slots.range::<str, _>((Excluded(after), Unbounded)),
            None => slots.range::<str, _>(..),
        };
        for (name, slot) in range {
            let status = match &slot.entry {
                Entry::Engine(engine) => engine.status(),
                Entry::Locked => ProfileStatus::bare(name, ProfileState::Locked, None),
                Entry::Failed { error } => {
                    ProfileStatus::bare(name, ProfileState::Error, Some(error.clone()))
                }
                Entry::Absent { .. } => continue,
            };
            let size = encoded_len(&status);
            if !profiles.is_empty() && used + size > budget {
                next_after = profiles.last().map(|p: &ProfileStatus| p.name.clone());
                break;
            }
            used += size;
            profiles.push(status);
        }
        StatusReport {
            broker,
            profiles,
            next_after,
        }
    }

    fn broker_status(&self) -> BrokerStatus {
        let stats = &self.inner.stats;
        BrokerStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            uptime_secs: self.inner.started.elapsed().as_secs(),
            socket: self.inner.info.socket.display().to_string(),
            state_dir: self.inner.info.state_dir.display().to_string(),
            locked: self.inner.store.is_locked(),
            connections: stats.connections.load(Ordering::Relaxed),
            rejected_peers: stats.rejected_peers.load(Ordering::Relaxed),
            handshake_timeouts: stats.handshake_timeouts.load(Ordering::Relaxed),
        }
    }
}
