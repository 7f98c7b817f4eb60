//! The optional TOML config file (contract §1). Every setting has a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kontext_broker_protocol::{ClientAuthMethod, EndpointOverrides};
use serde::Deserialize;

use crate::{Error, Result};

/// Where the age identity that decrypts profiles comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    /// An X25519 identity in `<state>/identity.txt`, created on first start.
    #[default]
    File,
    /// An scrypt-protected identity; the broker starts locked.
    Passphrase,
    /// The OS keyring (cargo feature `keyring`).
    Keyring,
}

/// Broker settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Identity source for the profile store.
    pub identity: IdentityKind,
    /// The command named in "Session expired, run `…` to re-authenticate".
    pub reauth_command: String,
    /// Fraction of a token's lifetime after which it is refreshed proactively.
    pub refresh_at: f64,
    /// Up to this fraction of the lifetime is subtracted at random from the deadline.
    pub refresh_jitter: f64,
    /// Open connections beyond this wait for a slot.
    pub max_connections: usize,
    /// A connection that sends no complete `Hello` within this many seconds is
    /// closed and counted in `status` (`handshake_timeouts`).
    pub handshake_timeout_secs: u64,
    /// Extra PEM root certificates trusted for IdP HTTPS (private CAs).
    pub extra_root_certs: Vec<PathBuf>,
    /// TCP connect timeout for IdP calls, seconds.
    pub http_connect_timeout_secs: u64,
    /// Total timeout for one IdP call, seconds.
    pub http_timeout_secs: u64,
    /// First retry delay after a transient IdP failure, seconds.
    pub backoff_initial_secs: u64,
    /// Longest retry delay, seconds.
    pub backoff_max_secs: u64,
    /// log2 of the scrypt work factor for a new passphrase identity. `None` lets
    /// age calibrate (about 1 s). Tests set a small value.
    pub scrypt_work_factor: Option<u8>,
    /// Lifetime assumed for an access token whose response has no `expires_in`
    /// and which is not a JWT with `exp`, seconds.
    pub default_token_lifetime: u64,
    /// Per-profile settings: `[profiles.NAME]` tables.
    pub profiles: BTreeMap<String, ProfileConfig>,
}

/// Settings of one profile (`[profiles.NAME]`): endpoints for servers whose metadata
/// lacks one, client authentication and the default token lifetime. They win over
/// discovery; `login`/`import` flags win over them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileConfig {
    /// Token endpoint URL.
    pub token_endpoint: Option<String>,
    /// Revocation endpoint URL (RFC 7009), used by `logout`.
    pub revocation_endpoint: Option<String>,
    /// Device authorization endpoint URL (RFC 8628), used by `login --device`.
    pub device_authorization_endpoint: Option<String>,
    /// Client authentication method (`client_secret_basic`, `client_secret_post`,
    /// `private_key_jwt`, `none`); wins over the server's metadata. A method
    /// given with `--client-auth` at login or import wins over this.
    #[serde(deserialize_with = "auth_method")]
    pub client_auth: Option<ClientAuthMethod>,
    /// Overrides the global `default_token_lifetime` for this profile, seconds.
    pub default_token_lifetime: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            identity: IdentityKind::File,
            reauth_command: "kontext login".into(),
            refresh_at: 0.8,
            refresh_jitter: 0.05,
            max_connections: 4096,
            handshake_timeout_secs: 10,
            extra_root_certs: Vec::new(),
            http_connect_timeout_secs: 5,
            http_timeout_secs: 15,
            backoff_initial_secs: 1,
            backoff_max_secs: 300,
            scrypt_work_factor: None,
            default_token_lifetime: crate::engine::lifetime::DEFAULT_TOKEN_LIFETIME_SECS,
            profiles: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Loads `path` if it exists; a missing file means all defaults.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(Error::io(format!("reading config {}", path.display()), e)),
        };
        Self::parse(&text).map_err(|detail| Error::Config {
            path: path.to_path_buf(),
            detail,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> std::result::Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        if !(0.1..=0.95).contains(&config.refresh_at) {
            return Err(format!(
                "refresh_at must be between 0.1 and 0.95, got {}",
                config.refresh_at
            ));
        }
        if !(0.0..=0.2).contains(&config.refresh_jitter) {
            return Err(format!(
                "refresh_jitter must be between 0 and 0.2, got {}",
                config.refresh_jitter
            ));
        }
        if config.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if !(1..=300).contains(&config.handshake_timeout_secs) {
            return Err(format!(
                "handshake_timeout_secs must be between 1 and 300, got {}",
                config.handshake_timeout_secs
            ));
        }
        if config.backoff_initial_secs == 0 || config.backoff_max_secs < config.backoff_initial_secs
        {
            return Err("need 0 < backoff_initial_secs <= backoff_max_secs".into());
        }
        for (name, profile) in &config.profiles {
            if !kontext_broker_protocol::paths::is_valid_profile_name(name) {
                return Err(format!("[profiles.{name}]: invalid profile name"));
            }
            crate::idp::validate_overrides(&profile.endpoint_overrides())
                .map_err(|e| format!("[profiles.{name}]: {e}"))?;
        }
        Ok(config)
    }

    /// The endpoint overrides configured for `profile` (none when it has no table).
    pub fn endpoint_overrides(&self, profile: &str) -> EndpointOverrides {
        self.profiles
            .get(profile)
            .map(ProfileConfig::endpoint_overrides)
            .unwrap_or_default()
    }

    /// `preferred` (from the command line or an import), each endpoint it lacks
    /// taken from `profile`'s config table.
    pub fn merged_overrides(
        &self,
        profile: &str,
        preferred: &EndpointOverrides,
    ) -> EndpointOverrides {
        let config = self.endpoint_overrides(profile);
        EndpointOverrides {
            token: preferred.token.clone().or(config.token),
            revocation: preferred.revocation.clone().or(config.revocation),
            device_authorization: preferred
                .device_authorization
                .clone()
                .or(config.device_authorization),
        }
    }

    /// The client authentication method the config sets for `profile`, if any.
    pub fn client_auth_for(&self, profile: &str) -> Option<ClientAuthMethod> {
        self.profiles.get(profile).and_then(|p| p.client_auth)
    }

    /// The lifetime assumed for `profile`'s tokens that state none, seconds.
    pub fn default_token_lifetime_for(&self, profile: &str) -> u64 {
        self.profiles
            .get(profile)
            .and_then(|p| p.default_token_lifetime)
            .unwrap_or(self.default_token_lifetime)
    }

    /// The message every client gets when a refresh token is dead.
    pub fn reauth_message(&self) -> String {
        format!(
            "Session expired, run `{}` to re-authenticate",
            self.reauth_command
        )
    }
}

fn auth_method<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<ClientAuthMethod>, D::Error> {
    let name = String::deserialize(d)?;
    ClientAuthMethod::parse(&name).map(Some).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "unknown client_auth `{name}`; use client_secret_basic, client_secret_post, private_key_jwt or none"
        ))
    })
}

impl ProfileConfig {
    /// Puts every endpoint set here into `endpoints` (a stored profile's).
    pub fn apply_to(&self, endpoints: &mut crate::store::Endpoints) {
        if let Some(token) = &self.token_endpoint {
            endpoints.token.clone_from(token);
        }
        if let Some(revocation) = &self.revocation_endpoint {
            endpoints.revocation = Some(revocation.clone());
        }
        if let Some(device) = &self.device_authorization_endpoint {
            endpoints.device_authorization = Some(device.clone());
        }
    }

    /// These settings as the wire type carried by `Import`.
    pub fn endpoint_overrides(&self) -> EndpointOverrides {
        EndpointOverrides {
            token: self.token_endpoint.clone(),
            revocation: self.revocation_endpoint.clone(),
            device_authorization: self.device_authorization_endpoint.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.identity, IdentityKind::File);
        assert_eq!(c.max_connections, 4096);
        assert_eq!(
            c.reauth_message(),
            "Session expired, run `kontext login` to re-authenticate"
        );
        let c =
            Config::parse("identity = \"passphrase\"\nreauth_command = \"acme login\"\n").unwrap();
        assert_eq!(c.identity, IdentityKind::Passphrase);
        assert_eq!(
            c.reauth_message(),
            "Session expired, run `acme login` to re-authenticate"
        );
    }

    #[test]
    fn profile_settings() {
        let c = Config::parse(
            "default_token_lifetime = 120\n[profiles.work]\nclient_auth = \"client_secret_post\"\ndefault_token_lifetime = 30\n",
        )
        .unwrap();
        assert_eq!(
            c.client_auth_for("work"),
            Some(ClientAuthMethod::ClientSecretPost)
        );
        assert_eq!(c.client_auth_for("other"), None);
        assert_eq!(c.default_token_lifetime_for("work"), 30);
        assert_eq!(c.default_token_lifetime_for("other"), 120);
        assert_eq!(Config::default().default_token_lifetime_for("x"), 300);
        let e = Config::parse("[profiles.p]\nclient_auth = \"basic\"\n").unwrap_err();
        assert!(e.contains("client_secret_basic"), "{e}");
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Config::parse("refresh_at = 1.5").is_err());
        assert!(Config::parse("max_connections = 0").is_err());
        assert!(Config::parse("no_such_key = 1").is_err());
    }

    #[test]
    fn profile_tables_hold_endpoint_overrides() {
        let c = Config::parse(
            "[profiles.work]\nrevocation_endpoint = \"https://idp.example/o/revoke_token/\"\n\
             device_authorization_endpoint = \"http://127.0.0.1:8000/o/device-authorization/\"\n",
        )
        .unwrap();
        let o = c.endpoint_overrides("work");
        assert_eq!(o.token, None);
        assert_eq!(
            o.revocation.as_deref(),
            Some("https://idp.example/o/revoke_token/")
        );
        assert_eq!(
            o.device_authorization.as_deref(),
            Some("http://127.0.0.1:8000/o/device-authorization/")
        );
        assert_eq!(c.endpoint_overrides("other"), EndpointOverrides::default());
        let flags = EndpointOverrides {
            revocation: Some("https://flag.example/revoke".into()),
            token: Some("https://flag.example/token".into()),
            device_authorization: None,
        };
        let merged = c.merged_overrides("work", &flags);
        assert_eq!(merged.revocation, flags.revocation);
        assert_eq!(merged.token, flags.token);
        assert_eq!(merged.device_authorization, o.device_authorization);

        for bad in [
            "[profiles.work]\nrevocation_endpoint = \"http://idp.example/revoke\"\n",
            "[profiles.work]\ntoken_endpoint = \"not a url\"\n",
            "[profiles.work]\nno_such_endpoint = \"https://idp.example\"\n",
            "[profiles.\".bad\"]\ntoken_endpoint = \"https://idp.example/t\"\n",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_file_is_defaults() {
        let c = Config::load(Some(Path::new("/nonexistent/kontext/broker.toml"))).unwrap();
        assert_eq!(c.refresh_at, 0.8);
    }
}
