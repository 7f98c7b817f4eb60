//! Slows down passphrase guessing without ever blocking the broker.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kontext_broker_protocol::Secret;

use super::Store;
use crate::{Error, Result};

/// Serializes unlock attempts and makes each wrong passphrase cost a growing
/// delay: `base × 2^(failures-1)`, capped at `max`; a success resets it.
///
/// Shape: the service holds one `UnlockThrottle` and calls
/// [`UnlockThrottle::unlock`] for every `Unlock` request. Attempts run one at
/// a time (an async mutex, held across the scrypt work and the penalty), so
/// parallel connections cannot guess in parallel. The penalty is a tokio sleep
/// taken before the `WrongPassphrase` error is returned: it delays only unlock
/// callers, while token requests, `Lock`, `Status` and everything else go on.
#[derive(Debug)]
pub struct UnlockThrottle {
    attempt: tokio::sync::Mutex<()>,
    failures: AtomicU32,
    base: Duration,
    max: Duration,
}

impl Default for UnlockThrottle {
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(60))
    }
}

impl UnlockThrottle {
    /// A throttle whose first penalty is `base` and longest is `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        UnlockThrottle {
            attempt: tokio::sync::Mutex::new(()),
            failures: AtomicU32::new(0),
            base,
            max,
        }
    }

    /// Wrong passphrases since the last success.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The penalty after the `failures`-th consecutive wrong passphrase.
    pub fn delay_after(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(failures - 1).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// Unlocks `store` with `passphrase`, running scrypt on the blocking pool.
    /// On `WrongPassphrase` it first sleeps the growing penalty, then returns
    /// the error.
    pub async fn unlock(&self, store: Arc<Store>, passphrase: Secret) -> Result<()> {
        let _turn = self.attempt.lock().await;
        let result = store
            .run_blocking(move |store| store.unlock(&passphrase))
            .await;
        match result {
            Ok(()) => {
                self.failures.store(0, Ordering::Relaxed);
                Ok(())
            }
            Err(Error::WrongPassphrase) => {
                let n = self
                    .failures
                    .fetch_add(1, Ordering::Relaxed)
                    .saturating_add(1);
                let delay = self.delay_after(n);
                tracing::warn!(
                    failures = n,
                    delay_ms = delay.as_millis() as u64,
                    "wrong passphrase"
                );
                tokio::time::sleep(delay).await;
                Err(Error::WrongPassphrase)
            }
            Err(other) => Err(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_and_cap() {
        let t = UnlockThrottle::new(Duration::from_secs(1), Duration::from_secs(10));
        let d: Vec<u64> = (0..7).map(|n| t.delay_after(n).as_secs()).collect();
        assert_eq!(d, vec![0, 1, 2, 4, 8, 10, 10]);
        assert_eq!(t.delay_after(200), Duration::from_secs(10));
    }
}
