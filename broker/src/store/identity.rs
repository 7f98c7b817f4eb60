//! Where the age identity comes from: the seam between the store and its key.
//!
//! [`IdentitySource`] is an enum with one variant per source. Each variant
//! answers two questions: which recipient can the store encrypt to without
//! unlocking ([`IdentitySource::open`]), and how is the secret identity obtained
//! ([`IdentitySource::unlock`]). An age plugin source (YubiKey, TPM, Secure
//! Enclave) would be one more variant whose identity and recipient are age's
//! plugin types behind the same `dyn age::Identity` / `dyn age::Recipient`.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use age::secrecy::{ExposeSecret, SecretString};
use age::x25519;
use kontext_broker_protocol::Secret;
use zeroize::Zeroizing;

use super::fsutil;
use crate::config::IdentityKind;
use crate::{Error, Result};

/// File name of the plain X25519 identity (`identity = "file"`).
pub const IDENTITY_FILE: &str = "identity.txt";
/// File name of the scrypt-encrypted identity (`identity = "passphrase"`).
pub const ENCRYPTED_IDENTITY_FILE: &str = "identity.age";
/// File name of the public recipient kept beside a locked identity.
pub const RECIPIENT_FILE: &str = "recipient.txt";

/// Keyring service name; the account is the state directory path, so two
/// brokers with different state dirs never share a key.
#[cfg(feature = "keyring")]
const KEYRING_SERVICE: &str = "kontext-broker";

/// A recipient the store encrypts to. Shared, never secret.
pub(crate) type DynRecipient = Box<dyn age::Recipient + Send + Sync>;

/// A decrypted identity. Dropping it zeroizes the key: age's X25519 identity
/// wraps an x25519-dalek `StaticSecret`, which zeroizes on drop.
pub(crate) struct UnlockedIdentity {
    pub(crate) identity: Box<dyn age::Identity + Send + Sync>,
}

/// What an unlock produced: the identity plus its recipient.
pub(crate) struct Unlocked {
    pub(crate) identity: UnlockedIdentity,
    pub(crate) recipient: DynRecipient,
}

/// One identity source per config `identity` kind.
pub(crate) enum IdentitySource {
    /// `<state>/identity.txt`, created 0600 on first open.
    File { path: PathBuf },
    /// `<state>/identity.age` (scrypt) plus `<state>/recipient.txt`.
    Passphrase {
        encrypted: PathBuf,
        recipient: PathBuf,
        work_factor: Option<u8>,
    },
    /// The OS keyring (Secret Service on Linux) holds the identity string;
    /// `<state>/recipient.txt` holds the recipient for saves while locked.
    #[cfg(feature = "keyring")]
    Keyring { account: String, recipient: PathBuf },
}

impl IdentitySource {
    /// The source for `kind`, rooted in `state_dir`.
    pub(crate) fn new(
        kind: IdentityKind,
        state_dir: &Path,
        work_factor: Option<u8>,
    ) -> Result<Self> {
        Ok(match kind {
            IdentityKind::File => IdentitySource::File {
                path: state_dir.join(IDENTITY_FILE),
            },
            IdentityKind::Passphrase => IdentitySource::Passphrase {
                encrypted: state_dir.join(ENCRYPTED_IDENTITY_FILE),
                recipient: state_dir.join(RECIPIENT_FILE),
                work_factor,
            },
            #[cfg(feature = "keyring")]
            IdentityKind::Keyring => IdentitySource::Keyring {
                account: state_dir.display().to_string(),
                recipient: state_dir.join(RECIPIENT_FILE),
            },
            #[cfg(not(feature = "keyring"))]
            IdentityKind::Keyring => {
                return Err(Error::Keyring(
                    "keyring support is not built into this broker; rebuild with \
                     `--features keyring` or set identity = \"file\" or \"passphrase\""
                        .into(),
                ))
            }
        })
    }

    /// A short name for logs and Debug output.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            IdentitySource::File { .. } => "file",
            IdentitySource::Passphrase { .. } => "passphrase",
            #[cfg(feature = "keyring")]
            IdentitySource::Keyring { .. } => "keyring",
        }
    }

    /// Called once by `Store::open`. Returns the identity when the source needs
    /// no passphrase (the store starts unlocked), and otherwise the recipient if
    /// one is known (so saves work while locked).
    pub(crate) fn open(&self) -> Result<OpenState> {
        match self {
            IdentitySource::File { path } => {
                let identity = match fsutil::read_private_file(path)? {
                    Some(text) => parse_identity(path, &text)?,
                    None => match create_identity_file(path)? {
                        Some(identity) => identity,
                        // Another process created it first: use theirs.
                        None => {
                            let text = fsutil::read_private_file(path)?.ok_or_else(|| {
                                Error::Crypto(format!("{} vanished", path.display()))
                            })?;
                            parse_identity(path, &text)?
                        }
                    },
                };
                Ok(OpenState::Unlocked(into_unlocked(identity)))
            }
            IdentitySource::Passphrase {
                encrypted,
                recipient,
                ..
            } => {
                // recipient.txt is trusted only beside an existing identity.age:
                // a recipient without its identity would make saves unreadable.
                // Reading it also checks its owner and mode before anything else.
                if fsutil::read_private_file(encrypted)?.is_none() {
                    return Ok(OpenState::Locked(None));
                }
                Ok(OpenState::Locked(read_recipient(recipient)?))
            }
            #[cfg(feature = "keyring")]
            IdentitySource::Keyring { .. } => {
                let unlocked = self.unlock(&Secret::default())?;
                Ok(OpenState::Unlocked(unlocked))
            }
        }
    }

    /// Obtains the identity. For `passphrase`, decrypts `identity.age`, or
    /// creates it when absent (the first unlock sets the passphrase). Other
    /// sources ignore `passphrase` and reload the identity from their source.
    pub(crate) fn unlock(&self, passphrase: &Secret) -> Result<Unlocked> {
        match self {
            IdentitySource::File { .. } => match self.open()? {
                OpenState::Unlocked(u) => Ok(u),
                OpenState::Locked(_) => unreachable!("a file identity never opens locked"),
            },
            IdentitySource::Passphrase {
                encrypted,
                recipient,
                work_factor,
            } => unlock_passphrase(encrypted, recipient, *work_factor, passphrase),
            #[cfg(feature = "keyring")]
            IdentitySource::Keyring { account, recipient } => {
                let identity = keyring_identity(account, dir_of(recipient)?)?;
                let public = identity.to_public().to_string();
                if read_recipient_text(recipient)?.as_deref() != Some(public.as_str()) {
                    fsutil::write_atomic(
                        dir_of(recipient)?,
                        RECIPIENT_FILE,
                        format!("{public}\n").as_bytes(),
                    )?;
                }
                Ok(into_unlocked(identity))
            }
        }
    }
}

/// The state a freshly opened store starts in.
pub(crate) enum OpenState {
    /// The identity is in memory.
    Unlocked(Unlocked),
    /// Locked; `Some` recipient when saves can already be encrypted.
    Locked(Option<DynRecipient>),
}

fn into_unlocked(identity: x25519::Identity) -> Unlocked {
    let recipient = Box::new(identity.to_public());
    Unlocked {
        identity: UnlockedIdentity {
            identity: Box::new(identity),
        },
        recipient,
    }
}

/// age-keygen's format: comments, then one `AGE-SECRET-KEY-1…` line.
fn identity_text(identity: &x25519::Identity) -> Zeroizing<String> {
    let created = humantime::format_rfc3339_seconds(SystemTime::now());
    let secret = identity.to_string();
    let header = format!(
        "# created: {created}\n# public key: {}\n",
        identity.to_public()
    );
    // Sized up front so no reallocation leaves a copy of the key behind.
    let mut text = Zeroizing::new(String::with_capacity(
        header.len() + secret.expose_secret().len() + 1,
    ));
    text.push_str(&header);
    text.push_str(secret.expose_secret());
    text.push('\n');
    text
}

/// Parses identity text; the error names the file but never its contents.
fn parse_identity(path: &Path, text: &[u8]) -> Result<x25519::Identity> {
    let bad = || Error::Crypto(format!("{} is not an age X25519 identity", path.display()));
    let text = std::str::from_utf8(text).map_err(|_| bad())?;
    let mut keys = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let key = keys.next().ok_or_else(bad)?;
    if keys.next().is_some() {
        return Err(bad());
    }
    x25519::Identity::from_str(key).map_err(|_| bad())
}

/// Refuses to generate a new identity while profile files exist: they are
/// encrypted to the old one, and a new key would make every one of them
/// unreadable (and moved aside as corrupt on load).
fn guard_new_identity(state_dir: &Path, missing: &str) -> Result<()> {
    let profiles = state_dir.join(super::PROFILES_DIR);
    let count = match std::fs::read_dir(&profiles) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| !n.starts_with('.') && n.ends_with(".age"))
            })
            .count(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(Error::io(format!("listing {}", profiles.display()), e)),
    };
    if count > 0 {
        return Err(Error::Crypto(format!(
            "{missing} is missing but {count} profile file(s) in {} were encrypted to it; \
             restore it, or move the profiles away to start over",
            profiles.display()
        )));
    }
    Ok(())
}

/// The directory holding `path` (the state dir for every identity file).
fn dir_of(path: &Path) -> Result<&Path> {
    path.parent().ok_or_else(|| no_dir(path))
}

fn no_dir(path: &Path) -> Error {
    Error::Invalid(format!(
        "{} is not a file inside a state directory; pass --state-dir DIR",
        path.display()
    ))
}

/// Creates the identity file; `None` if one appeared meanwhile.
fn create_identity_file(path: &Path) -> Result<Option<x25519::Identity>> {
    guard_new_identity(dir_of(path)?, &path.display().to_string())?;
    let identity = x25519::Identity::generate();
    let dir = dir_of(path)?;
    let name = path.file_name().ok_or_else(|| no_dir(path))?;
    let text = identity_text(&identity);
    if !fsutil::write_new_atomic(dir, &name.to_string_lossy(), text.as_bytes())? {
        return Ok(None);
    }
    tracing::info!(path = %path.display(), "created a new age identity");
    Ok(Some(identity))
}

fn read_recipient_text(path: &Path) -> Result<Option<String>> {
    let Some(bytes) = fsutil::read_private_file(path)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes).trim().to_owned();
    Ok(Some(text))
}

fn read_recipient(path: &Path) -> Result<Option<DynRecipient>> {
    let Some(text) = read_recipient_text(path)? else {
        return Ok(None);
    };
    let recipient = x25519::Recipient::from_str(&text).map_err(|_| {
        Error::Crypto(format!(
            "{} does not hold an age recipient; delete it and unlock to rewrite it",
            path.display()
        ))
    })?;
    Ok(Some(Box::new(recipient)))
}

fn unlock_passphrase(
    encrypted: &Path,
    recipient_path: &Path,
    work_factor: Option<u8>,
    passphrase: &Secret,
) -> Result<Unlocked> {
    let dir = dir_of(encrypted)?;
    let pass = SecretString::from(passphrase.expose().to_owned());
    let identity = match fsutil::read_private_file(encrypted)? {
        Some(ciphertext) => {
            let mut scrypt_identity = age::scrypt::Identity::new(pass);
            if let Some(wf) = work_factor {
                // Accept our own configured factor even above age's calibrated cap.
                scrypt_identity.set_max_work_factor(wf.max(22));
            }
            let plain =
                super::crypto::decrypt(&scrypt_identity, &ciphertext).map_err(|e| match e {
                    age::DecryptError::DecryptionFailed | age::DecryptError::NoMatchingKeys => {
                        Error::WrongPassphrase
                    }
                    other => Error::Crypto(format!("{}: {other}", encrypted.display())),
                })?;
            parse_identity(encrypted, &plain)?
        }
        None => {
            if passphrase.is_empty() {
                return Err(Error::Invalid(
                    "the first unlock sets the passphrase, and it must not be empty".into(),
                ));
            }
            guard_new_identity(dir, &encrypted.display().to_string())?;
            let identity = x25519::Identity::generate();
            let mut scrypt_recipient = age::scrypt::Recipient::new(pass);
            if let Some(wf) = work_factor {
                scrypt_recipient.set_work_factor(wf.clamp(1, 63));
            }
            let ciphertext =
                super::crypto::encrypt(&scrypt_recipient, identity_text(&identity).as_bytes())?;
            // identity.age first: recipient.txt is only trusted beside it.
            if !fsutil::write_new_atomic(dir, ENCRYPTED_IDENTITY_FILE, &ciphertext)? {
                // Another process set the passphrase first: check against theirs.
                return unlock_passphrase(encrypted, recipient_path, work_factor, passphrase);
            }
            tracing::info!(path = %encrypted.display(), "created a new passphrase-protected identity");
            identity
        }
    };
    let public = identity.to_public().to_string();
    match read_recipient_text(recipient_path)? {
        Some(text) if text == public => {}
        found => {
            if found.is_some() {
                tracing::warn!(path = %recipient_path.display(), "recipient file did not match the identity; rewriting it");
            }
            fsutil::write_atomic(dir, RECIPIENT_FILE, format!("{public}\n").as_bytes())?;
        }
    }
    Ok(into_unlocked(identity))
}

/// Reads (or creates) the identity in the OS keyring.
#[cfg(feature = "keyring")]
fn keyring_identity(account: &str, state_dir: &Path) -> Result<x25519::Identity> {
    use keyring::{Entry, Error as KErr};
    let unavailable = |e: &KErr| {
        Error::Keyring(format!(
            "no OS keyring is available ({e}); a Secret Service daemon on the D-Bus \
             session bus is required. Set identity = \"file\" or \"passphrase\" on \
             headless machines"
        ))
    };
    if let Err(e) = Entry::store_status() {
        return Err(unavailable(e));
    }
    let entry = Entry::new(KEYRING_SERVICE, account).map_err(|e| unavailable(&e))?;
    match entry.get_password() {
        Ok(text) => {
            let text = Zeroizing::new(text);
            x25519::Identity::from_str(text.trim()).map_err(|_| {
                Error::Keyring(format!(
                    "the keyring entry {KEYRING_SERVICE}/{account} is not an age identity"
                ))
            })
        }
        Err(KErr::NoEntry) => {
            guard_new_identity(
                state_dir,
                &format!("the keyring entry {KEYRING_SERVICE}/{account}"),
            )?;
            let identity = x25519::Identity::generate();
            entry
                .set_password(identity.to_string().expose_secret())
                .map_err(|e| Error::Keyring(format!("storing the identity: {e}")))?;
            tracing::info!(account, "created a new age identity in the OS keyring");
            Ok(identity)
        }
        Err(e) => Err(unavailable(&e)),
    }
}
