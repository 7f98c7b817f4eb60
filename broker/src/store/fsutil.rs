//! File-system helpers for the store: private directories, permission checks,
//! no-follow reads and atomic writes.
//!
//! Everything here creates files and directories with their final private mode
//! from the first syscall (`O_CREAT` with 0600, `mkdir` with 0700), so there is
//! never a window in which a secret-bearing path is readable by others.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use kontext_broker_protocol::paths::euid;
use zeroize::Zeroizing;

use crate::{Error, Result};

/// Mode bits that must be clear on every private file and directory.
const GROUP_OTHER: u32 = 0o077;

/// Creates `dir` (and missing parents) with mode 0700 if it does not exist, then
/// checks that it is a directory owned by us with no group/other bits.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<()> {
    match fs::metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::io(format!("creating directory {}", dir.display()), e))?;
        }
        Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
    }
    check_private_dir(dir)
}

/// Refuses a directory that is not ours or that group/others may access.
pub(crate) fn check_private_dir(dir: &Path) -> Result<()> {
    let meta = fs::metadata(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(Error::UnsafePermissions {
            path: dir.to_path_buf(),
            problem: "not a directory".into(),
            fix: format!("rm {} (then restart)", dir.display()),
        });
    }
    check_owner_and_mode(dir, &meta, "700")
}

/// Checks that `meta` (of `path`) belongs to our uid and has no group/other bits.
/// `octal` is the mode named in the suggested `chmod`.
pub(crate) fn check_owner_and_mode(path: &Path, meta: &fs::Metadata, octal: &str) -> Result<()> {
    let me = euid();
    if meta.uid() != me {
        return Err(Error::UnsafePermissions {
            path: path.to_path_buf(),
            problem: format!("owned by uid {}, not by this user (uid {me})", meta.uid()),
            fix: format!("chown {me} {}", path.display()),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & GROUP_OTHER != 0 {
        return Err(Error::UnsafePermissions {
            path: path.to_path_buf(),
            problem: format!("mode {mode:04o} lets group or others access it"),
            fix: format!("chmod {octal} {}", path.display()),
        });
    }
    Ok(())
}

/// Opens `path` read-only without following a final symlink, and without
/// blocking: opening a FIFO someone planted returns at once (the caller's
/// `fstat` then refuses it) instead of waiting forever for a writer.
pub(crate) fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// Largest file the store reads: profile records and identities are a few KiB.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Refuses what the open descriptor's `meta` shows is not a regular file of
/// at most [`MAX_FILE_BYTES`], so such a file is never read.
pub(crate) fn check_readable(path: &Path, meta: &fs::Metadata) -> Result<()> {
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(Error::RefusedFile {
            path: path.to_path_buf(),
            problem: format!("it is {what}, not a regular file"),
        });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Error::RefusedFile {
            path: path.to_path_buf(),
            problem: format!(
                "it has {} bytes, more than the {MAX_FILE_BYTES} a broker file may have",
                meta.len()
            ),
        });
    }
    Ok(())
}

/// Reads a private file: regular, ours, mode without group/other bits. The
/// checks run on the open descriptor, so the file checked is the file read.
/// `Ok(None)` when the file does not exist.
pub(crate) fn read_private_file(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>> {
    let ctx = || format!("reading {}", path.display());
    let mut file = match open_nofollow(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Error::UnsafePermissions {
                path: path.to_path_buf(),
                problem: "is a symbolic link".into(),
                fix: format!("replace {} with a regular file", path.display()),
            })
        }
        Err(e) => return Err(Error::io(ctx(), e)),
    };
    let meta = file.metadata().map_err(|e| Error::io(ctx(), e))?;
    check_readable(path, &meta)?;
    check_owner_and_mode(path, &meta, "600")?;
    read_all(&mut file, meta.len())
        .map(Some)
        .map_err(|e| Error::io(ctx(), e))
}

/// Reads the whole file into a zeroizing buffer sized up front, so no
/// reallocation leaves an unzeroed copy behind. Never reads (or reserves)
/// more than [`MAX_FILE_BYTES`] + 1 bytes, whatever `len_hint` or the file
/// says; a file that grew past the cap since its `fstat` is an error.
pub(crate) fn read_all(file: &mut File, len_hint: u64) -> io::Result<Zeroizing<Vec<u8>>> {
    let cap = len_hint.min(MAX_FILE_BYTES) as usize + 1;
    let mut buf = Zeroizing::new(Vec::with_capacity(cap));
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(io::Error::other(format!(
            "the file grew past {MAX_FILE_BYTES} bytes while it was read"
        )));
    }
    Ok(buf)
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Prefix-free marker in temp file names; [`is_temp_name`] recognises it.
const TEMP_MARK: &str = ".tmp-";

/// A unique hidden temp name next to `final_name`: pid, a counter and random bits,
/// so concurrent writers in one process or several never collide.
fn temp_name(final_name: &str) -> String {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let r: u32 = rand::random();
    format!(".{final_name}{TEMP_MARK}{}-{n}-{r:08x}", std::process::id())
}

/// True for names produced by [`temp_name`].
pub(crate) fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(TEMP_MARK)
}

/// Writes `bytes` to `dir/final_name` atomically (see [`write_atomic_with`]).
pub(crate) fn write_atomic(dir: &Path, final_name: &str, bytes: &[u8]) -> Result<()> {
    write_atomic_with(dir, final_name, |f| f.write_all(bytes), || Ok(()))
}

/// Atomic replace: a fresh temp file (O_EXCL, 0600) in the same directory,
/// `write` fills it, fsync, then `commit` runs (the caller's chance to take a
/// lock), rename over the target and fsync the directory.
///
/// On any failure before the rename the temp file is removed and the previous
/// target is untouched; a reader sees either the old or the new file, never a
/// mix. After a crash at most a stale temp file remains.
pub(crate) fn write_atomic_with<W, C, G>(
    dir: &Path,
    final_name: &str,
    write: W,
    commit: C,
) -> Result<()>
where
    W: FnOnce(&mut File) -> io::Result<()>,
    C: FnOnce() -> Result<G>,
{
    let target = dir.join(final_name);
    let tmp = dir.join(temp_name(final_name));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    let written = write(&mut file).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(format!("writing {}", target.display()), e));
    }
    let guard = match commit() {
        Ok(g) => g,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = fs::rename(&tmp, &target) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(format!("replacing {}", target.display()), e));
    }
    drop(guard);
    sync_dir(dir)
}

/// Like [`write_atomic`], but never replaces an existing `final_name`: the
/// complete temp file is hard-linked into place, which fails if the name is
/// taken. Returns `false` (and writes nothing) when the file already existed,
/// so two processes racing to create an identity end up sharing one.
pub(crate) fn write_new_atomic(dir: &Path, final_name: &str, bytes: &[u8]) -> Result<bool> {
    let target = dir.join(final_name);
    let tmp = dir.join(temp_name(final_name));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(format!("writing {}", target.display()), e));
    }
    let linked = fs::hard_link(&tmp, &target);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => sync_dir(dir).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::io(format!("creating {}", target.display()), e)),
    }
}

/// fsyncs a directory so a rename or unlink in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

/// Moves `path` aside to `<path>.<suffix>` (or `<path>.<suffix>-N` if taken)
/// without ever replacing an existing file, and returns the new path.
pub(crate) fn move_aside(path: &Path, suffix: &str) -> Result<PathBuf> {
    let base = path.as_os_str().to_string_lossy().into_owned();
    for n in 0u32..1000 {
        let kept = if n == 0 {
            PathBuf::from(format!("{base}.{suffix}"))
        } else {
            PathBuf::from(format!("{base}.{suffix}-{n}"))
        };
        // link(2) refuses an existing target, so no earlier corrupt copy is lost.
        match fs::hard_link(path, &kept) {
            Ok(()) => {
                fs::remove_file(path)
                    .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
                if let Some(dir) = path.parent() {
                    sync_dir(dir)?;
                }
                return Ok(kept);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(format!("keeping {}", path.display()), e)),
        }
    }
    Err(Error::io(
        format!("keeping {}", path.display()),
        io::Error::other("too many corrupt copies"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn failed_write_keeps_old_file_and_removes_temp() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "p.age", b"old contents").unwrap();
        // A writer that gets halfway and then hits a full disk.
        let err = write_atomic_with(
            dir.path(),
            "p.age",
            |f| {
                f.write_all(b"new con")?;
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            },
            || Ok(()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("No space left"), "{err}");
        assert_eq!(fs::read(dir.path().join("p.age")).unwrap(), b"old contents");
        assert_eq!(names(dir.path()), vec!["p.age".to_string()]);
    }

    #[test]
    fn new_files_are_0600_and_dirs_0700() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        ensure_private_dir(&sub).unwrap();
        assert_eq!(fs::metadata(&sub).unwrap().mode() & 0o777, 0o700);
        write_atomic(&sub, "x", b"1").unwrap();
        assert_eq!(fs::metadata(sub.join("x")).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn write_new_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_new_atomic(dir.path(), "id", b"first").unwrap());
        assert!(!write_new_atomic(dir.path(), "id", b"second").unwrap());
        assert_eq!(fs::read(dir.path().join("id")).unwrap(), b"first");
        assert_eq!(names(dir.path()), vec!["id".to_string()]);
        assert_eq!(
            fs::metadata(dir.path().join("id")).unwrap().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn move_aside_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.age");
        fs::write(&p, b"one").unwrap();
        let k1 = move_aside(&p, "corrupt-5").unwrap();
        fs::write(&p, b"two").unwrap();
        let k2 = move_aside(&p, "corrupt-5").unwrap();
        assert_ne!(k1, k2);
        assert_eq!(fs::read(k1).unwrap(), b"one");
        assert_eq!(fs::read(k2).unwrap(), b"two");
        assert!(!p.exists());
    }
}
