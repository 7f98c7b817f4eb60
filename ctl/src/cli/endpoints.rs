//! `--token-endpoint`, `--revocation-endpoint`, `--device-authorization-endpoint`:
//! per-profile endpoint overrides on `login` and `import`, for servers whose
//! metadata lacks one.

use kontext_broker_protocol::EndpointOverrides;

/// Endpoint overrides given on the command line. They win over the profile's
/// config table, which wins over discovery.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EndpointArgs {
    /// Token endpoint URL, when discovery finds none or the wrong one.
    #[arg(long, value_name = "URL", value_parser = endpoint_url)]
    pub token_endpoint: Option<String>,
    /// Revocation endpoint URL (RFC 7009) that `logout` uses.
    #[arg(long, value_name = "URL", value_parser = endpoint_url)]
    pub revocation_endpoint: Option<String>,
    /// Device authorization endpoint URL (RFC 8628) for `login --device`.
    #[arg(long, value_name = "URL", value_parser = endpoint_url)]
    pub device_authorization_endpoint: Option<String>,
}

impl EndpointArgs {
    /// The flags as the wire type carried by `Import`.
    pub fn overrides(&self) -> EndpointOverrides {
        EndpointOverrides {
            token: self.token_endpoint.clone(),
            revocation: self.revocation_endpoint.clone(),
            device_authorization: self.device_authorization_endpoint.clone(),
        }
    }
}

/// An endpoint URL by the issuer rule: https, or http on loopback only.
fn endpoint_url(s: &str) -> Result<String, String> {
    kontext_broker::idp::validate_endpoint("endpoint", s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}
