//! The profile registry: one slot per profile name, what is known about it, and the only place engines start.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kontext_broker_protocol::{BrokerError, WatchEvent};
use tokio::sync::broadcast;
use tracing::warn;

use super::{unknown, Service};
use crate::engine::{self, EngineHandle};
use crate::store::ProfileRecord;
use crate::Error;

/// Events buffered per profile for slow watchers; a watcher that falls further
/// behind is sent the current state instead of the backlog.
const WATCH_BUFFER: usize = 64;

/// Every profile's slot, by name (sorted, for `Status` pages).
pub(super) type Slots = BTreeMap<String, Slot>;

/// One profile: its watcher channel, which outlives engines, and its [`Entry`].
pub(super) struct Slot {
    pub(super) events: broadcast::Sender<WatchEvent>,
    pub(super) entry: Entry,
}

/// What is known about a profile.
pub(super) enum Entry {
    /// The profile is loaded and its engine runs.
    Engine(Arc<EngineHandle>),
    /// The store is locked; only the name is known.
    Locked,
    /// The profile file could not be loaded.
    Failed { error: String },
    /// Logged out (or being logged out). The slot stays so watchers keep their
    /// subscription and see the next login of this name, whose generations
    /// continue above `last_generation`.
    Absent { last_generation: u64 },
}

/// The slots behind one short synchronous mutex (never held across an await).
#[derive(Default)]
pub(super) struct Registry {
    slots: Mutex<Slots>,
}

impl Registry {
    /// The slots, locked. A poisoned lock is taken over: every update of a
    /// slot is a single assignment, so no half-made state can be seen.
    pub(super) fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The running engine of `profile`, if it has one.
    pub(super) fn running(&self, profile: &str) -> Option<Arc<EngineHandle>> {
        match &self.lock().get(profile)?.entry {
            Entry::Engine(engine) => Some(engine.clone()),
            _ => None,
        }
    }
}

/// The watcher channel of `profile`: its slot's, so watchers carry over to a
/// new engine, or a new one.
pub(super) fn events_in(slots: &Slots, profile: &str) -> broadcast::Sender<WatchEvent> {
    slots
        .get(profile)
        .map(|s| s.events.clone())
        .unwrap_or_else(|| broadcast::channel(WATCH_BUFFER).0)
}

/// Sets `profile`'s entry. A new slot takes the engine's channel, or a fresh one.
pub(super) fn set_entry(slots: &mut Slots, profile: &str, entry: Entry) {
    match slots.get_mut(profile) {
        Some(slot) => slot.entry = entry,
        None => {
            let events = match &entry {
                Entry::Engine(engine) => engine.events().clone(),
                _ => broadcast::channel(WATCH_BUFFER).0,
            };
            slots.insert(profile.to_owned(), Slot { events, entry });
        }
    }
}

/// Every running engine.
pub(super) fn engines(slots: &Slots) -> Vec<Arc<EngineHandle>> {
    slots
        .values()
        .filter_map(|slot| match &slot.entry {
            Entry::Engine(engine) => Some(engine.clone()),
            _ => None,
        })
        .collect()
}

impl Service {
    /// The engine serving `profile`, or the error that says why there is none.
    pub(super) fn engine(&self, profile: &str) -> Result<Arc<EngineHandle>, BrokerError> {
        match self.inner.profiles.lock().get(profile).map(|s| &s.entry) {
            Some(Entry::Engine(engine)) => Ok(engine.clone()),
            Some(Entry::Locked) => Err(BrokerError::Locked),
            Some(Entry::Failed { error }) => Err(BrokerError::internal(format!(
                "profile `{profile}` is unusable: {error}"
            ))),
            Some(Entry::Absent { .. }) | None => Err(unknown(profile)),
        }
    }

    /// Starts the engine of a profile loaded from its file, on the watcher channel `events`.
    fn spawn_loaded(
        &self,
        record: ProfileRecord,
        events: broadcast::Sender<WatchEvent>,
    ) -> Arc<EngineHandle> {
        Arc::new(engine::spawn(record, self.inner.deps.clone(), events))
    }

    /// Starts the engine of a new profile, on the watcher channel `events`. The
    /// engine saves the profile before it runs (only an engine writes a
    /// profile's file); a failed save starts nothing.
    pub(super) async fn create_new(
        &self,
        record: ProfileRecord,
        events: broadcast::Sender<WatchEvent>,
    ) -> crate::Result<Arc<EngineHandle>> {
        Ok(Arc::new(
            engine::create(record, self.inner.deps.clone(), events).await?,
        ))
    }

    /// Fills the slots from the store: engines when unlocked, names when locked.
    pub(super) async fn load_profiles(&self) -> crate::Result<()> {
        let loaded = self
            .inner
            .store
            .run_blocking(|store| {
                let names = store.profile_names()?;
                if store.is_locked() {
                    return Ok(names.into_iter().map(|n| (n, Err(Error::Locked))).collect());
                }
                Ok(names
                    .into_iter()
                    .map(|n| {
                        let record = store.load(&n);
                        (n, record)
                    })
                    .collect::<Vec<_>>())
            })
            .await?;
        let mut profiles = self.inner.profiles.lock();
        if self.closing() {
            return Err(Error::Invalid("the broker is shutting down".into()));
        }
        for (name, record) in loaded {
            if matches!(
                profiles.get(&name).map(|s| &s.entry),
                Some(Entry::Engine(_))
            ) {
                // Imported meanwhile; that engine is newer than the file we read.
                continue;
            }
            let entry = match record {
                Ok(mut record) => {
                    if let Some(table) = self.inner.config.profiles.get(&name) {
                        table.apply_to(&mut record.endpoints);
                    }
                    Entry::Engine(self.spawn_loaded(record, events_in(&profiles, &name)))
                }
                Err(Error::Locked) => Entry::Locked,
                Err(e) => {
                    warn!(profile = %name, error = %e, "profile could not be loaded");
                    Entry::Failed {
                        error: e.to_string(),
                    }
                }
            };
            set_entry(&mut profiles, &name, entry);
        }
        Ok(())
    }
}
