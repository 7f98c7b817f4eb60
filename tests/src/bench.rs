//! Measuring helpers shared by the benchmarks and the `report` bench: percentiles,
//! the raw Unix-socket echo floor, interleaved whole-process timing, and a
//! description of the machine. Timing budgets live in the benchmarks, never in tests.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Median and 99th percentile of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Number of samples.
    pub n: usize,
}

/// Sorts `samples` and summarizes them. Panics on an empty set.
pub fn summarize(samples: &mut [Duration]) -> Summary {
    assert!(!samples.is_empty(), "no samples");
    samples.sort_unstable();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    Summary {
        p50: at(0.5),
        p99: at(0.99),
        n: samples.len(),
    }
}

/// The median of a few numbers (e.g. one ratio per run).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A raw echo server in its own process (`report --echo-server`), so the
/// floor crosses processes exactly like a broker round trip does.
pub struct EchoServer {
    child: Child,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

/// Which echo server to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoKind {
    /// A blocking `std` server.
    Std,
    /// A tokio server on a current-thread runtime.
    Tokio,
}

impl EchoServer {
    /// Starts `exe --echo-server std|tokio PATH SIZE` and waits for its socket.
    pub fn start(exe: &Path, kind: EchoKind, size: usize) -> EchoServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("echo.sock");
        let child = Command::new(exe)
            .arg("--echo-server")
            .arg(match kind {
                EchoKind::Std => "std",
                EchoKind::Tokio => "tokio",
            })
            .arg(&path)
            .arg(size.to_string())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning the echo server");
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&path).is_err() {
            assert!(Instant::now() < deadline, "echo server did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        EchoServer {
            child,
            path,
            _dir: dir,
        }
    }

    /// The server's socket.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves echoes of `size`-byte messages on `path` with blocking `std` I/O,
/// one thread per connection, until killed.
pub fn serve_echo_std(path: &Path, size: usize) {
    let listener = UnixListener::bind(path).expect("bind echo socket");
    for stream in listener.incoming() {
        let Ok(mut s) = stream else { continue };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; size];
            while s.read_exact(&mut buf).is_ok() {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        });
    }
}

/// Serves echoes of `size`-byte messages on `path` with tokio on a
/// current-thread runtime, one task per connection, until killed.
pub fn serve_echo_tokio(path: &Path, size: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let listener = tokio::net::UnixListener::bind(path).expect("bind echo socket");
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; size];
                while s.read_exact(&mut buf).await.is_ok() {
                    if s.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// A blocking echo client: each sample is one write of `size` bytes and one
/// read of the echo.
pub struct StdEcho {
    stream: UnixStream,
    out: Vec<u8>,
    back: Vec<u8>,
}

impl StdEcho {
    /// Connects to an echo server for `size`-byte messages.
    pub fn connect(path: &Path, size: usize) -> StdEcho {
        StdEcho {
            stream: UnixStream::connect(path).expect("connect echo"),
            out: vec![7u8; size],
            back: vec![0u8; size],
        }
    }

    /// Appends `n` round-trip times to `samples`.
    pub fn sample(&mut self, n: usize, samples: &mut Vec<Duration>) {
        for _ in 0..n {
            let t = Instant::now();
            self.stream.write_all(&self.out).expect("echo write");
            self.stream.read_exact(&mut self.back).expect("echo read");
            samples.push(t.elapsed());
        }
    }
}

/// The tokio equivalent of [`StdEcho`].
pub struct TokioEcho {
    stream: tokio::net::UnixStream,
    out: Vec<u8>,
    back: Vec<u8>,
}

impl TokioEcho {
    /// Connects to an echo server for `size`-byte messages.
    pub async fn connect(path: &Path, size: usize) -> TokioEcho {
        TokioEcho {
            stream: tokio::net::UnixStream::connect(path)
                .await
                .expect("connect echo"),
            out: vec![7u8; size],
            back: vec![0u8; size],
        }
    }

    /// Appends `n` round-trip times to `samples`.
    pub async fn sample(&mut self, n: usize, samples: &mut Vec<Duration>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for _ in 0..n {
            let t = Instant::now();
            self.stream.write_all(&self.out).await.expect("echo write");
            self.stream
                .read_exact(&mut self.back)
                .await
                .expect("echo read");
            samples.push(t.elapsed());
        }
    }
}

/// Runs each command `rounds` times, interleaved (A B C A B C ...), each with
/// its stdout captured like `$(cmd)` does, and returns each one's wall times.
/// Panics when a command fails, printing its stderr.
pub fn interleaved(commands: &mut [Command], rounds: usize) -> Vec<Vec<Duration>> {
    interleaved_spaced(commands, rounds, Duration::ZERO)
}

/// [`interleaved`], but each command starts at least `gap` after its own
/// previous start; the wait is not timed. For commands a rate limit would
/// otherwise slow down (the broker makes at most one token-endpoint call a
/// second per profile).
pub fn interleaved_spaced(
    commands: &mut [Command],
    rounds: usize,
    gap: Duration,
) -> Vec<Vec<Duration>> {
    let mut times = vec![Vec::with_capacity(rounds); commands.len()];
    let mut last_start: Vec<Option<Instant>> = vec![None; commands.len()];
    for _ in 0..rounds {
        for ((cmd, samples), last) in commands.iter_mut().zip(&mut times).zip(&mut last_start) {
            if let Some(wait) = last.and_then(|l| (l + gap).checked_duration_since(Instant::now()))
            {
                std::thread::sleep(wait);
            }
            let t = Instant::now();
            *last = Some(t);
            let out = cmd.output().expect("spawning a benchmarked command");
            samples.push(t.elapsed());
            assert!(
                out.status.success(),
                "{:?} failed: {}",
                cmd,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    times
}

/// What the report says about the machine.
#[derive(Debug, Clone)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Logical CPUs available to this process.
    pub cores: usize,
    /// /proc/loadavg's first three fields.
    pub load: String,
    /// Kernel release.
    pub kernel: String,
}

impl Machine {
    /// Reads the machine's description now.
    pub fn now() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        Machine {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            load: load_average(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned()),
        }
    }
}

/// /proc/loadavg's 1, 5 and 15 minute figures.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Formats a duration with a unit that suits its size.
pub fn fmt_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 10_000 {
        format!("{ns} ns")
    } else if ns < 10_000_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else if ns < 10_000_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// The metrics of one Go benchmark result line: unit (`ns/op`, `allocs/op`,
/// custom units) → value.
pub type GoMetrics = std::collections::HashMap<String, f64>;

/// The `value unit` pairs of `name`'s result line in `go test -bench` output
/// (`BenchmarkX-2  1000  31.5 ns/op  0 allocs/op`), or `None` without one.
pub fn go_bench_metrics(output: &str, name: &str) -> Option<GoMetrics> {
    let line = output.lines().find(|l| {
        l.split_whitespace().next().is_some_and(|first| {
            first == name
                || first
                    .strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|procs| procs.bytes().all(|b| b.is_ascii_digit()))
        })
    })?;
    let fields: Vec<&str> = line.split_whitespace().skip(2).collect();
    Some(
        fields
            .chunks(2)
            .filter_map(|pair| match pair {
                [value, unit] => Some(((*unit).to_owned(), value.parse().ok()?)),
                _ => None,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::go_bench_metrics;

    #[test]
    fn go_bench_metrics_reads_the_named_result_line() {
        let out = "goos: linux\n\
            BenchmarkTokenSourceFresh-2   \t 2000000\t  31.5 ns/op\t  29.0 cpu-ns/op\t  0 B/op\t  0 allocs/op\n\
            BenchmarkTokenSourceFreshSyscalls-2 \t 1\t 4.000 trace-lines/1M-Token\t 3.000 trace-lines/baseline\n\
            PASS\n";
        let m = go_bench_metrics(out, "BenchmarkTokenSourceFresh").unwrap();
        assert_eq!(m["ns/op"], 31.5);
        assert_eq!(m["cpu-ns/op"], 29.0);
        assert_eq!(m["allocs/op"], 0.0);
        assert_eq!(m.len(), 4);
        let s = go_bench_metrics(out, "BenchmarkTokenSourceFreshSyscalls").unwrap();
        assert_eq!(s["trace-lines/1M-Token"], 4.0);
        assert_eq!(s["trace-lines/baseline"], 3.0);
        assert!(go_bench_metrics(out, "BenchmarkGetTokenVsEcho").is_none());
    }
}
