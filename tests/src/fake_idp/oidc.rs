//! The fake IdP's login side: the authorization code flow (with PKCE S256),
//! the device flow (approved at once), signed ID tokens, a JWKS with key
//! rotation, RFC 9207 `iss` on the redirect, and a hostile mode that forges
//! ID tokens the way the OpenID Foundation's Basic RP tests do.
//! TEST FIXTURE ONLY.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use openidconnect::core::{
    CoreHmacKey, CoreJsonWebKey, CoreJwsSigningAlgorithm, CoreRsaPrivateSigningKey,
};
use openidconnect::{
    AccessToken, AccessTokenHash, JsonWebKeyId, PkceCodeChallenge, PkceCodeVerifier,
    PrivateSigningKey,
};
use serde_json::{json, Value};

use super::keys::{RSA_K1, RSA_K2, RSA_K3};
use super::{
    json_reply, json_response, new_token, oauth_error, Grant, RefreshEntry, RefreshState, Reply,
    Shared, State,
};

/// The device code grant type (RFC 8628 §3.4).
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// The key the fake never publishes: hostile tokens are signed with it.
const OUTSIDER: &str = "k3";

/// How the fake makes the ID tokens it issues from now on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum IdTokenForgery {
    /// A correct token, signed RS256 by the current signing key, with `kid`.
    #[default]
    Honest,
    /// RS256 under the current key's `kid`, but signed by a key outside the JWKS
    /// (`rp-id_token-bad-sig-rs256`).
    BadSignatureRs256,
    /// HS256 keyed with the provider's public key (`rp-id_token-bad-sig-hs256`).
    Hs256WithPublicKey,
    /// `alg: none` and no signature (`rp-id_token-sig-none`).
    AlgNone,
    /// `iss` of another issuer (`rp-id_token-issuer-mismatch`).
    WrongIssuer,
    /// `iss` with a trailing slash added: the same issuer only to a sloppy comparison.
    IssuerWithTrailingSlash,
    /// `aud` of another client (`rp-id_token-aud`).
    WrongAudience,
    /// `aud` listing the client and another party, without `azp`.
    ExtraAudience,
    /// No `iat` (`rp-id_token-iat`).
    MissingIat,
    /// No `sub` (`rp-id_token-sub`).
    MissingSub,
    /// A `nonce` other than the one sent (`rp-nonce-invalid`).
    WrongNonce,
    /// No `nonce` although one was sent.
    MissingNonce,
    /// `exp` in the past.
    Expired,
    /// An `at_hash` of another access token.
    WrongAtHash,
    /// A correct token without the `kid` header
    /// (`rp-id_token-kid-absent-single-jwks`, `-multiple-jwks`).
    NoKid,
    /// A token without `kid`, signed by a key outside the JWKS.
    NoKidBadSignature,
    /// A `kid` the JWKS never lists, signed by a key outside it.
    UnknownKid(String),
    /// No `id_token` in the token response at all.
    Omitted,
}

/// What the redirect after `/authorize` says about the issuer (RFC 9207).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IssParameter {
    /// Not advertised, not sent.
    #[default]
    NotAdvertised,
    /// Advertised, and the redirect carries the right `iss`.
    Correct,
    /// Advertised, and the redirect carries another issuer.
    Wrong,
    /// Advertised, and the redirect carries no `iss`.
    Missing,
}

/// The login-side state of one fake IdP.
pub(super) struct OidcState {
    keys: HashMap<&'static str, Arc<CoreRsaPrivateSigningKey>>,
    /// Keys listed at `/jwks`, in order.
    published: Vec<&'static str>,
    /// The key that signs honest tokens.
    signing: &'static str,
    forgery: IdTokenForgery,
    iss_parameter: IssParameter,
    discovery_issuer: Option<String>,
    jwks_cache_control: String,
    jwks_calls: u64,
    codes: HashMap<String, PendingCode>,
    device_codes: HashMap<String, String>,
    /// Every token, code and ID token handed out, for "never printed" checks.
    issued: Vec<String>,
    omit_refresh_token: bool,
    rotate_on_device_authorization: bool,
}

struct PendingCode {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    nonce: Option<String>,
    scope: String,
}

impl Default for OidcState {
    fn default() -> Self {
        let key = |kid: &'static str, pem: &str| {
            let key = CoreRsaPrivateSigningKey::from_pem(pem, Some(JsonWebKeyId::new(kid.into())))
                .expect("the fixture keys are valid PKCS#1 PEM");
            (kid, Arc::new(key))
        };
        OidcState {
            keys: [key("k1", RSA_K1), key("k2", RSA_K2), key(OUTSIDER, RSA_K3)].into(),
            published: vec!["k1"],
            signing: "k1",
            forgery: IdTokenForgery::Honest,
            iss_parameter: IssParameter::NotAdvertised,
            discovery_issuer: None,
            jwks_cache_control: "public, max-age=3600".into(),
            jwks_calls: 0,
            codes: HashMap::new(),
            device_codes: HashMap::new(),
            issued: Vec::new(),
            omit_refresh_token: false,
            rotate_on_device_authorization: false,
        }
    }
}

impl super::FakeIdp {
    /// Makes the ID tokens issued from now on as `forgery` says (the hostile mode).
    pub fn set_id_token_forgery(&self, forgery: IdTokenForgery) {
        self.shared.lock().oidc.forgery = forgery;
    }

    /// Sets what the redirect says about the issuer (RFC 9207).
    pub fn set_iss_parameter(&self, iss: IssParameter) {
        self.shared.lock().oidc.iss_parameter = iss;
    }

    /// Makes the discovery documents name `issuer` instead of the real one
    /// (`rp-discovery-issuer-not-matching-config`).
    pub fn set_discovery_issuer(&self, issuer: &str) {
        self.shared.lock().oidc.discovery_issuer = Some(issuer.to_owned());
    }

    /// Publishes `published` (of `k1`, `k2`) at `/jwks` and signs with `signing`.
    pub fn set_signing_keys(&self, published: &[&'static str], signing: &'static str) {
        let mut st = self.shared.lock();
        assert!(
            published.iter().all(|k| *k == "k1" || *k == "k2"),
            "only k1 and k2 can be published"
        );
        st.oidc.published = published.to_vec();
        st.oidc.signing = signing;
    }

    /// Rotates the signing key: from now on only `k2` is published and signs
    /// (`rp-key-rotation-op-sign-key`).
    pub fn rotate_signing_key(&self) {
        self.set_signing_keys(&["k2"], "k2");
    }

    /// Rotates the signing key (as [`FakeIdp::rotate_signing_key`]) when the next
    /// device authorization request arrives: after a login fetched the keys,
    /// before the token it polls for is made.
    ///
    /// [`FakeIdp::rotate_signing_key`]: super::FakeIdp::rotate_signing_key
    pub fn rotate_signing_key_on_device_authorization(&self) {
        self.shared.lock().oidc.rotate_on_device_authorization = true;
    }

    /// The `Cache-Control` header of `/jwks` (default `public, max-age=3600`).
    pub fn set_jwks_cache_control(&self, value: &str) {
        self.shared.lock().oidc.jwks_cache_control = value.to_owned();
    }

    /// Token responses of the login grants leave out `refresh_token`.
    pub fn set_omit_refresh_token(&self, omit: bool) {
        self.shared.lock().oidc.omit_refresh_token = omit;
    }

    /// Requests served at `/jwks`.
    pub fn jwks_calls(&self) -> u64 {
        self.shared.lock().oidc.jwks_calls
    }

    /// Every access token, refresh token, ID token and authorization code the
    /// login grants handed out so far.
    pub fn issued_secrets(&self) -> Vec<String> {
        self.shared.lock().oidc.issued.clone()
    }

    /// The `jwks_uri`.
    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.shared.issuer)
    }
}

/// Adds the login-side fields to a discovery document.
pub(super) fn extend_metadata(shared: &Shared, doc: &mut Value) {
    let st = shared.lock();
    let issuer = &shared.issuer;
    doc["device_authorization_endpoint"] = json!(format!("{issuer}/device_authorization"));
    doc["grant_types_supported"] =
        json!(["authorization_code", "refresh_token", DEVICE_CODE_GRANT]);
    if st.oidc.iss_parameter != IssParameter::NotAdvertised {
        doc["authorization_response_iss_parameter_supported"] = json!(true);
    }
    if let Some(other) = &st.oidc.discovery_issuer {
        doc["issuer"] = json!(other);
    }
}

/// `GET /jwks`: the published keys, with the configured cache header.
pub(super) fn jwks(shared: &Shared) -> Reply {
    let mut st = shared.lock();
    st.discovery_calls += 1;
    st.oidc.jwks_calls += 1;
    let keys: Vec<CoreJsonWebKey> = st
        .oidc
        .published
        .iter()
        .map(|kid| st.oidc.keys[kid].as_verification_key())
        .collect();
    let mut resp = json_response(StatusCode::OK, json!({ "keys": keys }));
    if let Ok(v) = header::HeaderValue::from_str(&st.oidc.jwks_cache_control) {
        resp.headers_mut().insert(header::CACHE_CONTROL, v);
    }
    Reply::Http(resp)
}

/// `GET /authorize`: approves at once and redirects to the client with a code.
pub(super) fn authorize(shared: &Shared, req: &Request<Incoming>) -> Reply {
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let get = |k: &str| query.get(k).cloned().unwrap_or_default();
    let redirect_uri = get("redirect_uri");
    let loopback = url::Url::parse(&redirect_uri)
        .is_ok_and(|u| u.scheme() == "http" && u.host_str() == Some("127.0.0.1"));
    if get("client_id") != shared.config.client_id || !loopback {
        return json_reply(
            StatusCode::BAD_REQUEST,
            json!({ "error": "invalid_request" }),
        );
    }
    if get("response_type") != "code" || get("code_challenge_method") != "S256" {
        return json_reply(
            StatusCode::BAD_REQUEST,
            json!({ "error": "invalid_request" }),
        );
    }
    let code = new_token("code");
    let mut st = shared.lock();
    st.oidc.issued.push(code.clone());
    st.oidc.codes.insert(
        code.clone(),
        PendingCode {
            client_id: get("client_id"),
            redirect_uri: redirect_uri.clone(),
            challenge: get("code_challenge"),
            nonce: query.get("nonce").cloned(),
            scope: get("scope"),
        },
    );
    let mut location = url::Url::parse(&redirect_uri).expect("checked above");
    {
        let mut pairs = location.query_pairs_mut();
        pairs.append_pair("code", &code);
        pairs.append_pair("state", &get("state"));
        match st.oidc.iss_parameter {
            IssParameter::Correct => {
                pairs.append_pair("iss", &shared.issuer);
            }
            IssParameter::Wrong => {
                pairs.append_pair("iss", "https://attacker.example");
            }
            IssParameter::NotAdvertised | IssParameter::Missing => {}
        }
    }
    Reply::Http(
        Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, location.as_str())
            .body(Full::new(Bytes::new()))
            .expect("static response parts are valid"),
    )
}

/// `POST /device_authorization`: a device code that is approved at once.
pub(super) async fn device_authorization(shared: &Shared, req: Request<Incoming>) -> Reply {
    let (parts, form) = super::read_form(req).await;
    let Some(form) = form else {
        return json_reply(
            StatusCode::BAD_REQUEST,
            json!({ "error": "invalid_request" }),
        );
    };
    if !super::client_authenticated(&shared.config, &parts, &form) {
        return Reply::Http(oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"));
    }
    let device_code = new_token("device");
    let mut st = shared.lock();
    if std::mem::take(&mut st.oidc.rotate_on_device_authorization) {
        st.oidc.published = vec!["k2"];
        st.oidc.signing = "k2";
    }
    st.oidc.issued.push(device_code.clone());
    st.oidc.device_codes.insert(
        device_code.clone(),
        form.get("scope").cloned().unwrap_or_default(),
    );
    let issuer = &shared.issuer;
    json_reply(
        StatusCode::OK,
        json!({
            "device_code": device_code,
            "user_code": "FAKE-CODE",
            "verification_uri": format!("{issuer}/device"),
            "verification_uri_complete": format!("{issuer}/device?user_code=FAKE-CODE"),
            "expires_in": 600,
            // Approved already: poll at once.
            "interval": 0,
        }),
    )
}

/// The `authorization_code` grant: checks the code, redirect URI and PKCE
/// verifier, then answers like a login (with an ID token).
pub(super) fn code_grant(
    shared: &Shared,
    st: &mut State,
    form: &HashMap<String, String>,
) -> Response<Full<Bytes>> {
    let code = form.get("code").cloned().unwrap_or_default();
    // One use only, whatever the outcome.
    let Some(pending) = st.oidc.codes.remove(&code) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    };
    let verifier = PkceCodeVerifier::new(form.get("code_verifier").cloned().unwrap_or_default());
    let challenge = PkceCodeChallenge::from_code_verifier_sha256(&verifier);
    if form.get("redirect_uri") != Some(&pending.redirect_uri)
        || form
            .get("client_id")
            .is_some_and(|id| *id != pending.client_id)
        || challenge.as_str() != pending.challenge
    {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    }
    login_response(shared, st, &pending.scope, pending.nonce.as_deref())
}

/// The device code grant: the code was approved at creation.
pub(super) fn device_grant(
    shared: &Shared,
    st: &mut State,
    form: &HashMap<String, String>,
) -> Response<Full<Bytes>> {
    let device_code = form.get("device_code").cloned().unwrap_or_default();
    let Some(scope) = st.oidc.device_codes.remove(&device_code) else {
        return oauth_error(StatusCode::BAD_REQUEST, "expired_token");
    };
    login_response(shared, st, &scope, None)
}

/// A new grant's token response, with an ID token when `openid` was asked for.
fn login_response(
    shared: &Shared,
    st: &mut State,
    scope: &str,
    nonce: Option<&str>,
) -> Response<Full<Bytes>> {
    let grant = st.next_grant;
    st.next_grant += 1;
    let refresh = new_token("rt");
    st.grants.insert(
        grant,
        Grant {
            alive: true,
            current_refresh: refresh.clone(),
        },
    );
    st.refresh_tokens.insert(
        refresh.clone(),
        RefreshEntry {
            grant,
            state: RefreshState::Current,
        },
    );
    let (access, ttl) = st.issue_access_token(grant, false);
    st.oidc.issued.push(access.clone());
    let mut body = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": ttl,
        "scope": scope,
    });
    if !st.oidc.omit_refresh_token {
        st.oidc.issued.push(refresh.clone());
        body["refresh_token"] = json!(refresh);
    }
    if scope.split(' ').any(|s| s == "openid") && st.oidc.forgery != IdTokenForgery::Omitted {
        let id_token = id_token(shared, &st.oidc, &access, nonce);
        st.oidc.issued.push(id_token.clone());
        body["id_token"] = json!(id_token);
    }
    json_response(StatusCode::OK, body)
}

/// Makes an ID token for `access_token` as the current forgery says.
fn id_token(shared: &Shared, oidc: &OidcState, access_token: &str, nonce: Option<&str>) -> String {
    use IdTokenForgery as F;
    let rs256 = CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let signing = &oidc.keys[oidc.signing];
    let outsider = &oidc.keys[OUTSIDER];
    let at_hash = |token: &str| {
        AccessTokenHash::from_token(
            &AccessToken::new(token.to_owned()),
            &rs256,
            &signing.as_verification_key(),
        )
        .map(|hash| (*hash).clone())
        .expect("RS256 has a hash")
    };
    let issuer = &shared.issuer;
    let client_id = &shared.config.client_id;
    let mut claims = json!({
        "iss": issuer,
        "sub": shared.config.subject,
        "aud": client_id,
        "exp": now + 300,
        "iat": now,
        "at_hash": at_hash(access_token),
    });
    if let Some(nonce) = nonce {
        claims["nonce"] = json!(nonce);
    }
    let mut header = json!({ "alg": "RS256", "typ": "JWT", "kid": oidc.signing });
    let mut key: &CoreRsaPrivateSigningKey = signing;
    match &oidc.forgery {
        F::Honest => {}
        F::BadSignatureRs256 => key = outsider,
        F::Hs256WithPublicKey | F::AlgNone => {}
        F::WrongIssuer => claims["iss"] = json!("https://attacker.example"),
        F::IssuerWithTrailingSlash => claims["iss"] = json!(format!("{issuer}/")),
        F::WrongAudience => claims["aud"] = json!("someone-else"),
        F::ExtraAudience => claims["aud"] = json!([client_id, "someone-else"]),
        F::MissingIat => remove(&mut claims, "iat"),
        F::MissingSub => remove(&mut claims, "sub"),
        F::WrongNonce => claims["nonce"] = json!("not-the-nonce-that-was-sent"),
        F::MissingNonce => remove(&mut claims, "nonce"),
        F::Expired => {
            claims["exp"] = json!(now - 60);
            claims["iat"] = json!(now - 360);
        }
        F::WrongAtHash => claims["at_hash"] = json!(at_hash("some-other-access-token")),
        F::NoKid => remove(&mut header, "kid"),
        F::NoKidBadSignature => {
            remove(&mut header, "kid");
            key = outsider;
        }
        F::UnknownKid(kid) => {
            header["kid"] = json!(kid);
            key = outsider;
        }
        F::Omitted => unreachable!("no ID token is made"),
    }
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    match oidc.forgery {
        F::AlgNone => {
            let header = json!({ "alg": "none", "typ": "JWT" });
            format!("{}.{}.", b64(&header), b64(&claims))
        }
        F::Hs256WithPublicKey => {
            header["alg"] = json!("HS256");
            let public = serde_json::to_vec(&signing.as_verification_key()).expect("a JWK");
            let input = format!("{}.{}", b64(&header), b64(&claims));
            let mac = CoreHmacKey::new(public)
                .sign(&CoreJwsSigningAlgorithm::HmacSha256, input.as_bytes())
                .expect("HS256 signs");
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac))
        }
        _ => {
            let input = format!("{}.{}", b64(&header), b64(&claims));
            let signature = key.sign(&rs256, input.as_bytes()).expect("RS256 signs");
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
        }
    }
}

fn remove(object: &mut Value, key: &str) {
    if let Some(map) = object.as_object_mut() {
        map.remove(key);
    }
}
