//! ID token validation of the login (contract §6): real tokens signed by
//! `oidc-provider`, checked against the right and the wrong expectations, and
//! tampered copies. Needs `node` and `npm ci --prefix tests/idp`.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use kontext_broker::clock::SystemClock;
use kontext_broker::idp::{discover, Http};
use kontext_broker_ctl::login::{
    verify_id_token_with_keys as verify_id_token, IdTokenCheck, IdTokenError, Identity, JwksCache,
};
use kontext_broker_tests::html_form::complete_login;
use kontext_broker_tests::oidc_provider::{http_client, OidcProvider, PUBLIC_CLIENT_ID};
use openidconnect::core::CoreJsonWebKeySet;
use openidconnect::PkceCodeChallenge;
use serde_json::Value;
use url::Url;

fn http() -> Http {
    Http::new(Duration::from_secs(5), Duration::from_secs(15), &[]).unwrap()
}

async fn jwks(idp: &OidcProvider) -> CoreJsonWebKeySet {
    let endpoints = discover(&http(), idp.issuer()).await.unwrap();
    let cache = JwksCache::new(
        http(),
        &endpoints.jwks_uri.unwrap(),
        std::sync::Arc::new(SystemClock),
    )
    .unwrap();
    let keys = cache.current().await.unwrap();
    (*keys.set).clone()
}

/// An ID token carrying `nonce`, from a hand-run code flow (PKCE, port 8765
/// in the redirect: the callback itself is never requested).
async fn id_token_with_nonce(idp: &OidcProvider, nonce: &str) -> String {
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let redirect = "http://127.0.0.1:8765/callback";
    let mut auth = Url::parse(&format!("{}/auth", idp.issuer())).unwrap();
    auth.query_pairs_mut()
        .append_pair("client_id", PUBLIC_CLIENT_ID)
        .append_pair("response_type", "code")
        .append_pair("scope", "openid")
        .append_pair("redirect_uri", redirect)
        .append_pair("state", "s")
        .append_pair("nonce", nonce)
        .append_pair("code_challenge", challenge.as_str())
        .append_pair("code_challenge_method", "S256");
    let callback = complete_login(auth.as_str()).await.unwrap();
    let code = callback
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .expect("code");
    let body: Value = http_client()
        .post(idp.token_endpoint())
        .form(&[
            ("grant_type", "authorization_code"),
            ("client_id", PUBLIC_CLIENT_ID),
            ("code", &code),
            ("redirect_uri", redirect),
            ("code_verifier", verifier.secret()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["id_token"].as_str().expect("id_token").to_owned()
}

fn check<'a>(issuer: &'a str, client_id: &'a str, nonce: Option<&'a str>) -> IdTokenCheck<'a> {
    IdTokenCheck {
        issuer,
        client_id,
        client_secret: None,
        nonce,
        // These tokens carry no `at_hash`; it is checked in login_rp_conformance.
        access_token: "",
    }
}

fn assert_rejected(result: Result<Identity, IdTokenError>, needle: &str) {
    match result {
        Err(e) => {
            let detail = e.to_string();
            assert!(
                detail.to_ascii_lowercase().contains(needle),
                "expected `{needle}` in `{detail}`"
            )
        }
        other => panic!("expected an ID token error about {needle}, got {other:?}"),
    }
}

#[tokio::test]
async fn nonce_must_match_the_one_sent() {
    let idp = OidcProvider::start(60).await;
    let jwks = jwks(&idp).await;
    let token = id_token_with_nonce(&idp, "nonce-one").await;
    let ok = verify_id_token(
        &token,
        &jwks,
        &check(idp.issuer(), PUBLIC_CLIENT_ID, Some("nonce-one")),
    );
    assert_eq!(ok.unwrap().account(), "test-user");
    assert_rejected(
        verify_id_token(
            &token,
            &jwks,
            &check(idp.issuer(), PUBLIC_CLIENT_ID, Some("nonce-two")),
        ),
        "nonce",
    );
}

#[tokio::test]
async fn wrong_audience_issuer_or_missing_nonce_is_rejected() {
    let idp = OidcProvider::start(60).await;
    let jwks = jwks(&idp).await;
    let minted = idp
        .mint(PUBLIC_CLIENT_ID, &["openid", "offline_access"])
        .await;
    let token = minted["id_token"].as_str().unwrap();

    // Baseline: the token is fine for what it was issued to.
    assert!(verify_id_token(token, &jwks, &check(idp.issuer(), PUBLIC_CLIENT_ID, None)).is_ok());
    // The issuer is compared exactly (OIDC Core §3.1.3.7): a trailing slash is
    // another issuer. (Only the URL the user types is normalised, for discovery.)
    let slashed = format!("{}/", idp.issuer());
    assert_rejected(
        verify_id_token(token, &jwks, &check(&slashed, PUBLIC_CLIENT_ID, None)),
        "claim `iss`",
    );

    assert_rejected(
        verify_id_token(token, &jwks, &check(idp.issuer(), "another-client", None)),
        "claim `aud` does not contain this client (`another-client`)",
    );
    assert_rejected(
        verify_id_token(
            token,
            &jwks,
            &check("http://127.0.0.1:9", PUBLIC_CLIENT_ID, None),
        ),
        "not the discovered issuer `http://127.0.0.1:9`",
    );
    // The code flow always expects a nonce; this token has none.
    assert_rejected(
        verify_id_token(
            token,
            &jwks,
            &check(idp.issuer(), PUBLIC_CLIENT_ID, Some("n")),
        ),
        "nonce",
    );
}

#[tokio::test]
async fn tampered_or_unsigned_tokens_are_rejected() {
    let idp = OidcProvider::start(60).await;
    let jwks = jwks(&idp).await;
    let minted = idp
        .mint(PUBLIC_CLIENT_ID, &["openid", "offline_access"])
        .await;
    let token = minted["id_token"].as_str().unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let expect = check(idp.issuer(), PUBLIC_CLIENT_ID, None);

    // Same signature, different subject.
    claims["sub"] = "mallory".into();
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let altered = format!("{}.{payload}.{}", parts[0], parts[2]);
    assert_rejected(verify_id_token(&altered, &jwks, &expect), "signature");

    // `alg: none` with the altered claims.
    let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let unsigned = format!("{none_header}.{payload}.");
    assert_eq!(
        verify_id_token(&unsigned, &jwks, &expect),
        Err(IdTokenError::Unsigned)
    );

    // Keys of another issuer do not verify it.
    let empty = CoreJsonWebKeySet::new(Vec::new());
    assert!(matches!(
        verify_id_token(token, &empty, &expect),
        Err(IdTokenError::UnknownKey { .. })
    ));

    assert!(matches!(
        verify_id_token("not-a-jwt", &jwks, &expect),
        Err(IdTokenError::Malformed(_))
    ));
}
