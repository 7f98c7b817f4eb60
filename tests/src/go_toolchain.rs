//! Runs the Go toolchain for the Go client (`client-go/`): finding `go`,
//! offline settings, and building the heartbeat sidecar.
//!
//! Go is a prerequisite like Node: outside CI a missing `go` skips the Go
//! tests with a message; with `CI` set it fails them (`.ci/run` installs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `client-go/` directory of this workspace.
pub fn client_go_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("client-go")
}

/// The `go` binary: on `PATH`, else Debian's `/usr/lib/go/bin/go`. `None`
/// outside CI when there is none; under CI a missing `go` panics.
pub fn go_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("go"))
            .find(|p| p.is_file())
    });
    let found = on_path.or_else(|| {
        let debian = PathBuf::from("/usr/lib/go/bin/go");
        debian.is_file().then_some(debian)
    });
    if found.is_none() {
        kontext_broker_testutil::missing(
            "the `go` program (apt-get install golang-go)",
            "build and test the Go client",
        );
    }
    found
}

/// A `go` command in `dir`, offline: no module proxy, no toolchain download.
pub fn go_command(go: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(go);
    cmd.current_dir(dir)
        .env("GOPROXY", "off")
        .env("GOFLAGS", "-mod=mod")
        .env("GOTOOLCHAIN", "local")
        .env_remove("GOOS")
        .env_remove("GOARCH");
    if std::env::var_os("GOCACHE").is_none()
        && std::env::var_os("HOME").is_none()
        && std::env::var_os("XDG_CACHE_HOME").is_none()
    {
        let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/go-cache");
        cmd.env("GOCACHE", cache);
    }
    cmd
}

/// Runs `cmd` and panics with its output unless it succeeds.
pub fn run_ok(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Builds `client-go/examples/heartbeat` into `out_dir` and returns its path.
pub fn build_heartbeat(go: &Path, out_dir: &Path) -> PathBuf {
    let bin = out_dir.join("heartbeat");
    run_ok(
        "go build ./examples/heartbeat",
        go_command(go, &client_go_dir())
            .arg("build")
            .arg("-o")
            .arg(&bin)
            .arg("./examples/heartbeat"),
    );
    bin
}
