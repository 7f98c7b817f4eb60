//! Process hardening applied before anything else runs (contract §1).
//!
//! The broker holds refresh tokens in memory, so it must not leave core dumps,
//! must not be attachable by same-uid debuggers, and must create every file it
//! writes readable by its owner only.

use std::io;
use std::path::Path;

use crate::{Error, Result};

/// Applies umask 077, `RLIMIT_CORE=0` and anti-debugging (`PR_SET_DUMPABLE=0`
/// on Linux, `PT_DENY_ATTACH` on macOS). Call first thing, while single-threaded.
pub fn harden_process() -> io::Result<()> {
    use nix::sys::resource::{setrlimit, Resource};
    use nix::sys::stat::{umask, Mode};

    umask(Mode::from_bits_truncate(0o077));
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(io::Error::from)?;
    deny_debuggers()
}

#[cfg(target_os = "linux")]
fn deny_debuggers() -> io::Result<()> {
    // Non-dumpable also stops same-uid ptrace and /proc/PID/mem reads.
    nix::sys::prctl::set_dumpable(false).map_err(io::Error::from)
}

#[cfg(target_os = "macos")]
fn deny_debuggers() -> io::Result<()> {
    // SAFETY: PT_DENY_ATTACH takes no address or data and only affects this process.
    let rc = unsafe { libc::ptrace(libc::PT_DENY_ATTACH, 0, std::ptr::null_mut(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn deny_debuggers() -> io::Result<()> {
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, since every client holds
/// one descriptor. Returns the new soft limit.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};

    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    // macOS reports an unlimited hard limit but rejects a soft limit above OPEN_MAX.
    #[cfg(target_os = "macos")]
    let target = hard.min(10240);
    #[cfg(not(target_os = "macos"))]
    let target = hard;
    if soft >= target {
        return Ok(soft);
    }
    setrlimit(Resource::RLIMIT_NOFILE, target, hard).map_err(io::Error::from)?;
    Ok(target)
}

/// Creates `dir` (and missing parents) with mode 0700, then checks that it is
/// a directory owned by this user with no group or other permission bits.
///
/// Used for the state directory and the socket's directory: a directory another
/// user can write to would let them swap our files or sockets (the same rule as
/// ssh-agent and gpg-agent).
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};

    match std::fs::metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(format!("creating directory {}", dir.display()), e))?,
        Err(e) => return Err(Error::io(format!("inspecting {}", dir.display()), e)),
    }
    let euid = kontext_broker_protocol::paths::euid();
    // A symlink someone else owns could be re-pointed at their directory later
    // (the classic /tmp attack), whatever it points to now.
    let link = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format!("inspecting {}", dir.display()), e))?;
    if link.file_type().is_symlink() && link.uid() != euid {
        return Err(Error::UnsafePermissions {
            path: dir.to_path_buf(),
            problem: format!(
                "it is a symlink owned by uid {}, not by uid {euid}",
                link.uid()
            ),
            fix: format!("rm {}", dir.display()),
        });
    }
    let meta = std::fs::metadata(dir)
        .map_err(|e| Error::io(format!("inspecting {}", dir.display()), e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.is_dir() {
        return Err(Error::UnsafePermissions {
            path: dir.to_path_buf(),
            problem: "it is not a directory".into(),
            fix: format!("rm {}", dir.display()),
        });
    }
    if meta.uid() != euid {
        return Err(Error::UnsafePermissions {
            path: dir.to_path_buf(),
            problem: format!(
                "it is owned by uid {} (mode {mode:04o}), not by uid {euid}",
                meta.uid()
            ),
            fix: "--socket/--state-dir with a path in a directory you own".into(),
        });
    }
    if mode & 0o077 != 0 {
        return Err(Error::UnsafePermissions {
            path: dir.to_path_buf(),
            problem: format!(
                "its mode {mode:04o} gives access to group or others; it must be 0700"
            ),
            fix: format!("chmod 700 {}", dir.display()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_limit_is_raised_to_hard() {
        use nix::sys::resource::{getrlimit, Resource};
        let new = raise_fd_limit().unwrap();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, new);
        #[cfg(not(target_os = "macos"))]
        assert_eq!(soft, hard);
    }

    #[test]
    fn private_dir_is_created_0700_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure_private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "created with mode {mode:o}");
        ensure_private_dir(&dir).unwrap();

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        let err = ensure_private_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("0750") && err.contains("chmod 700"), "{err}");

        let file = tmp.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let err = ensure_private_dir(&file).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");

        // Our own symlink to a private directory is fine.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        ensure_private_dir(&link).unwrap();
        if kontext_broker_testutil::root("chown a symlink to another uid") {
            // Someone else's symlink is not, even to our own directory.
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                &link,
                Some(nix::unistd::Uid::from_raw(65534)),
                None,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .unwrap();
            let err = ensure_private_dir(&link).unwrap_err().to_string();
            assert!(err.contains("symlink owned by uid 65534"), "{err}");
        }
    }
}
