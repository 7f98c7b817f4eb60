//! The benchmark report: runs every scenario against the release binaries and
//! writes `BENCHMARKS.md`. Run it through `tests/bench/run.sh`, which builds the
//! binaries first and passes its arguments on:
//!
//! ```text
//! cargo bench -p kontext-broker-tests --bench report -- [--out FILE] [--runs N] [--quick] [--only a,b,...]
//! ```
//!
//! Scenario names for `--only`: latency, source, throughput, scale, coalescing,
//! cold-start, peer. `--quick` shortens every scenario (for a smoke run).
//! Internal modes, used by the report itself: `--echo-server std|tokio PATH SIZE`
//! and `--syscall-probe SOCKET CALLS`.

mod go;
mod peer;
mod report;
mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use kontext_broker_tests::bench::{self, Machine};
use report::Report;

/// Options of one report run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the report goes.
    pub out: PathBuf,
    /// Repetitions of the latency scenarios (the spread is reported).
    pub runs: usize,
    /// Shorter scenarios, for a smoke run.
    pub quick: bool,
    /// Scenarios to run; empty means all.
    pub only: Vec<String>,
}

impl Options {
    fn wants(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }

    /// `long` normally, `short` with `--quick`.
    pub fn pick<T>(&self, long: T, short: T) -> T {
        if self.quick {
            short
        } else {
            long
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--echo-server") => {
            let path = PathBuf::from(&args[2]);
            let size: usize = args[3].parse().expect("size");
            match args[1].as_str() {
                "std" => bench::serve_echo_std(&path, size),
                _ => bench::serve_echo_tokio(&path, size),
            }
            return;
        }
        Some("--syscall-probe") => {
            scenarios::syscall_probe(&PathBuf::from(&args[1]), args[2].parse().expect("calls"));
            return;
        }
        _ => {}
    }
    let mut opts = Options {
        out: PathBuf::from("BENCHMARKS.md"),
        runs: 3,
        quick: false,
        only: Vec::new(),
    };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--out" => opts.out = PathBuf::from(rest.next().expect("--out FILE")),
            "--runs" => opts.runs = rest.next().expect("--runs N").parse().expect("--runs N"),
            "--quick" => opts.quick = true,
            "--only" => {
                opts.only = rest
                    .next()
                    .expect("--only a,b")
                    .split(',')
                    .map(str::to_owned)
                    .collect()
            }
            // `cargo bench`-style flags are ignored.
            "--bench" => {}
            other => panic!("unknown argument {other}; see the module docs"),
        }
    }
    raise_fd_limit();
    let machine = Machine::now();
    eprintln!(
        "report: {} x {} cores, load {}",
        machine.cpu_model, machine.cores, machine.load
    );
    let mut report = Report::new(machine, opts.runs);
    let fixture = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("fixture runtime");
    let ctx = scenarios::Context::new(&fixture, &opts);
    if opts.wants("latency") {
        scenarios::latency(&ctx, &mut report);
    }
    if opts.wants("source") {
        scenarios::source(&ctx, &mut report);
    }
    if opts.wants("throughput") {
        scenarios::throughput(&ctx, &mut report);
    }
    if opts.wants("scale") {
        scenarios::scale(&ctx, &mut report);
    }
    if opts.wants("coalescing") {
        scenarios::coalescing(&ctx, &mut report);
    }
    if opts.wants("cold-start") {
        scenarios::cold_start(&ctx, &mut report);
    }
    if opts.wants("peer") {
        peer::compare(&ctx, &mut report);
    }
    report.finish();
    std::fs::write(&opts.out, report.render()).expect("writing the report");
    eprintln!("report: wrote {}", opts.out.display());
    print!("{}", report.render_table());
    // Give spawned processes' reapers a moment; everything is dropped by now.
    std::thread::sleep(Duration::from_millis(10));
}

/// Every client is a descriptor here and one in the broker, which inherits our limit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
