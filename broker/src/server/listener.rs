//! The accept loop: connection cap, peer credential check, one task per connection.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::handler::Handler;
use crate::service::Service;

/// Pause after an accept error such as EMFILE, which would otherwise repeat at once.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

pub(super) struct Listener {
    listener: UnixListener,
    service: Service,
    tracker: TaskTracker,
    /// One permit per open connection. Taken *before* accept, so connections past
    /// the cap wait in the kernel's backlog instead of being accepted and dropped.
    limit: Arc<Semaphore>,
    euid: u32,
}

impl Listener {
    pub(super) fn new(listener: UnixListener, service: Service, tracker: TaskTracker) -> Self {
        let limit = Arc::new(Semaphore::new(service.config().max_connections));
        Listener {
            listener,
            service,
            tracker,
            limit,
            euid: kontext_broker_protocol::paths::euid(),
        }
    }

    /// Runs until the shutdown token is cancelled; then the listener is dropped
    /// by the caller and new clients get `ECONNREFUSED`.
    pub(super) async fn run(self) {
        let shutdown = self.service.shutdown_token();
        let mut next_id: u64 = 0;
        loop {
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                permit = self.limit.clone().acquire_owned() => {
                    permit.expect("the connection semaphore is never closed")
                }
            };
            let stream = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        accept_error(e).await;
                        continue;
                    }
                },
            };
            let cred = match stream.peer_cred() {
                Ok(cred) => cred,
                Err(e) => {
                    warn!(error = %e, "cannot read peer credentials; closing");
                    continue;
                }
            };
            if cred.uid() != self.euid {
                // Count before closing, so a peer that sees the close also sees the count.
                self.service
                    .stats()
                    .rejected_peers
                    .fetch_add(1, Ordering::Relaxed);
                warn!(
                    uid = cred.uid(),
                    pid = cred.pid(),
                    "rejected connection from another user"
                );
                drop(stream);
                continue;
            }
            next_id = next_id.wrapping_add(1);
            debug!(conn = next_id, pid = cred.pid(), "accepted connection");
            let handler = Handler::new(next_id, self.service.clone(), self.tracker.clone());
            self.tracker.spawn(async move {
                handler.run(stream, permit).await;
                super::trim::connection_closed();
            });
        }
    }
}

async fn accept_error(e: io::Error) {
    // Running out of descriptors or memory is the case that repeats; everything
    // else (a peer that vanished between connect and accept) is per-connection.
    let exhausted = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if exhausted {
        warn!(error = %e, "accept failed; pausing");
        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
    } else {
        debug!(error = %e, "accept failed");
    }
}
