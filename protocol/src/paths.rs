//! Path resolution shared by the broker, `broker-ctl` and the client (`WIRE.md` §1).
//!
//! Each path comes from an explicit flag, then an environment variable, then an
//! XDG default. Relative XDG variables are ignored, as the XDG spec requires.
//! The `*_with` functions take the environment as a function so tests need not
//! mutate the process environment.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::Error;

/// Overrides the socket path.
pub const ENV_SOCKET: &str = "KONTEXT_BROKER_SOCKET";
/// Overrides the state directory.
pub const ENV_STATE_DIR: &str = "KONTEXT_BROKER_STATE_DIR";
/// Overrides the config file path.
pub const ENV_CONFIG: &str = "KONTEXT_BROKER_CONFIG";

/// The effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn process_env(name: &str) -> Option<OsString> {
    std::env::var_os(name)
}

fn non_empty(env: &dyn Fn(&str) -> Option<OsString>, name: &str) -> Option<PathBuf> {
    env(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn absolute(env: &dyn Fn(&str) -> Option<OsString>, name: &str) -> Option<PathBuf> {
    non_empty(env, name).filter(|p| p.is_absolute())
}

/// The broker's socket path (flag, `KONTEXT_BROKER_SOCKET`, XDG runtime dir, tmp).
pub fn socket_path(flag: Option<&Path>) -> PathBuf {
    socket_path_with(flag, &process_env, euid())
}

/// [`socket_path`] with an explicit environment and uid.
pub fn socket_path_with(
    flag: Option<&Path>,
    env: &dyn Fn(&str) -> Option<OsString>,
    uid: u32,
) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(p) = non_empty(env, ENV_SOCKET) {
        return p;
    }
    if let Some(dir) = absolute(env, "XDG_RUNTIME_DIR") {
        return dir.join("kontext").join("broker.sock");
    }
    let tmp = absolute(env, "TMPDIR").unwrap_or_else(|| PathBuf::from("/tmp"));
    tmp.join(format!("kontext-{uid}")).join("broker.sock")
}

/// The broker's state directory (flag, `KONTEXT_BROKER_STATE_DIR`, XDG state home).
pub fn state_dir(flag: Option<&Path>) -> Result<PathBuf, Error> {
    state_dir_with(flag, &process_env)
}

/// [`state_dir`] with an explicit environment.
pub fn state_dir_with(
    flag: Option<&Path>,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<PathBuf, Error> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = non_empty(env, ENV_STATE_DIR) {
        return Ok(p);
    }
    if let Some(dir) = absolute(env, "XDG_STATE_HOME") {
        return Ok(dir.join("kontext").join("broker"));
    }
    match absolute(env, "HOME") {
        Some(home) => Ok(home.join(".local/state/kontext/broker")),
        None => Err(Error::NoPath {
            what: "the state directory",
            hint: "--state-dir, KONTEXT_BROKER_STATE_DIR, XDG_STATE_HOME or HOME",
        }),
    }
}

/// The config file path (flag, `KONTEXT_BROKER_CONFIG`, XDG config home).
/// The file itself is optional; `None` means no location could be derived.
pub fn config_path(flag: Option<&Path>) -> Option<PathBuf> {
    config_path_with(flag, &process_env)
}

/// [`config_path`] with an explicit environment.
pub fn config_path_with(
    flag: Option<&Path>,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Option<PathBuf> {
    if let Some(p) = flag {
        return Some(p.to_path_buf());
    }
    if let Some(p) = non_empty(env, ENV_CONFIG) {
        return Some(p);
    }
    let base = absolute(env, "XDG_CONFIG_HOME")
        .or_else(|| absolute(env, "HOME").map(|h| h.join(".config")))?;
    Some(base.join("kontext").join("broker.toml"))
}

/// True when `name` is a valid profile name: `[A-Za-z0-9._-]{1,64}`, not starting
/// with `.` (so never `.`, `..` or a hidden temp file).
pub fn is_valid_profile_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).map(OsString::from)
    }

    #[test]
    fn socket_precedence() {
        let e = env(&[
            (ENV_SOCKET, "/e/s.sock"),
            ("XDG_RUNTIME_DIR", "/run/user/7"),
        ]);
        assert_eq!(
            socket_path_with(Some(Path::new("/f.sock")), &e, 7),
            PathBuf::from("/f.sock")
        );
        assert_eq!(socket_path_with(None, &e, 7), PathBuf::from("/e/s.sock"));
        let e = env(&[("XDG_RUNTIME_DIR", "/run/user/7")]);
        assert_eq!(
            socket_path_with(None, &e, 7),
            PathBuf::from("/run/user/7/kontext/broker.sock")
        );
        let e = env(&[("XDG_RUNTIME_DIR", "relative"), ("TMPDIR", "/var/tmp")]);
        assert_eq!(
            socket_path_with(None, &e, 7),
            PathBuf::from("/var/tmp/kontext-7/broker.sock")
        );
        let e = env(&[(ENV_SOCKET, "")]);
        assert_eq!(
            socket_path_with(None, &e, 42),
            PathBuf::from("/tmp/kontext-42/broker.sock")
        );
    }

    #[test]
    fn state_and_config_precedence() {
        let e = env(&[("HOME", "/home/u")]);
        assert_eq!(
            state_dir_with(None, &e).unwrap(),
            PathBuf::from("/home/u/.local/state/kontext/broker")
        );
        assert_eq!(
            config_path_with(None, &e),
            Some(PathBuf::from("/home/u/.config/kontext/broker.toml"))
        );
        let e = env(&[
            ("HOME", "/home/u"),
            ("XDG_STATE_HOME", "/xs"),
            ("XDG_CONFIG_HOME", "/xc"),
        ]);
        assert_eq!(
            state_dir_with(None, &e).unwrap(),
            PathBuf::from("/xs/kontext/broker")
        );
        assert_eq!(
            config_path_with(None, &e),
            Some(PathBuf::from("/xc/kontext/broker.toml"))
        );
        let e = env(&[(ENV_STATE_DIR, "/sd"), (ENV_CONFIG, "/c.toml")]);
        assert_eq!(state_dir_with(None, &e).unwrap(), PathBuf::from("/sd"));
        assert_eq!(config_path_with(None, &e), Some(PathBuf::from("/c.toml")));
        assert!(state_dir_with(None, &env(&[])).is_err());
        assert_eq!(config_path_with(None, &env(&[])), None);
    }

    #[test]
    fn profile_names() {
        for ok in ["default", "a", "work.prod", "x_y-z", &"a".repeat(64)] {
            assert!(is_valid_profile_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            "é",
            &"a".repeat(65),
            "a\0",
        ] {
            assert!(!is_valid_profile_name(bad), "{bad:?}");
        }
    }
}
