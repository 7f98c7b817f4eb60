//! The listening socket: binding it safely, or taking it from systemd (contract §1).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::hardening::ensure_private_dir;
use crate::{Error, Result};

/// The socket file we created. Dropping it removes the file, but only if the path
/// still names the socket we bound (another broker may have replaced it since).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    identity: FileIdentity,
}

/// Device, inode and change time: inode numbers alone are reused at once on tmpfs.
#[derive(Debug, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileIdentity {
    fn of(meta: &std::fs::Metadata) -> Self {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

impl SocketFile {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if FileIdentity::of(&meta) == self.identity => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove socket");
                }
            }
            _ => {}
        }
    }
}

/// Binds a listening socket at `path`.
///
/// The directory is created 0700 or must already be private to us. An existing
/// socket that answers means another broker is serving and we refuse; one that
/// refuses connections is stale and replaced. The socket ends up mode 0600.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile)> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    ensure_private_dir(dir)?;
    remove_stale(path)?;

    let listener = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("binding socket {}", path.display()), e))?;
    // Re-listening only raises the backlog: past the connection cap, clients wait
    // in it, and a short backlog would make their connect() fail instead.
    let _ = nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::MAXCONN);
    // umask 077 already gives 0600; set it explicitly anyway and verify.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod 600 {}", path.display()), e))?;
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| Error::io(format!("inspecting socket {}", path.display()), e))?;
    let mode = meta.permissions().mode() & 0o777;
    let file = SocketFile {
        path: path.to_path_buf(),
        identity: FileIdentity::of(&meta),
    };
    if mode != 0o600 {
        return Err(Error::UnsafePermissions {
            path: path.to_path_buf(),
            problem: format!("the socket has mode {mode:04o} after chmod 600"),
            fix: "a socket path on a filesystem that honours Unix permissions".into(),
        });
    }
    Ok((listener, file))
}

/// Removes a socket file nobody listens on; refuses when a broker answers.
fn remove_stale(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("inspecting {}", path.display()), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::UnsafePermissions {
            path: path.to_path_buf(),
            problem: "it exists and is not a socket".into(),
            fix: format!("rm {}", path.display()),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::io(
            format!(
                "another broker is serving {}; stop it with `broker-ctl shutdown` or choose another --socket",
                path.display()
            ),
            io::Error::from(io::ErrorKind::AddrInUse),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing stale socket");
            std::fs::remove_file(path)
                .map_err(|e| Error::io(format!("removing stale socket {}", path.display()), e))
        }
        Err(e) => Err(Error::io(
            format!("probing existing socket {}", path.display()),
            e,
        )),
    }
}

/// The listener passed by systemd socket activation, if any.
///
/// Reads and unsets `LISTEN_PID`/`LISTEN_FDS`, so call it while the process is
/// still single-threaded.
pub fn activated_listener() -> Result<Option<UnixListener>> {
    let mut fds = sd_notify::listen_fds()
        .map_err(|e| Error::io("reading LISTEN_FDS for socket activation", e))?;
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    // SAFETY: systemd passed us this descriptor (LISTEN_PID is our pid) and nothing
    // else in the process owns it.
    let listener = UnixListener::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // Fails unless the descriptor is a Unix socket.
    listener
        .local_addr()
        .map_err(|e| Error::io("LISTEN_FDS descriptor 3 is not a Unix socket", e))?;
    Ok(Some(listener))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_is_replaced_and_live_one_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s/broker.sock");
        let (live, file) = bind(&path).unwrap();
        let err = bind(&path).unwrap_err().to_string();
        assert!(err.contains("another broker is serving"), "{err}");
        drop(live);
        // The file remains (we still hold `file`) but nobody listens: stale.
        let (_again, file2) = bind(&path).unwrap();
        // The first guard must not remove the new socket.
        drop(file);
        assert!(path.exists());
        drop(file2);
        assert!(!path.exists());
    }

    #[test]
    fn refuses_a_non_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        ensure_private_dir(&dir).unwrap();
        let path = dir.join("broker.sock");
        std::fs::write(&path, b"x").unwrap();
        let err = bind(&path).unwrap_err().to_string();
        assert!(err.contains("not a socket"), "{err}");
    }
}
