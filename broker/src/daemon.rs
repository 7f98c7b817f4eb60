//! The `kontext-broker` process: startup order, single-instance lock, signals,
//! and orderly shutdown (contract §1). `main` only parses [`Args`] and calls [`run`].

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use kontext_broker_protocol::paths;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::Config;
use crate::server::{self, socket};
use crate::service::{Service, ServiceInfo};
use crate::{hardening, Error};

/// From a stop signal to exit, contract §1 allows 5 s; we aim to finish inside this.
const SHUTDOWN_BUDGET: Duration = Duration::from_millis(4500);
/// Share of the budget for open connections to flush their answers.
const HANDLER_GRACE: Duration = Duration::from_secs(2);

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Command line of `kontext-broker`. Unset paths fall back to the environment
/// and XDG defaults of contract §1 (see `kontext_broker_protocol::paths`).
#[derive(Debug, clap::Parser)]
#[command(name = "kontext-broker", version, about)]
pub struct Args {
    /// Socket path [env: KONTEXT_BROKER_SOCKET; default $XDG_RUNTIME_DIR/kontext/broker.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// State directory [env: KONTEXT_BROKER_STATE_DIR; default $XDG_STATE_HOME/kontext/broker].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Config file [env: KONTEXT_BROKER_CONFIG; default $XDG_CONFIG_HOME/kontext/broker.toml].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr; the filter comes from RUST_LOG (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Runs the broker until a stop signal or a `Shutdown` request.
pub fn run(args: Args) -> anyhow::Result<()> {
    // While still single-threaded: umask and prctl apply to every later thread.
    hardening::harden_process().context("hardening the process")?;
    init_logging(args.log_format);
    // Reads and unsets LISTEN_* (environment changes need a single thread).
    let activated = socket::activated_listener()?;
    match hardening::raise_fd_limit() {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(e) => warn!(error = %e, "cannot raise the open file limit"),
    }

    let socket_path = paths::socket_path(args.socket.as_deref());
    let state_dir = paths::state_dir(args.state_dir.as_deref())?;
    let config_path = paths::config_path(args.config.as_deref());
    let config = Config::load(config_path.as_deref())?;

    hardening::ensure_private_dir(&state_dir)?;
    let _lock = InstanceLock::acquire(&state_dir)?;

    let (listener, socket_file) = match activated {
        Some(listener) => {
            info!("using the socket passed by systemd");
            (listener, None)
        }
        None => {
            let (listener, file) = socket::bind(&socket_path)?;
            (listener, Some(file))
        }
    };
    listener
        .set_nonblocking(true)
        .context("making the socket non-blocking")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kontext-broker")
        .build()
        .context("starting the async runtime")?;
    let info = ServiceInfo {
        socket: socket_path.clone(),
        state_dir,
    };
    // Served from a worker thread, not the thread blocked here: the worker that
    // polls the socket then accepts and starts the connection itself, instead
    // of waking this thread and then another worker for every new connection.
    let result = runtime.block_on(async {
        tokio::spawn(serve(listener, config, info))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the server task failed: {e}")))
    });
    // Tasks past their grace are dropped here.
    runtime.shutdown_timeout(Duration::from_millis(200));
    // Remove the socket only after the last answer went out.
    drop(socket_file);
    result?;
    info!("stopped");
    Ok(())
}

async fn serve(
    listener: std::os::unix::net::UnixListener,
    config: Config,
    info: ServiceInfo,
) -> anyhow::Result<()> {
    let listener =
        tokio::net::UnixListener::from_std(listener).context("registering the socket")?;
    let socket = info.socket.clone();
    // Opening the store checks permissions, creates the identity on first start
    // and starts one engine per profile.
    let service = Service::open(config, info).await?;
    let shutdown = service.shutdown_token();
    spawn_signal_watch(shutdown.clone())?;

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    info!(socket = %socket.display(), pid = std::process::id(), "listening");

    let tracker = server::serve(listener, service.clone()).await;
    let deadline = Instant::now() + SHUTDOWN_BUDGET;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    info!("stopping: no new connections");

    // Engines stop first (each finishes and saves its running refresh, and starts
    // no new one), alongside the grace period for connections. Draining only
    // after the grace would let a proactive refresh start late and be cut off
    // after the IdP rotated the token: a lost refresh token.
    let engines = async {
        if tokio::time::timeout_at(deadline, service.drain())
            .await
            .is_err()
        {
            warn!("a refresh did not finish before the shutdown deadline");
        }
    };
    let connections = async {
        if tokio::time::timeout(HANDLER_GRACE, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                tasks = tracker.len(),
                "connections still busy after the grace period; closing them"
            );
        }
    };
    tokio::join!(engines, connections);
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
fn spawn_signal_watch(shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = shutdown.cancelled() => return,
        };
        info!(signal = name, "shutting down");
        shutdown.cancel();
    });
    Ok(())
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The exclusive lock on `<state>/broker.lock`, holding our pid. Released when
/// dropped or when the process dies (it is an `flock`), so it is never stale.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    /// Takes the lock, or fails with [`Error::AlreadyRunning`] naming the holder.
    pub fn acquire(state_dir: &Path) -> crate::Result<InstanceLock> {
        let path = state_dir.join("broker.lock");
        let io_err = |what: &str, e| Error::io(format!("{what} {}", path.display()), e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| match e.kind() {
                ErrorKind::ReadOnlyFilesystem | ErrorKind::PermissionDenied => {
                    not_writable(state_dir, &path, e)
                }
                _ => io_err("opening", e),
            })?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0).map_err(|e| io_err("truncating", e))?;
                file.rewind().map_err(|e| io_err("rewinding", e))?;
                writeln!(file, "{}", std::process::id()).map_err(|e| io_err("writing", e))?;
                Ok(InstanceLock { _file: file })
            }
            Err(TryLockError::WouldBlock) => Err(Error::AlreadyRunning {
                pid: holder_pid(&mut file),
            }),
            Err(TryLockError::Error(e)) => Err(io_err("locking", e)),
        }
    }
}

/// The startup error for a state dir the broker cannot write to.
fn not_writable(state_dir: &Path, lock: &Path, e: std::io::Error) -> Error {
    let context = format!(
        "the state directory {} is read-only or not writable (cannot create {}); make it \
         writable, or choose another with --state-dir or KONTEXT_BROKER_STATE_DIR",
        state_dir.display(),
        lock.display()
    );
    Error::io(context, e)
}

/// Reads the lock holder's pid. The holder writes it right after locking, so an
/// empty file means it is starting: retry briefly. 0 when it never appears.
fn holder_pid(file: &mut File) -> u32 {
    for _ in 0..50 {
        let mut text = String::new();
        if file.rewind().is_ok() && file.read_to_string(&mut text).is_ok() {
            if let Ok(pid) = text.trim().parse() {
                return pid;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_names_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let first = InstanceLock::acquire(tmp.path()).unwrap();
        match InstanceLock::acquire(tmp.path()) {
            Err(Error::AlreadyRunning { pid }) => assert_eq!(pid, std::process::id()),
            other => panic!("expected AlreadyRunning, got {other:?}"),
        }
        drop(first);
        InstanceLock::acquire(tmp.path()).unwrap();
    }
}
