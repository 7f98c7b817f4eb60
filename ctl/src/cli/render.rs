//! Output formats of `broker-ctl`: the `status` JSON schema (contract §7), the human
//! status table, and `watch` lines. None of them ever includes a token.
//!
//! Human output escapes control characters ([`escape_controls`]): names,
//! subjects, issuers and errors can come from an IdP, and an ESC or CR in
//! them must not reach the terminal. JSON output is escaped by serde_json.

use std::time::{Duration, UNIX_EPOCH};

use kontext_broker_protocol::{ProfileStatus, StatusReport, WatchEvent};
use serde_json::{json, Value};

/// `text` with every control character written as a visible escape
/// (`\x1b`, `\n`, `\u{9b}`), so it cannot move the cursor, forge a line or
/// ring the bell.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    use std::fmt::Write;
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Unix seconds as RFC 3339 UTC with second precision.
pub fn rfc3339(unix_secs: u64) -> String {
    use std::fmt::Write;
    // humantime cannot format years past 9999; never panic on a lying IdP's expiry.
    let mut out = String::new();
    match UNIX_EPOCH.checked_add(Duration::from_secs(unix_secs)) {
        Some(t) if write!(out, "{}", humantime::format_rfc3339_seconds(t)).is_ok() => out,
        _ => "9999-12-31T23:59:59Z".to_owned(),
    }
}

fn opt_time(t: Option<u64>) -> Value {
    t.map_or(Value::Null, |s| Value::String(rfc3339(s)))
}

fn profile_json(p: &ProfileStatus) -> Value {
    json!({
        "name": p.name,
        "issuer": p.issuer,
        "client_id": p.client_id,
        "subject": p.subject,
        "state": p.state.as_str(),
        "access_token_expires_at": opt_time(p.access_token_expires_at),
        "lifetime_source": p.lifetime_source.map(|l| l.as_str()),
        "generation": p.generation,
        "refresh_count": p.refresh_count,
        "refresh_failures": p.refresh_failures,
        "last_refresh_at": opt_time(p.last_refresh_at),
        "next_refresh_at": opt_time(p.next_refresh_at),
        "last_error": p.last_error,
    })
}

/// The `status --json` object (contract §7).
pub fn status_json(s: &StatusReport) -> Value {
    let b = &s.broker;
    json!({
        "broker": {
            "version": b.version,
            "pid": b.pid,
            "uptime_secs": b.uptime_secs,
            "socket": b.socket,
            "state_dir": b.state_dir,
            "locked": b.locked,
            "connections": b.connections,
            "rejected_peers": b.rejected_peers,
            "handshake_timeouts": b.handshake_timeouts,
        },
        "profiles": s.profiles.iter().map(profile_json).collect::<Vec<_>>(),
    })
}

fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

/// Expiry relative to `now`: "in 4m10s" or "expired 12s ago".
fn relative(t: Option<u64>, now: u64) -> String {
    match t {
        None => "-".to_owned(),
        Some(t) if t >= now => format!("in {}", human_duration(t - now)),
        Some(t) => format!("{} ago", human_duration(now - t)),
    }
}

/// The human `status` output: a broker line, then an aligned table of profiles.
pub fn status_table(s: &StatusReport, now: u64) -> String {
    let b = &s.broker;
    let mut out = format!(
        "broker {} (pid {}), up {}, {}, {} connection{}, {} rejected peer{}\n  socket {}\n  state  {}\n\n",
        b.version,
        b.pid,
        human_duration(b.uptime_secs),
        if b.locked { "LOCKED" } else { "unlocked" },
        b.connections,
        if b.connections == 1 { "" } else { "s" },
        b.rejected_peers,
        if b.rejected_peers == 1 { "" } else { "s" },
        escape_controls(&b.socket),
        escape_controls(&b.state_dir),
    );
    if b.handshake_timeouts > 0 {
        out.insert_str(
            out.find("\n  socket").unwrap_or(out.len()),
            &format!(
                ", {} handshake timeout{}",
                b.handshake_timeouts,
                if b.handshake_timeouts == 1 { "" } else { "s" }
            ),
        );
    }
    if s.profiles.is_empty() {
        out.push_str("no profiles; add one with `broker-ctl login` or `broker-ctl import`\n");
        return out;
    }
    let header = [
        "PROFILE",
        "STATE",
        "EXPIRES",
        "LIFETIME FROM",
        "GEN",
        "REFRESHES",
        "FAILURES",
        "NEXT REFRESH",
        "SUBJECT",
        "ISSUER",
        "LAST ERROR",
    ];
    let rows: Vec<[String; 11]> = s
        .profiles
        .iter()
        .map(|p| {
            [
                escape_controls(&p.name).into_owned(),
                p.state.as_str().to_owned(),
                relative(p.access_token_expires_at, now),
                p.lifetime_source.map_or("-", |l| l.as_str()).to_owned(),
                p.generation.to_string(),
                p.refresh_count.to_string(),
                p.refresh_failures.to_string(),
                relative(p.next_refresh_at, now),
                p.subject
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |s| escape_controls(s).into_owned()),
                escape_controls(&p.issuer).into_owned(),
                p.last_error
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |e| escape_controls(e).into_owned()),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i + 1 == widths.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in &rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

/// The event's snake_case name in `watch` output.
pub fn event_name(e: &WatchEvent) -> &'static str {
    match e {
        WatchEvent::Token { .. } => "token",
        WatchEvent::State { .. } => "state",
        WatchEvent::ReauthRequired { .. } => "reauth_required",
        WatchEvent::Removed { .. } => "removed",
        WatchEvent::ClientRejected { .. } => "client_rejected",
    }
}

/// One `watch --json` line: always `profile`, `event`, `generation`,
/// `expires_at` (null when not applicable), never the token itself.
pub fn watch_json(e: &WatchEvent) -> Value {
    let mut v = json!({
        "profile": e.profile(),
        "event": event_name(e),
        "generation": Value::Null,
        "expires_at": Value::Null,
    });
    match e {
        WatchEvent::Token { token, .. } => {
            v["generation"] = json!(token.generation);
            v["expires_at"] = json!(rfc3339(token.expires_at));
            v["issued_at"] = json!(rfc3339(token.issued_at));
            v["scopes"] = json!(token.scopes);
        }
        WatchEvent::State {
            state,
            generation,
            expires_at,
            ..
        } => {
            v["state"] = json!(state.as_str());
            v["generation"] = json!(generation);
            v["expires_at"] = opt_time(*expires_at);
        }
        WatchEvent::ReauthRequired { message, .. } | WatchEvent::ClientRejected { message, .. } => {
            v["message"] = json!(message)
        }
        WatchEvent::Removed { .. } => {}
    }
    v
}

/// One human `watch` line.
pub fn watch_line(e: &WatchEvent, now: u64) -> String {
    let head = format!(
        "{} {} {}",
        rfc3339(now),
        escape_controls(e.profile()),
        event_name(e)
    );
    match e {
        WatchEvent::Token { token, .. } => format!(
            "{head} generation={} expires_at={}",
            token.generation,
            rfc3339(token.expires_at)
        ),
        WatchEvent::State {
            state,
            generation,
            expires_at,
            ..
        } => format!(
            "{head} state={} generation={generation} expires_at={}",
            state.as_str(),
            expires_at.map_or_else(|| "-".to_owned(), rfc3339)
        ),
        WatchEvent::ReauthRequired { message, .. } | WatchEvent::ClientRejected { message, .. } => {
            format!("{head} {}", escape_controls(message))
        }
        WatchEvent::Removed { .. } => head,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kontext_broker_protocol::{BrokerStatus, ProfileState};

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_controls("plain"), "plain");
        assert_eq!(
            escape_controls("a\x1b[2Jb\x07\r\nc\u{9b}"),
            "a\\x1b[2Jb\\x07\\r\\nc\\u{9b}"
        );
    }

    #[test]
    fn the_status_table_never_prints_raw_control_characters() {
        let report = StatusReport {
            broker: BrokerStatus {
                version: "1".into(),
                pid: 1,
                uptime_secs: 1,
                socket: "/s\x1b".into(),
                state_dir: "/d".into(),
                locked: false,
                connections: 1,
                rejected_peers: 0,
                handshake_timeouts: 2,
            },
            profiles: vec![ProfileStatus {
                name: "p".into(),
                issuer: "https://i\x07".into(),
                client_id: "c".into(),
                subject: Some("eve\x1b]0;pwned\x07\x1b[2J".into()),
                state: ProfileState::Valid,
                access_token_expires_at: None,
                generation: 1,
                refresh_count: 0,
                refresh_failures: 0,
                last_refresh_at: None,
                next_refresh_at: None,
                last_error: Some("x\nFORGED line".into()),
                lifetime_source: None,
            }],
            next_after: None,
        };
        let table = status_table(&report, 0);
        assert!(
            !table.contains('\x1b') && !table.contains('\x07'),
            "{table}"
        );
        assert!(table.contains("eve\\x1b]0;pwned\\x07\\x1b[2J"), "{table}");
        assert!(!table.lines().any(|l| l.starts_with("FORGED")), "{table}");
        assert!(table.contains("2 handshake timeouts"), "{table}");
        let line = watch_line(
            &WatchEvent::ReauthRequired {
                profile: "p".into(),
                message: "m\x1b[2J".into(),
            },
            0,
        );
        assert!(!line.contains('\x1b'), "{line}");
    }
}
