//! The socket server, in the mini-redis shape: a `Listener` accepts connections
//! (bounded by a semaphore, peer uid checked first) and a per-connection
//! `Handler` speaks the protocol, running each request in its own task.
//!
//! The server knows nothing about tokens: it hands requests to [`Service`].
//! Shutdown is the service's cancellation token (a `Shutdown` request or a signal).

mod handler;
mod listener;
mod output;
pub mod socket;
mod trim;

use std::time::Duration;

use tokio::net::UnixListener;
use tokio_util::task::TaskTracker;

use crate::service::Service;

/// A write that does not finish in this time means the peer stopped reading.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests of one connection running at once; more are not read until one ends.
pub const MAX_IN_FLIGHT: usize = 64;
/// `Watch` subscriptions one connection may hold.
pub const MAX_WATCHES: usize = 64;

/// Accepts connections until the service's shutdown token is cancelled.
///
/// Returns the (closed) tracker of every connection and request task still
/// running, so the caller can wait for them with its own deadline. Open
/// connections see the same token: they stop reading, flush the answers of
/// requests already running, and close.
pub async fn serve(listener: UnixListener, service: Service) -> TaskTracker {
    let tracker = TaskTracker::new();
    listener::Listener::new(listener, service, tracker.clone())
        .run()
        .await;
    tracker.close();
    tracker
}
