//! Helpers shared by the tests of every crate.
//!
//! Test prerequisites (root, an installed tool): when env `CI` is set a missing
//! one fails the test with a message naming it; elsewhere the test is skipped
//! with a printed note. No test may skip silently.
//!
//! [`mock_broker`]: a scripted broker on a Unix socket, for client and CLI tests.

pub mod mock_broker;

use std::path::{Path, PathBuf};

/// Directories searched for tools besides `PATH` (sbin is often not on a user's PATH).
const EXTRA_DIRS: [&str; 4] = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"];

/// True when running under CI (env `CI` set and not empty or `false`).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Reports a missing prerequisite: panics under CI, else prints a skip note.
/// Always returns `false`, so callers can `return` on it.
pub fn missing(what: &str, why: &str) -> bool {
    if under_ci() {
        panic!(
            "missing test prerequisite under CI: {what} (needed to {why}); \
             .ci/run must provide it"
        );
    }
    eprintln!("SKIPPED: {what} is missing (needed to {why}); under CI this fails");
    false
}

/// True when the test runs as root; otherwise see [`missing`].
pub fn root(why: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    (unsafe { libc::geteuid() } == 0) || missing("root (euid 0)", why)
}

/// The path of an executable `name`, from `PATH` or the usual system
/// directories; `None` (after [`missing`]) when it is not installed.
pub fn tool(name: &str, why: &str) -> Option<PathBuf> {
    let found = find_tool(name);
    if found.is_none() {
        missing(&format!("the `{name}` program"), why);
    }
    found
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_and_not_a_made_up_tool() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("no-such-tool-kontext-test").is_none());
    }
}
