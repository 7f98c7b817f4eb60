//! Disk faults under the real broker: a full disk and a write error (an
//! immutable profiles directory) while refreshing with rotation, and a
//! read-only state dir at startup.
//!
//! The state dir is a small tmpfs mounted for the test, so these need root
//! (CI runs as root; elsewhere they skip with a note, never silently).
//!
//! What must hold: a failed save leaves the old profile file byte for byte,
//! the error shows in `status` (`last_error`, state `backoff`), the rotated
//! refresh token is kept in memory and saved once the disk works again, so no
//! login is lost; a read-only state dir stops the broker at startup with a
//! message that names the directory and the fix.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kontext_broker::store::{Store, StoreOptions};
use kontext_broker_client::{BrokerClient, Error, ProfileState};
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess};
use kontext_broker_tests::fake_idp::{FakeIdp, FakeIdpConfig};
use kontext_broker_tests::scenario::{connect, import};
use kontext_broker_testutil as prereq;

/// Safety net for waits on conditions; never a timing assumption.
const SAFETY: Duration = Duration::from_secs(30);

/// A tmpfs mounted at a fresh directory; unmounted on drop.
struct Tmpfs {
    _parent: tempfile::TempDir,
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a `size`-byte tmpfs with mode 0700, or `None` (after the
    /// prerequisite note) when this is not root.
    fn mount(size: &str) -> Option<Tmpfs> {
        let why = "mount a small tmpfs as the state dir";
        if !prereq::root(why) {
            return None;
        }
        let mount = prereq::tool("mount", why)?;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        run(Command::new(mount)
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg("tmpfs")
            .arg(&dir));
        Some(Tmpfs {
            _parent: parent,
            dir,
        })
    }

    fn remount(&self, mode: &str) {
        run(Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.dir));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("running a mount/chattr command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes a filler file until the filesystem is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    loop {
        if let Err(e) = file.write_all(&chunk).and_then(|()| file.sync_all()) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
            return;
        }
    }
}

fn profile_file(state: &Path) -> PathBuf {
    state.join("profiles").join("default.age")
}

/// The stored refresh token of `default`, decrypted from this process.
fn stored_refresh_token(state: &Path) -> String {
    let store = Store::open(state, StoreOptions::default()).unwrap();
    let record = store.load("default").unwrap();
    record.refresh_token.unwrap().expose().to_owned()
}

/// Waits until `default`'s status satisfies `want`.
async fn wait_status(client: &BrokerClient, want: impl Fn(ProfileState, Option<&str>) -> bool) {
    let deadline = Instant::now() + SAFETY;
    loop {
        let status = client.status().await.unwrap();
        let p = &status.profiles[0];
        if want(p.state, p.last_error.as_deref()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "status stuck at {:?} / {:?}",
            p.state,
            p.last_error
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How the disk fails during a refresh.
enum Fault {
    /// The filesystem is full (ENOSPC).
    Full,
    /// Writes fail: the profiles directory is made immutable (`chattr +i`),
    /// so creating the temp file fails with EPERM, even for root.
    WriteError,
}

async fn save_fails_then_recovers(fault: Fault) {
    let Some(fs) = Tmpfs::mount("2m") else {
        return;
    };
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let broker = BrokerProcess::start(BrokerOptions {
        state_dir: Some(fs.dir.clone()),
        ..BrokerOptions::default()
    });
    let client = connect(broker.socket()).await;
    let minted = idp.mint();
    import(&client, "default", &idp.issuer(), idp.client_id(), &minted).await;
    let first = stored_refresh_token(&fs.dir);
    let before = std::fs::read(profile_file(&fs.dir)).unwrap();

    let filler = fs.dir.join("filler");
    let (expected_error, cause) = match fault {
        Fault::Full => {
            fill(&filler);
            ("No space left on device", "a full disk")
        }
        Fault::WriteError => {
            let Some(chattr) = prereq::tool("chattr", "inject a write error") else {
                return;
            };
            run(Command::new(chattr).arg("+i").arg(fs.dir.join("profiles")));
            ("Operation not permitted", "a write error")
        }
    };
    // The IdP rotates; the broker cannot save the new refresh token.
    let err = client.refresh("default").await.unwrap_err();
    assert!(
        matches!(&err, Error::Internal { detail } if detail.contains(expected_error)),
        "{cause}: {err:?}"
    );
    assert_eq!(idp.refresh_successes(), 1, "the IdP did rotate");
    // The old file is intact, byte for byte, and still loads.
    assert_eq!(std::fs::read(profile_file(&fs.dir)).unwrap(), before);
    assert_eq!(stored_refresh_token(&fs.dir), first);
    // `status` says what is wrong.
    let status = client.status().await.unwrap();
    let p = &status.profiles[0];
    assert_eq!(p.state, ProfileState::Backoff, "{cause}");
    let last_error = p.last_error.as_deref().unwrap_or_default();
    assert!(
        last_error.contains("cannot save") && last_error.contains(expected_error),
        "{cause}: last_error {last_error:?}"
    );
    // The token whose refresh token exists only in memory is not served.
    assert!(client
        .get_token("default", Duration::ZERO)
        .await
        .is_err_and(|e| matches!(e, Error::Internal { .. } | Error::Unavailable { .. })));

    // The disk works again: the retried save lands the rotated token, and
    // the session goes on without a new login or another IdP call.
    match fault {
        Fault::Full => std::fs::remove_file(&filler).unwrap(),
        Fault::WriteError => run(Command::new("chattr")
            .arg("-i")
            .arg(fs.dir.join("profiles"))),
    }
    wait_status(&client, |state, err| {
        state == ProfileState::Valid && err.is_none()
    })
    .await;
    let saved = stored_refresh_token(&fs.dir);
    assert_ne!(saved, first);
    assert_eq!(idp.current_refresh_token(&first).as_deref(), Some(&*saved));
    assert_eq!(idp.refresh_successes(), 1);
    let token = client.get_token("default", Duration::ZERO).await.unwrap();
    assert!(idp.access_token_valid(token.access_token.expose()));
    drop(client);
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_the_old_profile_and_shows_the_error_in_status() {
    save_fails_then_recovers(Fault::Full).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_error_keeps_the_old_profile_and_shows_the_error_in_status() {
    save_fails_then_recovers(Fault::WriteError).await;
}

#[test]
fn a_read_only_state_dir_is_a_clear_startup_error() {
    let Some(fs) = Tmpfs::mount("1m") else {
        return;
    };
    // Once with a state dir that was never used, once with one that was.
    for used in [false, true] {
        if used {
            fs.remount("rw");
            let mut first = BrokerProcess::start(BrokerOptions {
                state_dir: Some(fs.dir.clone()),
                ..BrokerOptions::default()
            });
            first.sigterm();
            assert!(first.wait_exit(SAFETY).success());
        }
        fs.remount("ro");
        let mut broker = BrokerProcess::spawn(BrokerOptions {
            state_dir: Some(fs.dir.clone()),
            ..BrokerOptions::default()
        });
        let status = broker.wait_exit(SAFETY);
        assert_eq!(status.code(), Some(1), "used={used}");
        let stderr = broker.stderr();
        let line = stderr
            .lines()
            .find(|l| l.starts_with("kontext-broker: "))
            .unwrap_or_else(|| panic!("no error line: {stderr}"));
        assert!(
            line.contains(&fs.dir.display().to_string())
                && line.contains("read-only")
                && line.contains("--state-dir"),
            "used={used}: {line}"
        );
        assert!(!broker.socket().exists(), "a socket was left behind");
    }
}
