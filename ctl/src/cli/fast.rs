//! The fast path of `broker-ctl token`, the command scripts run before every
//! request: recognized from the raw arguments before clap builds its parser,
//! and served by the blocking client, with no async runtime and no logging set up.
//!
//! Anything the fast path does not fully understand (help, a typo, an invalid
//! value, another command) goes to the normal clap path, so errors and exit
//! codes are exactly the same either way.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use kontext_broker_client::blocking::request_once;
use kontext_broker_client::ClientBuilder;
use kontext_broker_protocol::{paths, Request, Response, DEFAULT_PROFILE};

use super::{Failure, ADMIN_REQUEST_TIMEOUT};

/// A `token` command line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenArgs {
    /// `--socket`; `None` resolves as usual (environment, then defaults).
    pub socket: Option<PathBuf>,
    /// `--profile`, checked against the name rules.
    pub profile: String,
    /// `--min-valid` in seconds.
    pub min_valid: u64,
}

/// `Some` when `args` (without the program name) is a `token` command using only
/// `--socket`, `--profile` and `--min-valid` (as `--flag value` or `--flag=value`,
/// each at most once) with valid values; `None` for everything else.
pub fn parse_token(args: &[OsString]) -> Option<TokenArgs> {
    let mut command = false;
    let mut socket = None;
    let mut profile = None;
    let mut min_valid = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let arg = arg.to_str()?;
        if arg == "token" && !command {
            command = true;
            continue;
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(value)),
            None => (arg, None),
        };
        let value = match inline {
            Some(v) => v,
            None => rest.next()?.to_str()?,
        };
        // clap reads a leading `-` as a flag, not a value: let it say so.
        if value.is_empty() || value.starts_with('-') {
            return None;
        }
        match flag {
            // `--socket` is global: it may come before or after the command.
            "--socket" if socket.is_none() => socket = Some(PathBuf::from(value)),
            "--profile" if command && profile.is_none() => {
                if !paths::is_valid_profile_name(value) {
                    return None;
                }
                profile = Some(value.to_owned());
            }
            "--min-valid" if command && min_valid.is_none() => {
                min_valid = Some(value.parse().ok()?);
            }
            _ => return None,
        }
    }
    command.then(|| TokenArgs {
        socket,
        profile: profile.unwrap_or_else(|| DEFAULT_PROFILE.to_owned()),
        min_valid: min_valid.unwrap_or(0),
    })
}

/// Prints the access token and a newline, as `broker-ctl token` does: the
/// `GetToken` goes out with the handshake, so the whole command is one round trip.
pub fn token(args: &TokenArgs, out: &mut dyn Write) -> Result<(), Failure> {
    let mut builder = ClientBuilder::default()
        .client_name("broker-ctl")
        .request_timeout(ADMIN_REQUEST_TIMEOUT);
    if let Some(socket) = &args.socket {
        builder = builder.socket(socket);
    }
    let answer = request_once(
        &builder,
        Request::GetToken {
            profile: args.profile.clone(),
            min_valid_secs: args.min_valid,
        },
    )?;
    let Response::Token(t) = answer else {
        return Err(Failure::other(
            "unexpected answer from the broker to GetToken; check versions with `broker-ctl ping`",
        ));
    };
    writeln!(out, "{}", t.access_token.expose())?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Option<TokenArgs> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        parse_token(&args)
    }

    fn expect(socket: Option<&str>, profile: &str, min_valid: u64) -> Option<TokenArgs> {
        Some(TokenArgs {
            socket: socket.map(PathBuf::from),
            profile: profile.to_owned(),
            min_valid,
        })
    }

    #[test]
    fn token_command_lines_are_recognized() {
        assert_eq!(parse(&["token"]), expect(None, "default", 0));
        assert_eq!(
            parse(&["token", "--profile", "work", "--min-valid=60"]),
            expect(None, "work", 60)
        );
        assert_eq!(
            parse(&["--socket", "/s", "token", "--profile=p.1"]),
            expect(Some("/s"), "p.1", 0)
        );
        assert_eq!(
            parse(&["token", "--socket=/s", "--min-valid", "5"]),
            expect(Some("/s"), "default", 5)
        );
    }

    #[test]
    fn everything_else_goes_to_clap() {
        for args in [
            &[][..],
            &["status"],
            &["token", "--help"],
            &["token", "-h"],
            &["--version"],
            &["token", "token"],
            &["token", "--profile"],
            &["token", "--profile", ".hidden"],
            &["token", "--profile", "-x"],
            &["token", "--profile="],
            &["token", "--profile", "a", "--profile", "b"],
            &["token", "--min-valid", "-1"],
            &["token", "--min-valid", "soon"],
            &["token", "--generation", "1"],
            &["--profile", "p", "token"],
            &["token", "extra"],
        ] {
            assert_eq!(parse(args), None, "{args:?}");
        }
    }
}
