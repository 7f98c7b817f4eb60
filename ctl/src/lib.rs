//! kontext-broker-ctl: the `broker-ctl` command line and the interactive login
//! flows it drives, kept apart from the daemon's library (`kontext-broker`) so
//! the daemon carries no client or terminal code.
//!
//! - [`cli`]: argument parsing, the subcommands, exit codes and output formats.
//! - [`login`]: auth code + PKCE on a loopback redirect, the device flow,
//!   dynamic client registration and ID-token checks.

pub mod cli;
pub mod login;
