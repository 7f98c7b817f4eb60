//! `broker-ctl logout`: revoke at the IdP, delete locally, and say plainly when
//! the grant could not be revoked (exit code [`exit::NOT_REVOKED`]).

use std::io::Write;
use std::path::Path;

use super::{connect, exit, Failure};
use kontext_broker::idp::sanitize::text as sanitize;

/// Runs `broker-ctl logout`; the outcome goes to `out`, a revocation that did
/// not happen to the returned [`Failure`] (stderr).
pub async fn run(
    socket: Option<&Path>,
    profile: &str,
    no_revoke: bool,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let client = connect(socket).await?;
    // Issuer and client, to say where a grant that was not revoked lives.
    let owner = match client.status().await {
        Ok(report) => report
            .profiles
            .into_iter()
            .find(|p| p.name == profile)
            .map(|p| (p.issuer, p.client_id)),
        Err(_) => None,
    };
    let outcome = client.logout(profile, !no_revoke).await?;
    match (outcome.revoked, outcome.revoke_error) {
        (true, _) => writeln!(out, "logged out `{profile}`; refresh token revoked")?,
        (false, _) if no_revoke => writeln!(
            out,
            "logged out `{profile}`; refresh token not revoked (--no-revoke)"
        )?,
        (false, None) => writeln!(
            out,
            "logged out `{profile}`; it held no live refresh token, so nothing needed revoking"
        )?,
        (false, Some(why)) => {
            writeln!(out, "logged out `{profile}` locally")?;
            return Err(not_revoked(profile, &sanitize(&why), owner));
        }
    }
    Ok(())
}

/// The message for a grant that stays valid at the IdP.
fn not_revoked(profile: &str, why: &str, owner: Option<(String, String)>) -> Failure {
    let whose = match owner {
        Some((issuer, client_id)) => format!(
            "the refresh token of client `{}` at issuer {}",
            sanitize(&client_id),
            sanitize(&issuer)
        ),
        None => "the refresh token".to_owned(),
    };
    Failure {
        code: exit::NOT_REVOKED,
        message: format!(
            "profile `{profile}` was deleted locally, but NOT revoked at the identity provider ({why}): \
             {whose} stays valid there until it expires; revoke it at the IdP (its account, sessions or \
             connected-apps page, or an admin), and next time give the revocation endpoint \
             (--revocation-endpoint URL on login/import, or revocation_endpoint in [profiles.{profile}]) \
             or log out with --no-revoke to skip revocation on purpose"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_grant_the_cause_and_the_fix() {
        let f = not_revoked(
            "work",
            "HTTP 500",
            Some(("https://idp.example/o".into(), "cli".into())),
        );
        assert_eq!(f.code, 9);
        for part in [
            "`work` was deleted locally",
            "NOT revoked",
            "(HTTP 500)",
            "client `cli` at issuer https://idp.example/o",
            "--revocation-endpoint",
            "[profiles.work]",
        ] {
            assert!(f.message.contains(part), "{part} in {}", f.message);
        }
        assert!(!f.message.contains('\n'));
    }
}
