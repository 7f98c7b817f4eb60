//! Scenario 3b: the Go client's `TokenSource.Token()` on a fresh token, from
//! the benchmarks in `client-go/broker/bench_test.go`, run against the same
//! release broker binary as the Rust rows.

use std::path::Path;
use std::process::Stdio;

use kontext_broker_tests::bench::{go_bench_metrics, GoMetrics};
use kontext_broker_tests::broker_process::broker_binary;
use kontext_broker_tests::go_toolchain::{client_go_dir, go_command};

use crate::report::{Report, Row, Verdict};

/// Runs `go test -bench '^NAME$' -benchtime TIME ./broker` and returns the
/// metrics of its result line, or why there are none.
fn go_bench(go: &Path, name: &str, benchtime: &str) -> Result<GoMetrics, String> {
    let out = go_command(go, &client_go_dir())
        .env("KONTEXT_BROKER_BIN", broker_binary())
        .args(["test", "-run", "^$", "-bench"])
        .arg(format!("^{name}$"))
        .args(["-benchtime", benchtime, "./broker"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run go: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let tail: String = stdout.lines().rev().take(5).collect::<Vec<_>>().join(" / ");
        return Err(format!("go test -bench {name} failed: {tail}"));
    }
    go_bench_metrics(&stdout, name)
        .ok_or_else(|| format!("no result line for {name} in go's output"))
}

/// Adds row 3b.
pub fn token_source(report: &mut Report, go: Option<&Path>, calls: u64) {
    const SCENARIO: &str = "3b. Go `TokenSource.Token()`, fresh";
    let Some(go) = go else {
        report.row(Row::skipped(
            SCENARIO,
            "`go` is not installed (apt-get install golang-go)",
        ));
        return;
    };
    let fresh = match go_bench(go, "BenchmarkTokenSourceFresh", &format!("{calls}x")) {
        Ok(m) => m,
        Err(why) => {
            report.row(Row::skipped(SCENARIO, &why));
            return;
        }
    };
    // One pass: the probe itself makes a million calls under strace.
    let syscalls = go_bench(go, "BenchmarkTokenSourceFreshSyscalls", "1x");
    let ns = fresh.get("ns/op").copied().unwrap_or(f64::NAN);
    let cpu_ns = fresh.get("cpu-ns/op").copied().unwrap_or(f64::NAN);
    let allocs = fresh.get("allocs/op").copied().unwrap_or(f64::NAN);
    let (shown, verdict) = match &syscalls {
        Ok(m) => {
            let during = m.get("trace-lines/1M-Token").copied().unwrap_or(f64::NAN);
            let baseline = m.get("trace-lines/baseline").copied().unwrap_or(f64::NAN);
            // The Go runtime's own calls (sysmon preemption, futex hand-offs)
            // show up in a loop without any I/O too (the baseline). A syscall
            // in `Token()` itself would add a million lines; fewer than one per
            // thousand calls means the path makes none.
            let verdict = if during < 1000.0 {
                Verdict::Met
            } else {
                Verdict::Missed
            };
            (
                format!(
                    "{during:.0} syscalls on the calling thread in 1M calls (a no-I/O loop of the same length: {baseline:.0}, the Go scheduler's)"
                ),
                verdict,
            )
        }
        Err(why) => (format!("syscalls not counted ({why})"), Verdict::Info),
    };
    report.row(Row {
        scenario: SCENARIO.into(),
        ours: format!("{ns:.1} ns per call ({cpu_ns:.1} ns CPU), {allocs:.0} allocations; {shown}"),
        reference: "–".into(),
        ratio: "–".into(),
        budget: "0 syscalls of its own".into(),
        verdict,
    });
}
