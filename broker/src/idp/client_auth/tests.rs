use super::*;
use kontext_broker_protocol::ClientAuthMethod::{
    ClientSecretBasic as Basic, ClientSecretPost as Post, PrivateKeyJwt,
};

fn endpoints(token: Option<&[&str]>, revocation: Option<&[&str]>) -> Endpoints {
    let list = |l: Option<&[&str]>| l.map(|l| l.iter().map(|s| s.to_string()).collect());
    Endpoints {
        token: "https://idp.example/token".into(),
        token_auth_methods: list(token),
        revocation_auth_methods: list(revocation),
        ..Endpoints::default()
    }
}

fn secret_client(
    configured: Option<ClientAuthMethod>,
    remembered: Option<ClientAuthMethod>,
) -> ClientAuth {
    ClientAuth {
        client_id: "cli".into(),
        credential: ClientCredential::Secret(Secret::from("s3cret-marker")),
        configured,
        remembered,
    }
}

#[test]
fn secret_method_follows_setting_then_metadata_then_rfc8414_default() {
    use EndpointKind::*;
    let both = endpoints(Some(&["client_secret_post", "client_secret_basic"]), None);
    let post_only = endpoints(Some(&["none", "client_secret_post"]), None);
    let unlisted = endpoints(None, None);
    let c = secret_client(None, None);
    // Basic is preferred whatever the server's order; the other is the fallback.
    assert_eq!(c.attempts(&both, Token), [Basic, Post]);
    assert_eq!(c.attempts(&post_only, Token), [Post]);
    assert_eq!(c.attempts(&unlisted, Token), [Basic]);
    assert_eq!(
        c.attempts(&endpoints(Some(&["private_key_jwt"]), None), Token),
        [Basic]
    );
    // A remembered method goes first; the setting wins over everything.
    assert_eq!(
        secret_client(None, Some(Post)).attempts(&both, Token),
        [Post, Basic]
    );
    assert_eq!(
        secret_client(None, Some(Post)).attempts(&unlisted, Token),
        [Basic]
    );
    assert_eq!(
        secret_client(Some(Post), None).attempts(&unlisted, Token),
        [Post]
    );
    assert_eq!(
        secret_client(Some(Basic), Some(Post)).attempts(&both, Token),
        [Basic]
    );
    // A setting that does not fit a secret is ignored.
    assert_eq!(
        secret_client(Some(PrivateKeyJwt), None).attempts(&post_only, Token),
        [Post]
    );
    // The device endpoint uses the token list.
    assert_eq!(c.attempts(&post_only, DeviceAuthorization), [Post]);
}

#[test]
fn revocation_uses_its_own_list_then_the_token_list() {
    let c = secret_client(None, None);
    let own = endpoints(
        Some(&["client_secret_basic"]),
        Some(&["client_secret_post"]),
    );
    assert_eq!(c.attempts(&own, EndpointKind::Revocation), [Post]);
    let inherited = endpoints(Some(&["client_secret_post"]), None);
    assert_eq!(c.attempts(&inherited, EndpointKind::Revocation), [Post]);
}

#[test]
fn public_and_key_clients_have_one_method() {
    let both = endpoints(Some(&["client_secret_basic", "client_secret_post"]), None);
    let public = ClientAuth {
        client_id: "cli".into(),
        credential: ClientCredential::None,
        configured: None,
        remembered: None,
    };
    assert_eq!(
        public.attempts(&both, EndpointKind::Token),
        [ClientAuthMethod::None]
    );
    let keyed = ClientAuth {
        credential: ClientCredential::PrivateKey(Secret::from("pem")),
        ..public
    };
    assert_eq!(keyed.attempts(&both, EndpointKind::Token), [PrivateKeyJwt]);
}

#[test]
fn mismatched_settings_are_refused_with_the_fix() {
    let e = check_method(&ClientCredential::None, Post)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--client-secret-file"), "{e}");
    let e = check_method(&ClientCredential::Secret(Secret::from("x")), PrivateKeyJwt)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--client-key-file"), "{e}");
}

#[test]
fn secret_methods_put_the_secret_in_one_place_only() {
    let c = secret_client(None, None);
    let basic = c.prepare(Basic, "https://idp.example/token").unwrap();
    assert_eq!(basic.basic(), Some(("cli", "s3cret-marker")));
    assert!(basic.form_fields().is_empty());
    let post = c.prepare(Post, "https://idp.example/token").unwrap();
    assert_eq!(post.basic(), None);
    assert_eq!(
        post.form_fields(),
        [("client_id", "cli"), ("client_secret", "s3cret-marker")]
    );
    assert!(post.extra_params().is_empty());
}

/// A fresh P-256 key as SEC1 PEM, PKCS#8 PEM, and its public key PEM.
fn p256_key() -> (Secret, Secret, String) {
    use p256::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
    let key = loop {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        if let Ok(k) = p256::SecretKey::from_slice(&bytes) {
            break k;
        }
    };
    let sec1 = Secret::new(key.to_sec1_pem(LineEnding::LF).unwrap().to_string());
    let pkcs8 = Secret::new(key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string());
    let public = key.public_key().to_public_key_pem(LineEnding::LF).unwrap();
    (sec1, pkcs8, public)
}

#[test]
fn assertions_are_fresh_signed_and_short_lived() {
    let (sec1, pkcs8, public) = p256_key();
    let aud = "https://idp.example/token";
    let mut jtis = std::collections::HashSet::new();
    for key in [&sec1, &pkcs8, &sec1] {
        let jwt = assertion("cli", key, aud, 1_700_000_000).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.set_audience(&[aud]);
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<serde_json::Value>(
            jwt.expose(),
            &jsonwebtoken::DecodingKey::from_ec_pem(public.as_bytes()).unwrap(),
            &validation,
        )
        .expect("signature verifies with the public key");
        let c = data.claims;
        assert_eq!(c["iss"], "cli");
        assert_eq!(c["sub"], "cli");
        assert_eq!(c["aud"], aud);
        let lifetime = c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap();
        assert!(lifetime <= 60, "{lifetime}");
        assert!(
            jtis.insert(c["jti"].as_str().unwrap().to_owned()),
            "jti reused"
        );
    }
    assert_eq!(check_client_key(&sec1).unwrap(), "ES256");
    let prepared = secret_client(None, None);
    let keyed = ClientAuth {
        credential: ClientCredential::PrivateKey(pkcs8),
        ..prepared
    };
    let p = keyed.prepare(PrivateKeyJwt, aud).unwrap();
    let extra = p.extra_params();
    assert_eq!(
        extra[0],
        ("client_assertion_type", ASSERTION_TYPE.to_owned())
    );
    assert_eq!(extra[1].0, "client_assertion");
    assert_eq!(p.form_fields()[0], ("client_id", "cli"));
}

#[test]
fn bad_keys_are_refused_without_echoing_them() {
    for pem in [
        "not a key KEY-MARKER",
        "-----BEGIN RSA PRIVATE KEY-----\nKEY-MARKER\n-----END RSA PRIVATE KEY-----\n",
        "-----BEGIN EC PRIVATE KEY-----\nKEY-MARKER\n-----END EC PRIVATE KEY-----\n",
        "-----BEGIN PRIVATE KEY-----\nKEY-MARKER\n-----END PRIVATE KEY-----\n",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nKEY-MARKER\n-----END ENCRYPTED PRIVATE KEY-----\n",
    ] {
        let e = check_client_key(&Secret::from(pem))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("KEY-MARKER"), "{e}");
    }
}

#[test]
fn debug_never_shows_the_credential() {
    let c = secret_client(None, None);
    let shown = format!("{c:?}");
    assert!(!shown.contains("s3cret-marker"), "{shown}");
    assert!(shown.contains("secret"), "{shown}");
}
