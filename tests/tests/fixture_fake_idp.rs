//! Tests of the fake IdP fixture itself: Hydra refresh semantics, scripted
//! failures, counters and discovery.

use std::time::Duration;

use kontext_broker_tests::fake_idp::{Discovery, Failure, FakeIdp, FakeIdpConfig};
use serde_json::Value;

/// Safety net for waits on real events; never reached when things work.
const SAFETY: Duration = Duration::from_secs(20);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn refresh_raw(idp: &FakeIdp, rt: &str) -> reqwest::Result<reqwest::Response> {
    client()
        .post(format!("{}/token", idp.issuer()))
        .form(&[
            ("grant_type", "refresh_token"),
            ("client_id", idp.client_id()),
            ("refresh_token", rt),
        ])
        .send()
        .await
}

/// Refreshes and returns (status, JSON body).
async fn refresh(idp: &FakeIdp, rt: &str) -> (u16, Value) {
    let resp = refresh_raw(idp, rt).await.expect("token endpoint answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON body"))
}

/// A refresh of `rt` running in its own task (for overlapping calls).
fn spawn_refresh(idp: &FakeIdp, rt: &str) -> tokio::task::JoinHandle<reqwest::Response> {
    let url = format!("{}/token", idp.issuer());
    let rt = rt.to_owned();
    tokio::spawn(async move {
        client()
            .post(url)
            .form(&[
                ("grant_type", "refresh_token"),
                ("client_id", "kontext-cli"),
                ("refresh_token", rt.as_str()),
            ])
            .send()
            .await
            .unwrap()
    })
}

fn rt_of(v: &Value) -> String {
    v["refresh_token"]
        .as_str()
        .expect("refresh_token")
        .to_owned()
}

fn at_of(v: &Value) -> String {
    v["access_token"].as_str().expect("access_token").to_owned()
}

async fn userinfo(idp: &FakeIdp, at: &str) -> u16 {
    client()
        .get(format!("{}/userinfo", idp.issuer()))
        .bearer_auth(at)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn mint_returns_a_standard_token_response() {
    let idp = FakeIdp::start(FakeIdpConfig {
        access_token_ttl_secs: 42,
        ..Default::default()
    })
    .await;
    let grant = idp.mint();
    assert_eq!(grant["token_type"], "Bearer");
    assert_eq!(grant["expires_in"], 42);
    assert_eq!(grant["scope"], "openid offline_access");
    assert!(idp.access_token_valid(&at_of(&grant)));
    assert_eq!(userinfo(&idp, &at_of(&grant)).await, 200);
    assert_eq!(userinfo(&idp, "nonsense").await, 401);
    assert_eq!(idp.userinfo_calls(), 2);
    assert_eq!(idp.token_calls(), 0, "minting is not a token call");
}

#[tokio::test]
async fn refresh_rotates_and_kills_previous_access_tokens() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let grant = idp.mint();
    let (rt0, at0) = (rt_of(&grant), at_of(&grant));

    let (status, body) = refresh(&idp, &rt0).await;
    assert_eq!(status, 200, "{body}");
    let (rt1, at1) = (rt_of(&body), at_of(&body));
    assert_ne!(rt1, rt0, "refresh token rotated");
    assert_ne!(at1, at0);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert!(
        !idp.access_token_valid(&at0),
        "previous access token deleted"
    );
    assert!(idp.access_token_valid(&at1));
    assert_eq!(idp.current_refresh_token(&rt0), Some(rt1.clone()));

    let (status, body) = refresh(&idp, &rt1).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(idp.token_calls(), 2);
    assert_eq!(idp.refresh_successes(), 2);
}

#[tokio::test]
async fn reusing_a_rotated_token_revokes_the_whole_grant() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let rt0 = rt_of(&idp.mint());
    let (_, body) = refresh(&idp, &rt0).await;
    let (rt1, at1) = (rt_of(&body), at_of(&body));

    let (status, body) = refresh(&idp, &rt0).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(!idp.grant_alive(&rt1));
    assert!(
        !idp.access_token_valid(&at1),
        "grant's access token died too"
    );

    let (status, body) = refresh(&idp, &rt1).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "the newest refresh token died with the grant"
    );
    assert_eq!(idp.token_calls(), 3);
    assert_eq!(idp.refresh_successes(), 1);
}

#[tokio::test]
async fn unknown_token_is_invalid_grant_and_other_grants_survive() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let keep = rt_of(&idp.mint());
    let (status, body) = refresh(&idp, "fake_rt_unknown").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(idp.grant_alive(&keep));
    assert_eq!(refresh(&idp, &keep).await.0, 200);
}

#[tokio::test]
async fn concurrent_refresh_of_one_token_gets_invalid_request() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let rt0 = rt_of(&idp.mint());
    let hold = idp.hold_token_calls();

    let first = spawn_refresh(&idp, &rt0);
    tokio::time::timeout(SAFETY, idp.wait_for_token_calls(1))
        .await
        .expect("first refresh arrives");
    let second = spawn_refresh(&idp, &rt0);
    tokio::time::timeout(SAFETY, idp.wait_for_token_calls(2))
        .await
        .expect("second refresh arrives");
    drop(hold);

    let first = first.await.unwrap();
    let second = second.await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(second.status(), 400);
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
    // Unlike a reuse, the concurrent attempt does not revoke the grant.
    let new_rt = rt_of(&first.json::<Value>().await.unwrap());
    assert!(idp.grant_alive(&new_rt));
    assert_eq!(refresh(&idp, &new_rt).await.0, 200);
}

#[tokio::test]
async fn latency_keeps_a_token_in_flight() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let rt0 = rt_of(&idp.mint());
    // Long enough that the second call surely arrives while the first waits; the
    // first one's answer is awaited, not timed.
    idp.set_latency(Duration::from_secs(2));
    let (a, b) = tokio::join!(refresh(&idp, &rt0), async {
        tokio::time::timeout(SAFETY, idp.wait_for_token_calls(1))
            .await
            .unwrap();
        refresh(&idp, &rt0).await
    });
    assert_eq!(a.0, 200);
    assert_eq!((b.0, b.1["error"].as_str()), (400, Some("invalid_request")));
    assert_eq!(idp.in_flight_refreshes(), 0);
}

#[tokio::test]
async fn scripted_failures_answer_in_order_without_touching_the_grant() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let rt = rt_of(&idp.mint());
    let cases: Vec<(Failure, u16, &str)> = vec![
        (Failure::Status500, 500, "server_error"),
        (
            Failure::TooManyRequests {
                retry_after_secs: 7,
            },
            429,
            "temporarily_unavailable",
        ),
        (Failure::InvalidGrant, 400, "invalid_grant"),
        (Failure::InvalidClient, 401, "invalid_client"),
        (Failure::InvalidRequest, 400, "invalid_request"),
        (
            Failure::TemporarilyUnavailable,
            503,
            "temporarily_unavailable",
        ),
    ];
    for (failure, _, _) in &cases {
        idp.push_failure(failure.clone());
    }
    assert_eq!(idp.pending_failures(), cases.len());
    for (failure, status, error) in &cases {
        let resp = refresh_raw(&idp, &rt).await.unwrap();
        assert_eq!(resp.status().as_u16(), *status, "{failure:?}");
        if let Failure::TooManyRequests { .. } = failure {
            assert_eq!(resp.headers()["retry-after"], "7");
        }
        if let Failure::InvalidClient = failure {
            assert!(resp.headers().contains_key("www-authenticate"));
        }
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], *error, "{failure:?}");
    }
    assert_eq!(idp.pending_failures(), 0);
    assert!(idp.grant_alive(&rt));
    assert_eq!(refresh(&idp, &rt).await.0, 200, "the token still works");
    assert_eq!(idp.token_calls(), cases.len() as u64 + 1);
    assert_eq!(idp.refresh_successes(), 1);
}

#[tokio::test]
async fn malformed_json_is_a_200_with_a_broken_body() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let rt = rt_of(&idp.mint());
    idp.push_failure(Failure::MalformedJson);
    let resp = refresh_raw(&idp, &rt).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.json::<Value>().await.is_err());
    assert_eq!(refresh(&idp, &rt).await.0, 200, "the grant was not touched");
}

#[tokio::test]
async fn missing_expires_in_still_rotates() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let rt0 = rt_of(&idp.mint());
    idp.push_failure(Failure::MissingExpiresIn);
    let (status, body) = refresh(&idp, &rt0).await;
    assert_eq!(status, 200);
    assert!(body.get("expires_in").is_none(), "{body}");
    assert!(body.get("access_token").is_some());
    let rt1 = rt_of(&body);
    assert_ne!(rt1, rt0);
    assert_eq!(idp.current_refresh_token(&rt0), Some(rt1));
}

#[tokio::test]
async fn close_socket_answers_nothing() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let rt = rt_of(&idp.mint());
    idp.push_failure(Failure::CloseSocket);
    let err = refresh_raw(&idp, &rt).await.expect_err("no response");
    assert!(!err.is_status(), "{err:?}");
    assert_eq!(idp.token_calls(), 1);
    assert_eq!(refresh(&idp, &rt).await.0, 200, "the grant was not touched");
}

#[tokio::test]
async fn lose_response_rotates_then_closes() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let rt0 = rt_of(&idp.mint());
    idp.push_failure(Failure::LoseResponse);
    refresh_raw(&idp, &rt0).await.expect_err("no response");
    let rt1 = idp.current_refresh_token(&rt0).expect("grant alive");
    assert_ne!(rt1, rt0, "rotated although the client never saw it");
    // The client retries with the token it has: reuse, the grant dies.
    let (status, body) = refresh(&idp, &rt0).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(!idp.grant_alive(&rt1));
}

#[tokio::test]
async fn hang_outlasts_a_client_timeout() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let rt = rt_of(&idp.mint());
    idp.push_failure(Failure::Hang(Duration::from_secs(30)));
    let err = client()
        .post(format!("{}/token", idp.issuer()))
        .timeout(Duration::from_millis(300))
        .form(&[
            ("grant_type", "refresh_token"),
            ("client_id", "kontext-cli"),
            ("refresh_token", rt.as_str()),
        ])
        .send()
        .await
        .expect_err("hangs");
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(idp.token_calls(), 1);
    assert_eq!(refresh(&idp, &rt).await.0, 200, "the grant was not touched");
}

#[tokio::test]
async fn revoke_all_and_revocation_endpoint_kill_grants() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let a = idp.mint();
    let b = idp.mint();
    assert_eq!(idp.live_grants(), 2);

    let resp = client()
        .post(format!("{}/revoke", idp.issuer()))
        .form(&[
            ("token", rt_of(&a).as_str()),
            ("token_type_hint", "refresh_token"),
            ("client_id", "kontext-cli"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(idp.revocation_calls(), 1);
    assert!(!idp.access_token_valid(&at_of(&a)));
    assert_eq!(refresh(&idp, &rt_of(&a)).await.1["error"], "invalid_grant");
    assert!(idp.grant_alive(&rt_of(&b)));

    idp.revoke_all();
    assert_eq!(idp.live_grants(), 0);
    assert_eq!(userinfo(&idp, &at_of(&b)).await, 401);
    assert_eq!(refresh(&idp, &rt_of(&b)).await.1["error"], "invalid_grant");
}

#[tokio::test]
async fn expired_access_tokens_are_rejected() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    idp.set_ttl(0);
    let grant = idp.mint();
    assert_eq!(grant["expires_in"], 0);
    assert!(!idp.access_token_valid(&at_of(&grant)));
    assert_eq!(userinfo(&idp, &at_of(&grant)).await, 401);
    idp.set_ttl(60);
    let (_, body) = refresh(&idp, &rt_of(&grant)).await;
    assert_eq!(body["expires_in"], 60);
    assert!(idp.access_token_valid(&at_of(&body)));
}

#[tokio::test]
async fn without_rotation_the_refresh_token_stays() {
    let idp = FakeIdp::start(FakeIdpConfig {
        rotate_refresh_tokens: false,
        ..Default::default()
    })
    .await;
    let rt = rt_of(&idp.mint());
    for _ in 0..2 {
        let (status, body) = refresh(&idp, &rt).await;
        assert_eq!(status, 200);
        assert!(body.get("refresh_token").is_none(), "{body}");
    }
    assert_eq!(idp.current_refresh_token(&rt), Some(rt));
}

#[tokio::test]
async fn confidential_client_needs_basic_auth() {
    let idp = FakeIdp::start(FakeIdpConfig {
        client_id: "conf".into(),
        require_client_secret: Some("s3cret+/=".into()),
        ..Default::default()
    })
    .await;
    let rt = rt_of(&idp.mint());
    let form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", rt.as_str()),
    ];
    let url = format!("{}/token", idp.issuer());

    let resp = client().post(&url).form(&form).send().await.unwrap();
    assert_eq!(resp.status(), 401, "no credentials");
    let resp = client()
        .post(&url)
        .basic_auth("conf", Some("wrong"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "wrong secret");
    // RFC 6749 §2.3.1: credentials are form-urlencoded before base64.
    let resp = client()
        .post(&url)
        .basic_auth("conf", Some("s3cret%2B%2F%3D"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(idp.token_calls(), 3, "failed calls count too");
}

#[tokio::test]
async fn public_client_must_send_its_client_id() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let rt = rt_of(&idp.mint());
    let resp = client()
        .post(format!("{}/token", idp.issuer()))
        .form(&[
            ("grant_type", "refresh_token"),
            ("client_id", "someone-else"),
            ("refresh_token", rt.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(idp.grant_alive(&rt));
}

#[tokio::test]
async fn discovery_documents_follow_the_config() {
    for (discovery, oidc, rfc8414) in [
        (Discovery::Oidc, 200, 404),
        (Discovery::Rfc8414Only, 404, 200),
        (Discovery::Both, 200, 200),
    ] {
        let idp = FakeIdp::start(FakeIdpConfig {
            discovery,
            ..Default::default()
        })
        .await;
        let get = |path: &'static str| {
            let url = format!("{}{path}", idp.issuer());
            async move { client().get(url).send().await.unwrap() }
        };
        let o = get("/.well-known/openid-configuration").await;
        let r = get("/.well-known/oauth-authorization-server").await;
        assert_eq!(
            (o.status().as_u16(), r.status().as_u16()),
            (oidc, rfc8414),
            "{discovery:?}"
        );
        let doc: Value = if oidc == 200 { o } else { r }.json().await.unwrap();
        assert_eq!(doc["issuer"], idp.issuer());
        assert_eq!(doc["token_endpoint"], format!("{}/token", idp.issuer()));
        assert_eq!(
            doc["revocation_endpoint"],
            format!("{}/revoke", idp.issuer())
        );
    }
}

#[tokio::test]
async fn openidconnect_accepts_the_discovery_document() {
    use openidconnect::core::CoreProviderMetadata;
    use openidconnect::IssuerUrl;

    let idp = FakeIdp::start(FakeIdpConfig {
        discovery: Discovery::Oidc,
        ..Default::default()
    })
    .await;
    let http = openidconnect::reqwest::Client::builder()
        .no_proxy()
        .redirect(openidconnect::reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let meta = CoreProviderMetadata::discover_async(IssuerUrl::new(idp.issuer()).unwrap(), &http)
        .await
        .expect("strict discovery parses");
    assert_eq!(
        meta.token_endpoint().map(|u| u.url().as_str().to_owned()),
        Some(format!("{}/token", idp.issuer()))
    );
    assert!(idp.discovery_calls() >= 2, "document and JWKS fetched");
}

#[tokio::test]
async fn several_instances_are_independent() {
    let a = FakeIdp::start(FakeIdpConfig::default()).await;
    let b = FakeIdp::start(FakeIdpConfig::default()).await;
    assert_ne!(a.issuer(), b.issuer());
    let rt = rt_of(&a.mint());
    assert_eq!(refresh(&b, &rt).await.1["error"], "invalid_grant");
    assert_eq!(refresh(&a, &rt).await.0, 200);
    assert_eq!((a.token_calls(), b.token_calls()), (1, 1));
}

#[tokio::test]
async fn dropping_the_fake_stops_its_server() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let issuer = idp.issuer();
    drop(idp);
    // The accept loop is aborted; the listener closes once the task is gone.
    let closed = tokio::time::timeout(SAFETY, async {
        loop {
            match client().get(format!("{issuer}/jwks")).send().await {
                Err(e) if e.is_connect() => return,
                _ => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "server still answers after drop");
}

#[tokio::test]
async fn an_abandoned_refresh_leaves_the_token_usable() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let rt = rt_of(&idp.mint());
    let hold = idp.hold_token_calls();
    let err = client()
        .post(format!("{}/token", idp.issuer()))
        .timeout(Duration::from_millis(300))
        .form(&[
            ("grant_type", "refresh_token"),
            ("client_id", "kontext-cli"),
            ("refresh_token", rt.as_str()),
        ])
        .send()
        .await
        .expect_err("held past the client's timeout");
    assert!(err.is_timeout(), "{err:?}");
    // The server notices the disconnect and drops the held call.
    tokio::time::timeout(SAFETY, async {
        while idp.in_flight_refreshes() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("abandoned call released its token");
    drop(hold);
    let (status, body) = refresh(&idp, &rt).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        idp.refresh_successes(),
        1,
        "the abandoned call never rotated"
    );
}
