//! `broker-ctl doctor` (contract §7): checks paths, permissions, the broker, each
//! profile's IdP discovery, and the clock against each IdP's `Date` header.
//!
//! One line per check on stdout, `ok`, `warn` or `fail` first. Nothing is
//! created or changed. Exit 0 only when every check is `ok`.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kontext_broker_protocol::{paths, StatusReport};

use super::{connect, exit, Failure};
use kontext_broker::config::Config;
use kontext_broker::idp::{discover, validate_issuer, Http};

/// Clock skew against an IdP above which a warning is given. Token lifetimes
/// and ID token `iat`/`exp` checks start to misbehave around here.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Fine.
    Ok,
    /// Works, but deserves attention.
    Warn,
    /// Broken.
    Fail,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        }
    }
}

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Check {
    /// Verdict.
    pub level: Level,
    /// What was checked and what was found (and the fix, if any).
    pub message: String,
}

fn check(level: Level, message: impl Into<String>) -> Check {
    Check {
        level,
        message: message.into(),
    }
}

/// Runs every check and prints one line each to `out`.
pub async fn run(socket: Option<&Path>, out: &mut dyn Write) -> Result<(), Failure> {
    let checks = checks(socket).await;
    for c in &checks {
        writeln!(
            out,
            "{:<4} {}",
            c.level.as_str(),
            super::escape_controls(&c.message)
        )?;
    }
    let bad = checks.iter().filter(|c| c.level != Level::Ok).count();
    if bad == 0 {
        Ok(())
    } else {
        Err(Failure {
            code: exit::OTHER,
            message: format!(
                "{bad} of {} checks did not pass; see the lines above",
                checks.len()
            ),
        })
    }
}

/// All checks, in order: socket dir, socket, broker, state dir, profiles.
pub async fn checks(socket: Option<&Path>) -> Vec<Check> {
    let mut checks = Vec::new();
    let socket_path = paths::socket_path(socket);
    match socket_path.parent() {
        Some(dir) => checks.push(private_dir("socket directory", dir)),
        None => checks.push(check(
            Level::Fail,
            format!("socket path {} has no directory", socket_path.display()),
        )),
    }
    checks.push(socket_file(&socket_path));

    let status = broker(socket, &mut checks).await;
    let state_dir = match &status {
        Some(report) => Ok(report.broker.state_dir.clone().into()),
        None => paths::state_dir(None).map_err(|e| e.to_string()),
    };
    match state_dir {
        Ok(dir) => checks.push(private_dir("state directory", &dir)),
        Err(e) => checks.push(check(Level::Fail, format!("state directory: {e}"))),
    }

    if let Some(report) = status {
        let http = match Config::load(paths::config_path(None).as_deref()).and_then(|c| {
            Http::new(
                Duration::from_secs(c.http_connect_timeout_secs),
                Duration::from_secs(c.http_timeout_secs),
                &c.extra_root_certs,
            )
        }) {
            Ok(http) => http,
            Err(e) => {
                checks.push(check(Level::Fail, format!("config: {e}")));
                return checks;
            }
        };
        for p in &report.profiles {
            checks.extend(profile_checks(&http, &p.name, &p.issuer).await);
        }
    }
    checks
}

/// A directory that must exist, belong to us, and be closed to group/others.
fn private_dir(what: &str, dir: &Path) -> Check {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let shown = dir.display();
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return check(
                Level::Fail,
                format!("{what} {shown} does not exist; starting the broker creates it"),
            )
        }
        Err(e) => return check(Level::Fail, format!("{what} {shown}: {e}")),
    };
    let mode = meta.permissions().mode() & 0o7777;
    let euid = paths::euid();
    if !meta.is_dir() {
        check(Level::Fail, format!("{what} {shown} is not a directory"))
    } else if meta.uid() != euid {
        check(
            Level::Fail,
            format!(
                "{what} {shown} is owned by uid {}, not {euid}; use a directory you own",
                meta.uid()
            ),
        )
    } else if mode & 0o077 != 0 {
        check(
            Level::Fail,
            format!("{what} {shown} has mode {mode:04o}; fix with `chmod 700 {shown}`"),
        )
    } else {
        check(
            Level::Ok,
            format!("{what} {shown} (mode {mode:04o}, uid {euid})"),
        )
    }
}

/// The socket file: ours, a socket, not open to group/others.
fn socket_file(path: &Path) -> Check {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let shown = path.display();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return check(
                Level::Fail,
                format!("socket {shown} does not exist; start the broker (kontext-broker)"),
            )
        }
        Err(e) => return check(Level::Fail, format!("socket {shown}: {e}")),
    };
    let mode = meta.permissions().mode() & 0o7777;
    let euid = paths::euid();
    if !meta.file_type().is_socket() {
        check(Level::Fail, format!("{shown} is not a socket"))
    } else if meta.uid() != euid {
        check(
            Level::Fail,
            format!(
                "socket {shown} is owned by uid {}, not {euid}; the client will refuse it",
                meta.uid()
            ),
        )
    } else if mode & 0o077 != 0 {
        check(
            Level::Warn,
            format!("socket {shown} has mode {mode:04o}, expected 0600; restart the broker"),
        )
    } else {
        check(
            Level::Ok,
            format!("socket {shown} (mode {mode:04o}, uid {euid})"),
        )
    }
}

/// Ping and status; the report feeds the remaining checks.
async fn broker(socket: Option<&Path>, checks: &mut Vec<Check>) -> Option<StatusReport> {
    let client = match connect(socket).await {
        Ok(c) => c,
        Err(f) => {
            checks.push(check(Level::Fail, format!("broker: {}", f.message)));
            return None;
        }
    };
    if let Err(e) = client.ping().await {
        checks.push(check(Level::Fail, format!("broker ping: {e}")));
        return None;
    }
    let report = match client.status().await {
        Ok(r) => r,
        Err(e) => {
            checks.push(check(Level::Fail, format!("broker status: {e}")));
            return None;
        }
    };
    let b = &report.broker;
    checks.push(check(
        Level::Ok,
        format!(
            "broker {} (pid {}) answers; {} profile(s)",
            b.version,
            b.pid,
            report.profiles.len()
        ),
    ));
    if b.locked {
        checks.push(check(
            Level::Warn,
            "broker is locked; run `broker-ctl unlock`",
        ));
    }
    Some(report)
}

/// Discovery and clock skew for one profile's issuer.
async fn profile_checks(http: &Http, name: &str, issuer: &str) -> Vec<Check> {
    let mut out = Vec::new();
    match discover(http, issuer).await {
        Ok(_) => out.push(check(
            Level::Ok,
            format!("profile `{name}`: discovery at {issuer} works"),
        )),
        Err(e) => {
            out.push(check(Level::Fail, format!("profile `{name}`: {e}")));
            return out;
        }
    }
    out.push(clock_skew(http, name, issuer).await);
    out
}

async fn clock_skew(http: &Http, name: &str, issuer: &str) -> Check {
    let url = match validate_issuer(issuer) {
        Ok(u) => u,
        Err(e) => return check(Level::Fail, format!("profile `{name}`: {e}")),
    };
    let response = match http.get(url.as_str()).await {
        Ok(r) => r,
        Err(e) => {
            return check(
                Level::Warn,
                format!("profile `{name}`: clock skew unknown ({e})"),
            )
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let date = response
        .headers()
        .get(::http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_http_date);
    let Some(date) = date else {
        return check(
            Level::Warn,
            format!("profile `{name}`: {issuer} sent no usable Date header; clock skew unknown"),
        );
    };
    let skew = now.abs_diff(date);
    let direction = if now >= date { "ahead of" } else { "behind" };
    if skew > MAX_CLOCK_SKEW.as_secs() {
        check(
            Level::Warn,
            format!("profile `{name}`: this clock is {skew} s {direction} {issuer}; sync it (e.g. `timedatectl set-ntp true`)"),
        )
    } else {
        check(
            Level::Ok,
            format!("profile `{name}`: clock within {skew} s of {issuer}"),
        )
    }
}

/// Parses an HTTP date (RFC 9110 §5.6.7, all three historic forms) to unix
/// seconds, with the `httpdate` crate that hyper uses.
pub fn parse_http_date(s: &str) -> Option<u64> {
    let time = httpdate::parse_http_date(s.trim()).ok()?;
    time.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn http_dates() {
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(
            parse_http_date("Fri, 27 Nov 2026 23:24:21 GMT"),
            Some(1_795_821_861)
        );
        // RFC 9110 §5.6.7: recipients must accept the two obsolete forms too.
        for obsolete in ["Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"] {
            assert_eq!(parse_http_date(obsolete), Some(784_111_777), "{obsolete}");
        }
        for bad in [
            "",
            "Sun, 06 Nov 99999 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn private_dir_checks_mode_and_existence() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        assert_eq!(private_dir("x", &dir).level, Level::Fail);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(private_dir("x", &dir).level, Level::Ok);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        let c = private_dir("x", &dir);
        assert_eq!(c.level, Level::Fail);
        assert!(c.message.contains("chmod 700"), "{}", c.message);
    }

    #[test]
    fn socket_check_wants_a_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s");
        assert_eq!(socket_file(&path).level, Level::Fail);
        std::fs::write(&path, b"").unwrap();
        assert_eq!(socket_file(&path).level, Level::Fail);
        std::fs::remove_file(&path).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(socket_file(&path).level, Level::Ok);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(socket_file(&path).level, Level::Warn);
    }
}
