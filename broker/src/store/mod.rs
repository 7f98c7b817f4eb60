//! The encrypted profile store (contract §4).
//!
//! Layout of the state directory (0700):
//! - `identity.txt` (file identity, 0600) or `identity.age` + `recipient.txt`
//!   (passphrase identity), see [`IdentityKind`].
//! - `profiles/<name>.age` (0600): the JSON of one [`ProfileRecord`],
//!   encrypted with age to the store's recipient.
//!
//! Plaintext exists only in zeroizing memory buffers; files are written
//! atomically (temp file, fsync, rename, fsync of the directory).
//!
//! All methods block (file I/O, and scrypt in [`Store::unlock`]); async callers
//! use [`Store::run_blocking`], or [`UnlockThrottle::unlock`] for unlocking.

mod builder;
mod crypto;
mod fsutil;
mod identity;
mod persist;
mod record;
mod throttle;

use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use kontext_broker_protocol::paths::is_valid_profile_name;
use kontext_broker_protocol::Secret;

pub use builder::ProfileRecordBuilder;
pub use identity::{ENCRYPTED_IDENTITY_FILE, IDENTITY_FILE, RECIPIENT_FILE};
pub use record::*;
pub use throttle::UnlockThrottle;

use crate::config::IdentityKind;
use crate::{Error, Result};
use identity::{DynRecipient, IdentitySource, OpenState, UnlockedIdentity};

/// Name of the profiles subdirectory of the state dir.
pub const PROFILES_DIR: &str = "profiles";
/// Extension of profile files.
pub const PROFILE_EXT: &str = "age";

/// How [`Store::open`] finds its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreOptions {
    /// Identity source (config `identity`).
    pub identity: IdentityKind,
    /// log2 of scrypt's N when a passphrase identity is created; `None` lets
    /// age calibrate to about one second.
    pub scrypt_work_factor: Option<u8>,
}

/// Whether the secret identity is in memory. Explicit so that "locked" is
/// one state, not a `None` that code could forget to check.
enum IdentityState {
    Locked,
    Unlocked(UnlockedIdentity),
}

/// Profile files encrypted with age. `Send + Sync`; share it as `Arc<Store>`.
///
/// Concurrency: saves of different profiles run in parallel; the final
/// rename and the move-aside of a corrupt file take one short mutex so a load
/// never moves aside a file that a concurrent save just replaced.
pub struct Store {
    state_dir: PathBuf,
    profiles_dir: PathBuf,
    source: IdentitySource,
    /// The recipient saves encrypt to; `None` only for a passphrase store
    /// that has never been unlocked (no identity exists yet).
    recipient: RwLock<Option<DynRecipient>>,
    state: RwLock<IdentityState>,
    /// Serializes unlocks so a first unlock creates exactly one identity.
    unlocking: Mutex<()>,
    /// Held around renames in the profiles directory.
    renames: Mutex<()>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the identity: only where and whether.
        f.debug_struct("Store")
            .field("state_dir", &self.state_dir)
            .field("identity", &self.source.kind())
            .field("locked", &self.is_locked())
            .finish()
    }
}

impl Store {
    /// Opens (creating if needed) the store in `state_dir`.
    ///
    /// Creates the state and profiles directories with mode 0700 and, for the
    /// file identity, a new identity (0600) on first start. Refuses a state
    /// dir, profiles dir or identity file owned by another uid or accessible
    /// to group/others ([`Error::UnsafePermissions`] names the path and the fix).
    /// A passphrase store starts locked; the other sources start unlocked.
    pub fn open(state_dir: &Path, options: StoreOptions) -> Result<Store> {
        fsutil::ensure_private_dir(state_dir)?;
        let profiles_dir = state_dir.join(PROFILES_DIR);
        fsutil::ensure_private_dir(&profiles_dir)?;
        let source = IdentitySource::new(options.identity, state_dir, options.scrypt_work_factor)?;
        let (recipient, state) = match source.open()? {
            OpenState::Unlocked(u) => (Some(u.recipient), IdentityState::Unlocked(u.identity)),
            OpenState::Locked(r) => (r, IdentityState::Locked),
        };
        Ok(Store {
            state_dir: state_dir.to_path_buf(),
            profiles_dir,
            source,
            recipient: RwLock::new(recipient),
            state: RwLock::new(state),
            unlocking: Mutex::new(()),
            renames: Mutex::new(()),
        })
    }

    /// Runs `task` with this store on tokio's blocking pool: how async code
    /// calls the store's blocking methods.
    pub async fn run_blocking<T, F>(self: &Arc<Self>, task: F) -> Result<T>
    where
        F: FnOnce(&Store) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || task(&store))
            .await
            .map_err(|e| Error::io("a blocking store task failed", io::Error::other(e)))?
    }

    /// The state directory this store lives in.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// True while the identity is not in memory: `load` fails with
    /// [`Error::Locked`], `save` still works once a recipient is known.
    pub fn is_locked(&self) -> bool {
        matches!(
            *self.state.read().unwrap_or_else(PoisonError::into_inner),
            IdentityState::Locked
        )
    }

    /// Loads the identity into memory. Blocking: scrypt takes about a second
    /// at the default work factor.
    ///
    /// Passphrase stores: **the first unlock sets the passphrase.** If
    /// `identity.age` does not exist yet, a new identity is generated,
    /// encrypted with `passphrase` and written, with its recipient in
    /// `recipient.txt`. Later unlocks must give the same passphrase, or get
    /// [`Error::WrongPassphrase`] (the store stays as it was). An empty
    /// passphrase is refused.
    ///
    /// Other sources ignore `passphrase` and reload the identity from their
    /// source (undoing [`Store::lock`]).
    pub fn unlock(&self, passphrase: &Secret) -> Result<()> {
        let _one = self
            .unlocking
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let unlocked = self.source.unlock(passphrase)?;
        *self
            .recipient
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(unlocked.recipient);
        *self.state.write().unwrap_or_else(PoisonError::into_inner) =
            IdentityState::Unlocked(unlocked.identity);
        Ok(())
    }

    /// Drops the decrypted identity; its key bytes are zeroized on drop. Waits
    /// for loads in progress. The recipient stays, so saves go on working.
    pub fn lock(&self) {
        let old = std::mem::replace(
            &mut *self.state.write().unwrap_or_else(PoisonError::into_inner),
            IdentityState::Locked,
        );
        drop(old);
    }

    /// Names of all stored profiles, sorted. Temp files, corrupt copies and
    /// names that are not valid profile names are skipped.
    pub fn profile_names(&self) -> Result<Vec<String>> {
        let ctx = || format!("listing {}", self.profiles_dir.display());
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.profiles_dir).map_err(|e| Error::io(ctx(), e))? {
            let entry = entry.map_err(|e| Error::io(ctx(), e))?;
            let file_name = entry.file_name();
            let Some(name) = file_name
                .to_str()
                .and_then(|n| n.strip_suffix(".age"))
                .filter(|n| is_valid_profile_name(n))
            else {
                continue;
            };
            names.push(name.to_owned());
        }
        names.sort();
        Ok(names)
    }

    /// Decrypts one profile.
    ///
    /// Errors: [`Error::InvalidProfileName`], [`Error::UnknownProfile`],
    /// [`Error::Locked`], and [`Error::CorruptProfile`] when the file cannot be
    /// decrypted or parsed; that file is then renamed to
    /// `<name>.age.corrupt-<unix time>` (never deleted) and other profiles are
    /// unaffected.
    pub fn load(&self, name: &str) -> Result<ProfileRecord> {
        check_name(name)?;
        let path = self.profile_path(name);
        // A save may replace the file between our read and a move-aside; then
        // we read again rather than move the fresh file (see `move_corrupt`).
        for _ in 0..3 {
            let (ciphertext, identity_of_file) = match read_profile(&path)? {
                Some(read) => read,
                None => return Err(Error::UnknownProfile(name.to_owned())),
            };
            let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
            let IdentityState::Unlocked(unlocked) = &*state else {
                return Err(Error::Locked);
            };
            let detail = match crypto::decrypt(&*unlocked.identity, &ciphertext) {
                Ok(plain) => match serde_json::from_slice::<ProfileRecord>(&plain) {
                    Ok(record) if record.name == name => return Ok(record),
                    Ok(record) => format!("it holds profile `{}`", record.name),
                    // Not `{e}`: serde_json quotes offending values, which could
                    // be token bytes. Category and position only.
                    Err(e) => format!(
                        "not a profile record ({:?} error at line {} column {})",
                        e.classify(),
                        e.line(),
                        e.column()
                    ),
                },
                Err(e) => format!("cannot decrypt: {e}"),
            };
            drop(state);
            match self.move_corrupt(&path, identity_of_file)? {
                Some(kept) => {
                    tracing::error!(profile = name, kept = %kept.display(), %detail, "corrupt profile file moved aside");
                    return Err(Error::CorruptProfile {
                        profile: name.to_owned(),
                        detail,
                        kept,
                    });
                }
                None => continue,
            }
        }
        Err(Error::io(
            format!("loading profile `{name}`"),
            io::Error::other("the file kept changing while it was read"),
        ))
    }

    /// Encrypts and atomically writes `record` to `profiles/<name>.age`.
    /// Works while locked once a recipient is known; a passphrase store that
    /// was never unlocked has no identity yet and returns [`Error::Locked`].
    pub fn save(&self, record: &ProfileRecord) -> Result<()> {
        check_name(&record.name)?;
        let plain = crypto::to_json_zeroizing(record)?;
        let ciphertext = {
            let recipient = self
                .recipient
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            let Some(recipient) = recipient.as_deref() else {
                return Err(Error::Locked);
            };
            crypto::encrypt(recipient, &plain)?
        };
        drop(plain);
        fsutil::write_atomic_with(
            &self.profiles_dir,
            &profile_file_name(&record.name),
            |f| io::Write::write_all(f, &ciphertext),
            || Ok(self.renames.lock().unwrap_or_else(PoisonError::into_inner)),
        )
    }

    /// Removes a profile file. [`Error::UnknownProfile`] if there is none.
    pub fn delete(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let path = self.profile_path(name);
        let _g = self.renames.lock().unwrap_or_else(PoisonError::into_inner);
        match std::fs::remove_file(&path) {
            Ok(()) => fsutil::sync_dir(&self.profiles_dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(Error::UnknownProfile(name.to_owned()))
            }
            Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }

    /// Removes temp files that a crash left in the profiles directory; returns
    /// how many. Call it only while holding the broker's single-instance lock,
    /// since another live writer's temp file would look stale too.
    pub fn remove_stale_temp_files(&self) -> Result<usize> {
        let ctx = || format!("listing {}", self.profiles_dir.display());
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.profiles_dir).map_err(|e| Error::io(ctx(), e))? {
            let entry = entry.map_err(|e| Error::io(ctx(), e))?;
            if entry.file_name().to_str().is_some_and(fsutil::is_temp_name) {
                std::fs::remove_file(entry.path())
                    .map_err(|e| Error::io(format!("removing {}", entry.path().display()), e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn profile_path(&self, name: &str) -> PathBuf {
        self.profiles_dir.join(profile_file_name(name))
    }

    /// Moves the corrupt file aside if it is still the file we read (same
    /// device and inode). `None` means a save replaced it meanwhile.
    fn move_corrupt(&self, path: &Path, read: FileId) -> Result<Option<PathBuf>> {
        let _g = self.renames.lock().unwrap_or_else(PoisonError::into_inner);
        match std::fs::symlink_metadata(path) {
            Ok(meta) if (meta.dev(), meta.ino()) == read => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        fsutil::move_aside(path, &format!("corrupt-{now}")).map(Some)
    }
}

fn check_name(name: &str) -> Result<()> {
    if is_valid_profile_name(name) {
        Ok(())
    } else {
        Err(Error::InvalidProfileName(name.to_owned()))
    }
}

fn profile_file_name(name: &str) -> String {
    format!("{name}.{PROFILE_EXT}")
}

/// (device, inode): which file a read saw, to detect a replace since.
type FileId = (u64, u64);

/// Reads a profile's ciphertext and the (device, inode) it came from.
fn read_profile(path: &Path) -> Result<Option<(zeroize::Zeroizing<Vec<u8>>, FileId)>> {
    let ctx = || format!("reading {}", path.display());
    let mut file = match fsutil::open_nofollow(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(ctx(), e)),
    };
    let meta = file.metadata().map_err(|e| Error::io(ctx(), e))?;
    // A FIFO, device or huge file is refused before a byte is read.
    fsutil::check_readable(path, &meta)?;
    let buf = fsutil::read_all(&mut file, meta.len()).map_err(|e| Error::io(ctx(), e))?;
    Ok(Some((buf, (meta.dev(), meta.ino()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_send_sync_and_debug_is_quiet() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Store>();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("s");
        let store = Store::open(&state, StoreOptions::default()).unwrap();
        let secret = std::fs::read_to_string(state.join(IDENTITY_FILE)).unwrap();
        let key = secret
            .lines()
            .find(|l| l.starts_with("AGE-SECRET-KEY-"))
            .unwrap();
        let dbg = format!("{store:?}");
        assert!(!dbg.contains(key) && dbg.contains("locked: false"), "{dbg}");
    }

    #[test]
    fn fifos_and_huge_files_are_refused_without_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("s");
        let store = Store::open(&state, StoreOptions::default()).unwrap();
        let profiles = state.join(PROFILES_DIR);
        // Opening a FIFO for reading blocks until a writer comes, without O_NONBLOCK.
        let fifo = std::ffi::CString::new(
            profiles
                .join("pipe.age")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        // Sparse: a terabyte that takes no disk, and would abort a read_to_end.
        std::fs::File::create(profiles.join("huge.age"))
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        assert_eq!(store.profile_names().unwrap(), ["huge", "pipe"]);
        for (name, problem) in [("pipe", "a FIFO"), ("huge", "1099511627776 bytes")] {
            match store.load(name) {
                Err(Error::RefusedFile { problem: p, .. }) => assert!(p.contains(problem), "{p}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        // Neither was moved aside: they are not corrupt profiles, just not ours.
        assert!(profiles.join("pipe.age").exists() && profiles.join("huge.age").exists());
    }
}
