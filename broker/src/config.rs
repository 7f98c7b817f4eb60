//! The optional TOML config file (SPEC §1). Every setting has a default.

use std::path::{Path, PathBuf};

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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            identity: IdentityKind::File,
            reauth_command: "kontext login".into(),
            refresh_at: 0.8,
            refresh_jitter: 0.05,
            max_connections: 4096,
            extra_root_certs: Vec::new(),
            http_connect_timeout_secs: 5,
            http_timeout_secs: 15,
            backoff_initial_secs: 1,
            backoff_max_secs: 300,
            scrypt_work_factor: None,
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
        if config.backoff_initial_secs == 0 || config.backoff_max_secs < config.backoff_initial_secs
        {
            return Err("need 0 < backoff_initial_secs <= backoff_max_secs".into());
        }
        Ok(config)
    }

    /// The message every client gets when a refresh token is dead.
    pub fn reauth_message(&self) -> String {
        format!(
            "Session expired, run `{}` to re-authenticate",
            self.reauth_command
        )
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
    fn rejects_bad_values() {
        assert!(Config::parse("refresh_at = 1.5").is_err());
        assert!(Config::parse("max_connections = 0").is_err());
        assert!(Config::parse("no_such_key = 1").is_err());
    }

    #[test]
    fn missing_file_is_defaults() {
        let c = Config::load(Some(Path::new("/nonexistent/kontext/broker.toml"))).unwrap();
        assert_eq!(c.refresh_at, 0.8);
    }
}
