//! Scenario 8: whole-process comparison with oidc-agent 4.2 (`oidc-token`), both
//! pointed at the same local `oidc-provider`, run interleaved (A B C A B C).
//!
//! oidc-agent always authenticates its client with HTTP Basic, so both sides use
//! the provider's confidential client, each with its own grant (the provider
//! rotates refresh tokens, so sharing one would break both). The account is
//! created non-interactively from a minted refresh token (`oidc-gen --rt-env`),
//! which needs no browser and no `prompt=consent`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kontext_broker_client::{BrokerClient, ImportRequest, Secret};
use kontext_broker_protocol::ClientCredential;
use kontext_broker_tests::bench::{
    fmt_duration, interleaved, interleaved_spaced, median, summarize,
};
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess};
use kontext_broker_tests::oidc_provider::{
    idp_dir, OidcProvider, CONFIDENTIAL_CLIENT_ID, CONFIDENTIAL_CLIENT_SECRET,
};
use kontext_broker_tests::scenario::broker_ctl_binary;

use crate::report::{Report, Row, Verdict};
use crate::scenarios::Context;

const ACCOUNT: &str = "kontext-bench";

/// A running oidc-agent, killed on drop.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
}

impl Agent {
    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("agent.sock")
    }

    fn config_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("config")
    }

    /// Environment every oidc-agent tool needs.
    fn env(&self, cmd: &mut Command) {
        cmd.env("OIDC_SOCK", self.socket())
            .env("OIDC_CONFIG_DIR", self.config_dir());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn installed(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

pub fn compare(ctx: &Context, report: &mut Report) {
    report.section("8. Whole process vs. oidc-agent 4.2 (interleaved, same oidc-provider)");
    if !["oidc-agent", "oidc-gen", "oidc-token"]
        .iter()
        .all(|t| installed(t))
    {
        report.row(Row::skipped(
            "8. broker-ctl vs oidc-token",
            "oidc-agent-cli is not installed (tests/bench/run.sh installs it with apt when it can)",
        ));
        return;
    }
    if !idp_dir().join("node_modules").is_dir() {
        report.row(Row::skipped(
            "8. broker-ctl vs oidc-token",
            "tests/idp/node_modules is missing: run `npm ci --prefix tests/idp`",
        ));
        return;
    }
    let provider = ctx.fixture.block_on(OidcProvider::start(3600));
    let broker = BrokerProcess::start(BrokerOptions {
        rust_log: "warn".into(),
        ..BrokerOptions::default()
    });
    ctx.fixture.block_on(async {
        let client = BrokerClient::connect_to(broker.socket())
            .await
            .expect("connect");
        let minted = provider
            .mint(CONFIDENTIAL_CLIENT_ID, &["openid", "offline_access"])
            .await;
        client
            .import(ImportRequest {
                profile: "default".into(),
                issuer: provider.issuer().into(),
                client_id: CONFIDENTIAL_CLIENT_ID.into(),
                credential: ClientCredential::Secret(Secret::from(CONFIDENTIAL_CLIENT_SECRET)),
                client_auth: None,
                scopes: vec!["openid".into(), "offline_access".into()],
                endpoints: Default::default(),
                token_response: Secret::new(minted.to_string()),
            })
            .await
            .expect("import");
    });
    let agent = match start_agent(ctx, &provider) {
        Ok(agent) => agent,
        Err(why) => {
            report.row(Row::skipped("8. broker-ctl vs oidc-token", &why));
            return;
        }
    };

    let ctl = |args: &[&str]| {
        let mut c = Command::new(broker_ctl_binary());
        c.arg("--socket").arg(broker.socket()).args(args);
        c.env_remove("KONTEXT_BROKER_SOCKET").env_remove("RUST_LOG");
        c
    };
    let oidc = |args: &[&str]| {
        let mut c = Command::new("oidc-token");
        c.args(args).arg(ACCOUNT);
        agent.env(&mut c);
        c
    };
    // Warm the page cache and both daemons.
    interleaved(
        &mut [ctl(&["token"]), oidc(&[]), Command::new("/bin/true")],
        20,
    );

    let rounds = ctx.opts.pick(300, 40);
    let mut r_cached = Vec::new();
    let mut r_true = Vec::new();
    let mut last = None;
    for run in 0..ctx.opts.runs {
        let mut t = interleaved(
            &mut [ctl(&["token"]), oidc(&[]), Command::new("/bin/true")],
            rounds,
        );
        let (ours, theirs, truth) = (
            summarize(&mut t[0]),
            summarize(&mut t[1]),
            summarize(&mut t[2]),
        );
        eprintln!(
            "  run {run}: broker-ctl token {:?}, oidc-token {:?}, /bin/true {:?}",
            ours.p50, theirs.p50, truth.p50
        );
        r_cached.push(ours.p50.as_secs_f64() / theirs.p50.as_secs_f64());
        r_true.push(ours.p50.as_secs_f64() / truth.p50.as_secs_f64());
        last = Some((ours, theirs, truth));
    }
    let (ours, theirs, truth) = last.expect("runs");
    let spread = |v: &[f64]| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        format!("{:.2}× [{min:.2}–{max:.2}]", median(v))
    };
    report.row(Row {
        scenario: format!("8a. cached token: `broker-ctl token` vs `oidc-token {ACCOUNT}` ({rounds} rounds per run)"),
        ours: format!("median {}", fmt_duration(ours.p50)),
        reference: format!("median {}", fmt_duration(theirs.p50)),
        ratio: spread(&r_cached),
        budget: "≤ 1.0×".into(),
        verdict: if median(&r_cached) <= 1.0 {
            Verdict::Met
        } else {
            Verdict::Missed
        },
    });
    report.row(Row {
        scenario: "8b. `broker-ctl token` vs `/bin/true` (process floor)".into(),
        ours: format!("median {}", fmt_duration(ours.p50)),
        reference: format!("median {}", fmt_duration(truth.p50)),
        ratio: spread(&r_true),
        budget: "ideally ≤ 1.5×".into(),
        verdict: if median(&r_true) <= 1.5 {
            Verdict::Met
        } else {
            Verdict::Info
        },
    });

    // Forced refresh with rotation: every call is a token-endpoint round trip.
    let refresh_rounds = ctx.opts.pick(15, 4);
    // Spaced 1.1 s apart per command: the broker makes at most one
    // token-endpoint call a second per profile (docs/contract.md), and a
    // round that waits out that rule measures the rule, not the refresh.
    let mut t = interleaved_spaced(
        &mut [ctl(&["refresh"]), oidc(&["-f"])],
        refresh_rounds,
        Duration::from_millis(1100),
    );
    let (ours, theirs) = (summarize(&mut t[0]), summarize(&mut t[1]));
    report.row(Row {
        scenario: format!(
            "8c. forced refresh: `broker-ctl refresh` vs `oidc-token -f` ({refresh_rounds} rounds, each ≥ 1.1 s after its previous)"
        ),
        ours: format!("median {}", fmt_duration(ours.p50)),
        reference: format!("median {}", fmt_duration(theirs.p50)),
        ratio: format!("{:.3}×", ours.p50.as_secs_f64() / theirs.p50.as_secs_f64()),
        budget: "–".into(),
        verdict: Verdict::Info,
    });
    drop(agent);
    drop(broker);
    drop(provider);
}

/// Starts oidc-agent in a temp dir and adds an account for a fresh grant of
/// the confidential client.
fn start_agent(ctx: &Context, provider: &OidcProvider) -> Result<Agent, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let config = dir.path().join("config");
    std::fs::create_dir(&config).map_err(|e| e.to_string())?;
    let socket = dir.path().join("agent.sock");
    let child = Command::new("oidc-agent")
        .arg("--console")
        .arg("--no-autoload")
        .arg(format!("--socket-path={}", socket.display()))
        .env("OIDC_CONFIG_DIR", &config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start oidc-agent: {e}"))?;
    let agent = Agent { child, dir };
    wait_for(&socket)?;
    let minted = ctx
        .fixture
        .block_on(provider.mint(CONFIDENTIAL_CLIENT_ID, &["openid", "offline_access"]));
    // The client configuration goes in a 0600 file and the refresh token in the
    // environment, so neither shows up in a process list.
    let client_file = agent.dir.path().join("client.json");
    let client = serde_json::json!({
        "issuer_url": provider.issuer(),
        "client_id": CONFIDENTIAL_CLIENT_ID,
        "client_secret": CONFIDENTIAL_CLIENT_SECRET,
        "redirect_uris": ["http://localhost:8765/callback"],
        "scope": "openid offline_access",
    });
    std::fs::write(&client_file, client.to_string()).map_err(|e| e.to_string())?;
    let refresh_token = minted["refresh_token"]
        .as_str()
        .ok_or("minted response has no refresh_token")?;
    let mut gen = Command::new("oidc-gen");
    gen.arg(format!("--file={}", client_file.display()))
        .args(["--rt-env", "--pw-env", "--confirm-default", "--no-url-call"])
        .args(["--prompt=none", "--scope=openid offline_access", ACCOUNT])
        .env("OIDC_REFRESH_TOKEN", refresh_token)
        .env("OIDC_ENCRYPTION_PW", "kontext-bench-not-secret")
        .stdin(Stdio::null());
    agent.env(&mut gen);
    let out = gen
        .output()
        .map_err(|e| format!("cannot run oidc-gen: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "oidc-gen failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(agent)
}

fn wait_for(path: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err("oidc-agent did not create its socket".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
