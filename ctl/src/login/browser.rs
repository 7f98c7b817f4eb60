//! Starting the user's browser on the authorization URL.

use std::process::{Command, Stdio};

/// The opener of this platform: `open` on macOS, `xdg-open` elsewhere.
fn opener() -> &'static str {
    if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    }
}

/// Starts the browser on `url` without waiting for it. The URL carries only
/// the PKCE challenge, state and nonce, never a token or secret.
pub fn open(url: &str) -> std::io::Result<()> {
    let child = tokio::process::Command::from({
        let mut c = Command::new(opener());
        c.arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    })
    .spawn()?;
    // tokio reaps a dropped child in the background: no zombie, no wait here.
    drop(child);
    Ok(())
}
