//! The Go client (`client-go/`) in the workspace's test command: `go vet`
//! (also for macOS), `go test ./...` against the real broker binary, and the
//! x/oauth2 adapter built in GOPATH mode against Debian's
//! golang-golang-x-oauth2-dev (no module proxy is reachable in CI).

use std::path::Path;

use kontext_broker_tests::broker_process::broker_binary;
use kontext_broker_tests::go_toolchain::{client_go_dir, go_binary, go_command, run_ok};

/// Debian's GOPATH with golang.org/x/oauth2 and its dependencies.
const DEBIAN_GOCODE: &str = "/usr/share/gocode";

#[test]
fn go_client_vets_and_passes_its_tests_against_the_real_broker() {
    let Some(go) = go_binary() else { return };
    let dir = client_go_dir();
    run_ok("go vet ./...", go_command(&go, &dir).args(["vet", "./..."]));
    run_ok(
        "GOOS=darwin go vet ./...",
        go_command(&go, &dir)
            .env("GOOS", "darwin")
            .args(["vet", "./..."]),
    );
    let bin = broker_binary();
    assert!(
        bin.exists(),
        "{} not found; run `cargo build -p kontext-broker --bins`",
        bin.display()
    );
    let out = run_ok(
        "go test ./...",
        go_command(&go, &dir)
            .env("KONTEXT_BROKER_BIN", &bin)
            .args(["test", "-count=1", "./..."]),
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn x_oauth2_adapter_builds_and_passes_in_gopath_mode() {
    let Some(go) = go_binary() else { return };
    let oauth2 = Path::new(DEBIAN_GOCODE).join("src/golang.org/x/oauth2");
    if !oauth2.is_dir() {
        kontext_broker_testutil::missing(
            &format!(
                "{} (apt-get install golang-golang-x-oauth2-dev)",
                oauth2.display()
            ),
            "build the x/oauth2 adapter",
        );
        return;
    }
    // A GOPATH whose src/ holds this module under its import path.
    let gopath = tempfile::tempdir().unwrap();
    let parent = gopath.path().join("src/example.invalid/kontext-broker");
    std::fs::create_dir_all(&parent).unwrap();
    std::os::unix::fs::symlink(client_go_dir(), parent.join("client-go")).unwrap();
    let pkg = parent.join("client-go/xoauth2");
    let path = format!("{}:{DEBIAN_GOCODE}", gopath.path().display());
    let gopath_mode = |extra: &[&str]| {
        let mut cmd = go_command(&go, &pkg);
        cmd.env("GO111MODULE", "off")
            .env("GOFLAGS", "")
            .env("GOPATH", &path)
            .args(extra);
        cmd
    };
    run_ok("go vet (GOPATH mode)", &mut gopath_mode(&["vet", "."]));
    run_ok(
        "GOOS=darwin go vet (GOPATH mode)",
        gopath_mode(&["vet", "."]).env("GOOS", "darwin"),
    );
    run_ok(
        "go test (GOPATH mode)",
        &mut gopath_mode(&["test", "-count=1", "."]),
    );
}
