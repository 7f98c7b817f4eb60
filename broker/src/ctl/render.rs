//! Output formats of `broker-ctl`: the `status` JSON schema (SPEC §7), the human
//! status table, and `watch` lines. None of them ever includes a token.

use std::time::{Duration, UNIX_EPOCH};

use kontext_broker_protocol::{ProfileStatus, StatusReport, WatchEvent};
use serde_json::{json, Value};

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
        "generation": p.generation,
        "refresh_count": p.refresh_count,
        "refresh_failures": p.refresh_failures,
        "last_refresh_at": opt_time(p.last_refresh_at),
        "next_refresh_at": opt_time(p.next_refresh_at),
        "last_error": p.last_error,
    })
}

/// The `status --json` object (SPEC §7).
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
        b.socket,
        b.state_dir,
    );
    if s.profiles.is_empty() {
        out.push_str("no profiles; add one with `broker-ctl login` or `broker-ctl import`\n");
        return out;
    }
    let header = [
        "PROFILE",
        "STATE",
        "EXPIRES",
        "GEN",
        "REFRESHES",
        "FAILURES",
        "NEXT REFRESH",
        "SUBJECT",
        "ISSUER",
        "LAST ERROR",
    ];
    let rows: Vec<[String; 10]> = s
        .profiles
        .iter()
        .map(|p| {
            [
                p.name.clone(),
                p.state.as_str().to_owned(),
                relative(p.access_token_expires_at, now),
                p.generation.to_string(),
                p.refresh_count.to_string(),
                p.refresh_failures.to_string(),
                relative(p.next_refresh_at, now),
                p.subject.clone().unwrap_or_else(|| "-".to_owned()),
                p.issuer.clone(),
                p.last_error.clone().unwrap_or_else(|| "-".to_owned()),
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
    let head = format!("{} {} {}", rfc3339(now), e.profile(), event_name(e));
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
            format!("{head} {message}")
        }
        WatchEvent::Removed { .. } => head,
    }
}
