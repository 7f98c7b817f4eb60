//! Regression tests for the defects an outside attack pass found (issue 9):
//! each runs the real broker binary against the fake IdP and states the
//! reproduction of one defect.

use std::time::{Duration, Instant};

use kontext_broker::config::IdentityKind;
use kontext_broker::store::{ProfileRecord, Store, StoreOptions, StoredAccessToken};
use kontext_broker_client::{ImportRequest, Secret};
use kontext_broker_protocol::ClientCredential;
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess, RawClient};
use kontext_broker_tests::fake_idp::{Failure, FakeIdp, FakeIdpConfig};
use kontext_broker_tests::scenario::{broker_ctl, connect, import, import_fake};
use serde_json::{json, Value};

const PROFILE: &str = "default";

async fn status_json(broker: &BrokerProcess) -> Value {
    let out = broker_ctl(broker.socket(), &["status", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

fn profile<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no profile {name} in {status}"))
}

/// Defect 1: an IdP error echoing the refresh token, with a newline, a forged
/// log line and an ESC sequence, reaches neither the log nor `last_error` raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_idp_error_text_is_sanitized_in_the_log_and_in_status() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let broker = BrokerProcess::start(BrokerOptions::default());
    let client = connect(broker.socket()).await;
    let minted = idp.mint();
    let refresh_token = minted["refresh_token"].as_str().unwrap().to_owned();
    import(&client, PROFILE, &idp.issuer(), idp.client_id(), &minted).await;

    let forged = "2030-01-01T00:00:00.000000Z  INFO kontext_broker: FORGED admin logged in";
    let bodies = [
        // The reproduction: everything in `error`.
        json!({ "error": format!("x {{refresh_token}}\n{forged}\u{1b}[2J") }),
        // Within the RFC charset, but holding the token.
        json!({ "error": "x {refresh_token}" }),
        // In the description.
        json!({
            "error": "invalid_request",
            "error_description": format!("bad {{refresh_token}}\n{forged}\u{1b}[2J\u{7}"),
        }),
    ];
    for body in bodies {
        idp.push_failure(Failure::Raw {
            status: 400,
            body: body.to_string(),
        });
        // A forced refresh cuts the backoff of the previous failure short. The
        // failure is transient, so the still-valid token is the answer.
        let calls = idp.token_calls();
        client.refresh(PROFILE).await.expect("the valid token");
        assert_eq!(idp.token_calls(), calls + 1);
        let status = status_json(&broker).await;
        let last_error = profile(&status, PROFILE)["last_error"]
            .as_str()
            .expect("last_error is set")
            .to_owned();
        println!("last_error: {last_error}");
        assert!(!last_error.contains(&refresh_token), "{last_error}");
        assert!(
            !last_error.contains(['\u{1b}', '\n', '\r', '\u{7}']),
            "{last_error:?}"
        );
    }
    let status = status_json(&broker).await;
    let last_error = profile(&status, PROFILE)["last_error"].as_str().unwrap();
    assert!(last_error.contains("[redacted]"), "{last_error}");
    // The token was never used up: the grant is intact.
    assert!(idp.grant_alive(&refresh_token));

    let log = broker.stderr();
    assert!(log.contains("token refresh failed"), "{log}");
    assert!(
        !log.contains(&refresh_token),
        "the refresh token reached the log"
    );
    assert!(!log.contains('\u{1b}'), "an ESC reached the log");
    assert!(
        !log.lines().any(|l| l.starts_with("2030-01-01")),
        "a forged line reached the log:\n{log}"
    );
    let human = broker_ctl(broker.socket(), &["status"]).await;
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        !human.contains(&refresh_token) && !human.contains('\u{1b}'),
        "{human}"
    );
}

/// Defect 2: `expires_in: 0` and one client calling `GetToken` in a loop.
/// Before the fix: 230 token-endpoint calls in 4 s, and spurious
/// `IdpUnavailable` errors. Now: at most one call per second, every request
/// answered with a token. (An upper bound: a slow machine only lowers it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_lifetimes_and_a_get_token_loop_call_the_idp_at_most_once_a_second() {
    let idp = FakeIdp::start(FakeIdpConfig {
        access_token_ttl_secs: 0,
        ..FakeIdpConfig::default()
    })
    .await;
    let broker = BrokerProcess::start(BrokerOptions::default());
    let client = connect(broker.socket()).await;
    import_fake(&client, PROFILE, &idp).await;
    let before = idp.token_calls();
    let start = Instant::now();
    let mut served = 0u64;
    while start.elapsed() < Duration::from_secs(4) {
        client
            .get_token(PROFILE, Duration::ZERO)
            .await
            .expect("a healthy IdP means a token, never IdpUnavailable");
        served += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let calls = idp.token_calls() - before;
    println!(
        "expires_in 0, GetToken loop for {elapsed:.1} s: {calls} IdP calls, {served} tokens served"
    );
    assert!(
        calls as f64 <= elapsed.ceil() + 1.0,
        "{calls} token-endpoint calls in {elapsed:.1} s"
    );
}

/// Defects 3 and 4: a FIFO and a 1 TiB sparse file in `profiles/` neither hang
/// nor abort the broker; both show as `error`, and the good profile loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_and_a_huge_profile_file_are_errors_and_the_rest_still_loads() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let mut broker = BrokerProcess::start(BrokerOptions::default());
    let client = connect(broker.socket()).await;
    import_fake(&client, "good", &idp).await;
    drop(client);
    broker.sigterm();
    assert!(broker.wait_exit(Duration::from_secs(10)).success());

    let profiles = broker.state_dir().join("profiles");
    let fifo = std::ffi::CString::new(
        profiles
            .join("pipe.age")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let huge = std::fs::File::create(profiles.join("huge.age")).unwrap();
    huge.set_len(1 << 40).unwrap();
    drop(huge);

    // `restart` waits until the broker answers: before the fix it never did.
    broker.restart();
    let status = status_json(&broker).await;
    assert_eq!(profile(&status, "good")["state"], "valid");
    for (name, why) in [("pipe", "FIFO"), ("huge", "bytes")] {
        let p = profile(&status, name);
        assert_eq!(p["state"], "error", "{p}");
        assert!(p["last_error"].as_str().unwrap().contains(why), "{p}");
    }
    let rss = broker.rss_kib().unwrap_or(0);
    assert!(rss < 512 * 1024, "the huge file was read: {rss} KiB RSS");
}

/// Defect 5: 400 profiles with 64-character names and fields at their caps
/// overflow one 64 KiB frame; `status` pages and `broker-ctl` lists them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_four_hundred_profiles_with_long_names() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    {
        let store = Store::open(
            &state,
            StoreOptions {
                identity: IdentityKind::File,
                scrypt_work_factor: None,
            },
        )
        .unwrap();
        let issuer = format!("https://idp.example/{}", "i".repeat(512 - 20));
        for n in 0..400 {
            let name = format!("{n:03}-{}", "p".repeat(60));
            assert_eq!(name.len(), 64);
            store
                .save(
                    &ProfileRecord::builder(
                        name,
                        issuer.clone(),
                        "c".repeat(256),
                        "http://127.0.0.1:9/token",
                    )
                    .scopes(["openid"])
                    .subject("s".repeat(200))
                    .refresh_token("rt")
                    .access_token(StoredAccessToken::bearer(
                        "at",
                        4_000_000_000,
                        4_000_003_600,
                        ["openid"],
                    ))
                    .generation(1)
                    .build(),
                )
                .unwrap();
        }
    }
    let broker = BrokerProcess::start(BrokerOptions {
        state_dir: Some(state),
        ..BrokerOptions::default()
    });
    // One raw `Status` is one page, with a pointer to the next.
    let first = broker.client().await.status(1).await;
    assert!(first.profiles.len() < 400 && first.next_after.is_some());
    let status = status_json(&broker).await;
    let names: Vec<&str> = status["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 400);
    assert!(
        names.windows(2).all(|w| w[0] < w[1]),
        "sorted, no duplicates"
    );
    let human = broker_ctl(broker.socket(), &["status"]).await;
    assert!(human.status.success());
    assert_eq!(
        String::from_utf8_lossy(&human.stdout)
            .lines()
            .filter(|l| l.contains("-pppp"))
            .count(),
        400
    );
}

/// Defect 5, the other half: fields past their caps are refused at import.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_past_the_length_caps_are_refused() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let broker = BrokerProcess::start(BrokerOptions::default());
    let client = connect(broker.socket()).await;
    let request = |client_id: String, scopes: Vec<String>| ImportRequest {
        profile: PROFILE.into(),
        issuer: idp.issuer(),
        client_id,
        credential: ClientCredential::None,
        client_auth: None,
        scopes,
        endpoints: Default::default(),
        token_response: Secret::new(idp.mint().to_string()),
    };
    for bad in [
        request("c".repeat(257), vec![]),
        request("cli".into(), vec!["s".repeat(129)]),
        request("cli".into(), (0..33).map(|i| format!("s{i}")).collect()),
    ] {
        let err = client.import(bad).await.unwrap_err().to_string();
        assert!(err.contains("at most"), "{err}");
    }
    assert!(client.status().await.unwrap().profiles.is_empty());
}

/// Defect 6: a token outside RFC 6750 b64token is garbage (import refused,
/// refresh transient), so `broker-ctl token` can never print a CR/LF; and an
/// ID token `sub` with ESC/BEL never reaches the terminal raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_with_control_characters_are_refused_and_claims_are_escaped() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let broker = BrokerProcess::start(BrokerOptions::default());
    let client = connect(broker.socket()).await;

    let mut hostile = idp.mint();
    hostile["access_token"] = "AT\r\nX-Injected: 1".into();
    let err = client
        .import(ImportRequest {
            profile: "hostile".into(),
            issuer: idp.issuer(),
            client_id: idp.client_id().into(),
            credential: ClientCredential::None,
            client_auth: None,
            scopes: vec!["openid".into()],
            endpoints: Default::default(),
            token_response: Secret::new(hostile.to_string()),
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("b64token"), "{err}");

    // An ID token whose `sub` paints the terminal (read for display only).
    use base64::Engine as _;
    let enc = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let mut minted = idp.mint();
    minted["id_token"] = format!(
        "{}.{}.sig",
        enc(&json!({"alg": "RS256"})),
        enc(&json!({"sub": "eve\u{1b}]0;pwned\u{7}\u{1b}[2J"}))
    )
    .into();
    minted["expires_in"] = 0.into();
    import(&client, PROFILE, &idp.issuer(), idp.client_id(), &minted).await;
    let human = broker_ctl(broker.socket(), &["status"]).await;
    let human = String::from_utf8_lossy(&human.stdout).into_owned();
    assert!(human.contains("eve"), "{human}");
    assert!(!human.contains(['\u{1b}', '\u{7}']), "{human:?}");

    // The refresh answers an access token with CR/LF: garbage, transient.
    idp.push_failure(Failure::Raw {
        status: 200,
        body: json!({
            "access_token": "AT\r\nX-Injected: 1\u{1b}[2J",
            "token_type": "Bearer",
            "expires_in": 3600,
        })
        .to_string(),
    });
    let out = broker_ctl(broker.socket(), &["token"]).await;
    assert!(!out.status.success());
    assert_eq!(
        out.status.code(),
        Some(5),
        "IdP unavailable (garbage answer)"
    );
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("X-Injected"), "{stderr}");
    assert!(stderr.contains("b64token"), "{stderr}");
}

/// Defect 7: a connection that sends no `Hello` is closed after the handshake
/// deadline (1 s here) and counted in `status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_hello_is_closed_and_counted() {
    let broker = BrokerProcess::start(BrokerOptions {
        config_toml: "handshake_timeout_secs = 1\n".into(),
        ..BrokerOptions::default()
    });
    let mut silent = RawClient::connect_raw(broker.socket()).await;
    let mut half = RawClient::connect_raw(broker.socket()).await;
    // Half a Hello: the first two bytes of its length prefix.
    half.send_raw(&[0, 0]).await;
    silent.expect_closed(Duration::from_secs(30)).await;
    half.expect_closed(Duration::from_secs(30)).await;
    let status = status_json(&broker).await;
    assert_eq!(status["broker"]["handshake_timeouts"], 2, "{status}");
    // A client that greets in time is unaffected.
    broker.client().await.ping(1).await;
}

/// Defect 7, memory: 2000 connections each announce a 64 KiB frame and send
/// half of it, 64 MB in all, then close. Before the fix the freed buffers stayed
/// in the allocator's arenas and RSS stayed high; now it is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_sent_frames_costs_what_was_sent_and_is_given_back() {
    const FLOOD: usize = 2000;
    let broker = BrokerProcess::start(BrokerOptions::default());
    let mut admin = broker.client().await;
    admin.ping(1).await;
    let baseline = broker.rss_kib().expect("VmRSS");
    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        let mut c = RawClient::connect(broker.socket()).await;
        let mut half = (64u32 * 1024).to_be_bytes().to_vec();
        half.extend_from_slice(&[0u8; 32 * 1024]);
        c.send_raw(&half).await;
        flood.push(c);
    }
    // Every connection is served: a request behind them all is answered.
    admin.ping(2).await;
    let mut peak = 0;
    for _ in 0..20 {
        peak = peak.max(broker.rss_kib().unwrap());
        tokio::task::yield_now().await;
    }
    drop(flood);
    // Wait until the broker has closed them all.
    let deadline = Instant::now() + Duration::from_secs(60);
    while admin.status(3).await.broker.connections > 1 {
        assert!(Instant::now() < deadline, "connections were not closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let closed = broker.rss_kib().unwrap();
    // The memory comes back soon after the burst of closes (safety net: 30 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let rss = broker.rss_kib().unwrap();
        if rss.saturating_sub(baseline) < 16 * 1024 || Instant::now() > deadline {
            break rss;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "flood of {FLOOD} half-sent 64 KiB frames (32 KiB each sent): RSS {baseline} KiB before, \
         {peak} KiB peak, {closed} KiB when all had closed, {after} KiB after"
    );
    // What was sent (64 MB) is buffered, plus per-connection overhead.
    let sent_kib = (FLOOD * 32) as u64;
    assert!(
        peak - baseline < sent_kib * 2,
        "RSS grew by {} KiB for {sent_kib} KiB sent",
        peak - baseline
    );
    assert!(
        after.saturating_sub(baseline) < 16 * 1024,
        "RSS stayed {} KiB above the baseline after the flood closed",
        after - baseline
    );
}
