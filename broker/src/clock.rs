//! Wall-clock time, injectable so tests can jump time without sleeping.
//!
//! Token deadlines are wall-clock instants (unix time), because access tokens
//! expire by the IdP's wall clock, including across a laptop suspend. The engine
//! never sleeps longer than [`MAX_SLEEP`] at a time and re-reads the clock after
//! each sleep, so a suspend or a clock jump is noticed within that bound.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::watch;

/// Longest single sleep of any deadline loop.
pub const MAX_SLEEP: Duration = Duration::from_secs(30);

/// A source of wall-clock time and sleeps.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the unix epoch.
    fn now_ms(&self) -> u64;

    /// Completes after `duration` of this clock's time.
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()>;

    /// Whole seconds since the unix epoch.
    fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }
}

/// The real clock: `SystemTime` for now, tokio timers for sleeps.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        tokio::time::sleep(duration).boxed()
    }
}

/// A clock that only moves when a test moves it.
///
/// [`ManualClock::advance`] wakes sleepers whose time has come, like timers firing.
/// [`ManualClock::jump_silently`] moves the time without waking anyone, like a
/// laptop resuming from suspend while monotonic timers stood still.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<watch::Sender<u64>>,
}

impl ManualClock {
    /// A clock set to `start_ms` unix milliseconds.
    pub fn new(start_ms: u64) -> Self {
        ManualClock {
            now: Arc::new(watch::Sender::new(start_ms)),
        }
    }

    /// Moves time forward and wakes every sleeper that is now due.
    pub fn advance(&self, by: Duration) {
        self.now.send_modify(|now| *now += by.as_millis() as u64);
    }

    /// Moves time forward without waking sleepers (a suspend/resume).
    pub fn jump_silently(&self, by: Duration) {
        self.now.send_if_modified(|now| {
            *now += by.as_millis() as u64;
            false
        });
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        *self.now.borrow()
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        let mut rx = self.now.subscribe();
        let due = *rx.borrow() + duration.as_millis() as u64;
        async move {
            while *rx.borrow_and_update() < due {
                if rx.changed().await.is_err() {
                    // The clock is gone; nobody will ever wake us.
                    futures::future::pending::<()>().await;
                }
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_sleep_wakes_only_when_due() {
        let clock = ManualClock::new(1_000);
        let mut sleep = clock.sleep(Duration::from_secs(10));
        assert!(futures::poll!(&mut sleep).is_pending());
        clock.advance(Duration::from_secs(9));
        assert!(futures::poll!(&mut sleep).is_pending());
        clock.advance(Duration::from_secs(1));
        assert!(futures::poll!(&mut sleep).is_ready());
        assert_eq!(clock.now_secs(), 11);
    }

    #[tokio::test]
    async fn silent_jump_moves_time_and_later_sleeps_start_from_it() {
        let clock = ManualClock::new(0);
        let mut early = clock.sleep(Duration::from_secs(5));
        assert!(futures::poll!(&mut early).is_pending());
        clock.jump_silently(Duration::from_secs(60));
        assert_eq!(clock.now_secs(), 60);
        let mut late = clock.sleep(Duration::from_secs(5));
        assert!(futures::poll!(&mut late).is_pending());
        clock.advance(Duration::from_secs(5));
        assert!(futures::poll!(&mut late).is_ready());
        assert!(futures::poll!(&mut early).is_ready());
    }
}
