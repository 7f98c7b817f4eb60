//! Writes the fuzz seed corpus under `fuzz/corpus/` (see docs/reliability.md):
//! `cargo run -p kontext-broker --example fuzz_seeds`. The corpus is committed;
//! rerun this when the wire types or the profile format change.

use std::io::Write;
use std::path::Path;

use kontext_broker::store::{ProfileRecord, StoredAccessToken};
use kontext_broker_protocol::codec::{encode, encode_frame};
use kontext_broker_protocol::{
    ClientAuthMethod, ClientCredential, ClientMessage, EndpointOverrides, Hello, ImportRequest,
    LifetimeSource, Request, RequestFrame, Secret, SetClientRequest, PROTOCOL_VERSION,
};

fn write(dir: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn requests() -> Vec<(&'static str, Request)> {
    let p = || "default".to_owned();
    vec![
        (
            "get_token",
            Request::GetToken {
                profile: p(),
                min_valid_secs: 60,
            },
        ),
        (
            "get_token_huge",
            Request::GetToken {
                profile: p(),
                min_valid_secs: u64::MAX,
            },
        ),
        (
            "invalidate",
            Request::Invalidate {
                profile: p(),
                generation: 1,
            },
        ),
        ("watch", Request::Watch { profile: p() }),
        ("status", Request::Status),
        (
            "import",
            Request::Import(ImportRequest {
                profile: "work".into(),
                issuer: "http://127.0.0.1:1".into(),
                client_id: "cli".into(),
                credential: ClientCredential::Secret(Secret::from("s")),
                client_auth: Some(ClientAuthMethod::ClientSecretBasic),
                scopes: vec!["openid".into()],
                endpoints: EndpointOverrides::default(),
                token_response: Secret::from(
                    r#"{"access_token":"a","refresh_token":"r","expires_in":60}"#,
                ),
            }),
        ),
        (
            "logout",
            Request::Logout {
                profile: p(),
                revoke: true,
            },
        ),
        ("refresh", Request::Refresh { profile: p() }),
        (
            "unlock",
            Request::Unlock {
                passphrase: Secret::from("pw"),
            },
        ),
        ("lock", Request::Lock),
        ("ping", Request::Ping),
        (
            "set_client",
            Request::SetClient(SetClientRequest {
                profile: p(),
                credential: ClientCredential::None,
                client_auth: None,
            }),
        ),
        ("status_page", Request::StatusPage { after: "a".into() }),
    ]
}

fn frames() {
    for (i, (name, request)) in requests().into_iter().enumerate() {
        let payload = encode(&ClientMessage::Request(RequestFrame {
            id: i as u64,
            request,
        }))
        .unwrap();
        // Framed mode: [0][u16 len][payload], the harness adds Hello.
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        framed.extend_from_slice(&payload);
        write("frames", &format!("framed_{name}"), &framed);
        // Raw mode: [1][Hello frame][request frame].
        let mut raw = vec![1u8];
        raw.extend(
            encode_frame(&ClientMessage::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                client_name: "seed".into(),
                client_version: "0".into(),
            }))
            .unwrap(),
        );
        raw.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        raw.extend_from_slice(&payload);
        write("frames", &format!("raw_{name}"), &raw);
    }
    // Abuse: an oversized header, a wrong version, a request before Hello.
    write("frames", "raw_oversized", &[1, 0xff, 0xff, 0xff, 0xff, 0]);
    let mut old = vec![1u8];
    old.extend(
        encode_frame(&ClientMessage::Hello(Hello {
            protocol_version: 1,
            client_name: "old".into(),
            client_version: "0".into(),
        }))
        .unwrap(),
    );
    write("frames", "raw_old_version", &old);
    let mut early = vec![1u8];
    early.extend(
        encode_frame(&ClientMessage::Request(RequestFrame {
            id: 1,
            request: Request::Status,
        }))
        .unwrap(),
    );
    write("frames", "raw_request_before_hello", &early);
}

/// A whole record, named `fuzzed` as the profile-file harness loads it.
fn record() -> ProfileRecord {
    ProfileRecord::builder(
        "fuzzed",
        "https://idp.example",
        "cli",
        "https://idp.example/token",
    )
    .client_secret("client-secret")
    .client_auth(ClientAuthMethod::ClientSecretPost)
    .client_auth_detected(ClientAuthMethod::ClientSecretBasic)
    .scopes(["openid", "offline_access"])
    .audience("https://api.example")
    .revocation("https://idp.example/revoke")
    .subject("alice@example.com")
    .refresh_token("rt-0")
    .access_token(StoredAccessToken {
        lifetime_source: Some(LifetimeSource::ExpiresIn),
        ..StoredAccessToken::bearer("at-0", 1_800_000_000, 1_800_003_600, ["openid"])
    })
    .generation(7)
    .build()
}

fn profiles() {
    let json = serde_json::to_vec(&record()).unwrap();
    let mut plain = vec![0u8];
    plain.extend_from_slice(&json);
    write("profile_file", "plain_record", &plain);
    let mut minimal = vec![0u8];
    minimal.extend_from_slice(
        br#"{"format_version":1,"name":"fuzzed","issuer":"https://i","client_id":"c","client_secret":null,"scopes":[],"audience":null,"endpoints":{"token":"https://i/t","authorization":null,"revocation":null,"device_authorization":null,"registration":null,"userinfo":null,"introspection":null,"jwks_uri":null},"subject":null,"refresh_token":null,"access_token":null,"generation":0}"#,
    );
    write("profile_file", "plain_minimal", &minimal);
    // A real age file, to some other key: exercises the header parser.
    let other = age::x25519::Identity::generate().to_public();
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(&other as &dyn age::Recipient)).unwrap();
    let mut out = vec![1u8];
    let mut w = encryptor.wrap_output(&mut out).unwrap();
    w.write_all(&json).unwrap();
    w.finish().unwrap();
    write("profile_file", "age_other_key", &out);
}

fn token_responses() {
    let bodies: &[(&str, u8, &str)] = &[
        (
            "ok",
            0,
            r#"{"access_token":"AT1","token_type":"Bearer","expires_in":3600,"refresh_token":"RT1","scope":"openid"}"#,
        ),
        (
            "ok_string_expiry",
            0,
            r#"{"access_token":"AT1","token_type":"bearer","expires_in":"3599","refresh_token":"RT1"}"#,
        ),
        (
            "ok_no_refresh",
            0,
            r#"{"access_token":"AT1","token_type":"Bearer","expires_in":60}"#,
        ),
        (
            "negative_expiry",
            0,
            r#"{"access_token":"AT1","token_type":"Bearer","expires_in":-5}"#,
        ),
        (
            "huge_expiry",
            0,
            r#"{"access_token":"AT1","token_type":"Bearer","expires_in":1e300}"#,
        ),
        (
            "id_token",
            0,
            r#"{"access_token":"AT1","token_type":"Bearer","id_token":"eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1MSIsImVtYWlsIjoiYUBiLmMifQ.","refresh_token":"RT1"}"#,
        ),
        (
            "invalid_grant",
            3,
            r#"{"error":"invalid_grant","error_description":"grant request is invalid"}"#,
        ),
        ("invalid_client", 4, r#"{"error":"invalid_client"}"#),
        (
            "odd_error",
            3,
            r#"{"error":"invalid_grant","error_description":{"nested":true}}"#,
        ),
        (
            "control_chars",
            3,
            "{\"error\":\"invalid_request\",\"error_description\":\"a\\u001b[2Jb\\nc\"}",
        ),
        ("html_502", 7, "<html>502 Bad Gateway</html>"),
        ("empty", 6, ""),
    ];
    for (name, status, body) in bodies {
        let mut bytes = vec![*status];
        bytes.extend_from_slice(body.as_bytes());
        write("token_response", name, &bytes);
    }
}

fn main() {
    frames();
    profiles();
    token_responses();
}
