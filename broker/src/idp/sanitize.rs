//! The one gate for IdP-provided text on its way to a log, `last_error`, a
//! watcher or a terminal.
//!
//! An identity provider controls its error codes, descriptions, discovery
//! documents and ID-token claims. Any of them may carry control characters (a
//! forged log line, an ESC sequence that repaints the terminal), be huge, or
//! echo a secret the broker sent it (a refresh token in an error message). The
//! rules, applied by every caller:
//! - an `error` code outside the RFC 6749 §5.2 charset (`%x20-21 / %x23-5B /
//!   %x5D-7E`), or longer than [`MAX_CODE_CHARS`], becomes [`INVALID_CODE`];
//! - other text loses its control characters and is capped at
//!   [`MAX_TEXT_CHARS`] characters;
//! - any substring equal to a secret the broker holds for the profile becomes
//!   [`REDACTED`], in codes and text alike.

use crate::store::ProfileRecord;

/// What an `error` code outside the RFC 6749 §5.2 charset is replaced with.
pub const INVALID_CODE: &str = "invalid_response";
/// Longest `error` code kept; registered codes are far shorter.
pub const MAX_CODE_CHARS: usize = 64;
/// Longest description (or other IdP text) kept, in characters.
pub const MAX_TEXT_CHARS: usize = 200;
/// Longest composed message (an error detail around IdP text), in characters.
pub const MAX_COMPOSED_CHARS: usize = 512;
/// What a secret found in IdP text is replaced with.
pub const REDACTED: &str = "[redacted]";

/// The secrets held for one profile, to be cut out of IdP text.
#[derive(Default)]
pub struct Secrets<'a>(Vec<&'a str>);

impl<'a> Secrets<'a> {
    /// No known secrets (text from an IdP before any token exists).
    pub fn none() -> Self {
        Secrets(Vec::new())
    }

    /// Every secret in `record`: refresh token, access token, client secret.
    pub fn of_record(record: &'a ProfileRecord) -> Self {
        let mut secrets = Secrets::none();
        if let Some(rt) = &record.refresh_token {
            secrets.add(rt.expose());
        }
        if let Some(at) = &record.access_token {
            secrets.add(at.token.expose());
        }
        if let Some(cs) = &record.client_secret {
            secrets.add(cs.expose());
        }
        secrets
    }

    /// Adds one more secret; empty strings are ignored.
    pub fn add(&mut self, secret: &'a str) {
        if !secret.is_empty() {
            self.0.push(secret);
        }
    }

    /// `text` with every occurrence of a secret replaced by [`REDACTED`].
    /// Longer secrets go first, so one that contains another is cut whole.
    fn redact(&self, text: &str) -> String {
        let mut secrets = self.0.clone();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let mut out = text.to_owned();
        for secret in secrets {
            if out.contains(secret) {
                out = out.replace(secret, REDACTED);
            }
        }
        out
    }
}

/// True for a character RFC 6749 §5.2 allows in `error`.
fn is_code_char(c: char) -> bool {
    matches!(c, '\x20'..='\x21' | '\x23'..='\x5b' | '\x5d'..='\x7e')
}

/// An OAuth `error` code safe to show: the code itself when it is within the
/// RFC 6749 §5.2 charset and [`MAX_CODE_CHARS`], else [`INVALID_CODE`];
/// secrets inside it are redacted.
pub fn code(code: &str, secrets: &Secrets) -> String {
    if code.is_empty() || code.chars().count() > MAX_CODE_CHARS || !code.chars().all(is_code_char) {
        return INVALID_CODE.to_owned();
    }
    secrets.redact(code)
}

/// IdP text (an `error_description`, a claim, an error message quoting a
/// document) safe to show: no control characters, secrets redacted, at most
/// [`MAX_TEXT_CHARS`] characters.
///
/// Control characters go first, so a secret split by one is still found;
/// the cap comes last, so it never cuts a secret in half.
pub fn text_with(text: &str, secrets: &Secrets) -> String {
    let stripped: String = text.chars().filter(|c| !c.is_control()).collect();
    secrets
        .redact(&stripped)
        .chars()
        .take(MAX_TEXT_CHARS)
        .collect()
}

/// [`text_with`] for text that cannot hold a broker secret (login before any
/// token exists, discovery documents).
pub fn text(text: &str) -> String {
    text_with(text, &Secrets::none())
}

/// Text that the broker composed around IdP text (say "code: description",
/// or an error chain naming a discovered URL), checked once more as a whole:
/// control characters stripped, secrets redacted, and capped at
/// [`MAX_COMPOSED_CHARS`], above the cap of its parts.
pub fn composed(text: &str, secrets: &Secrets) -> String {
    let stripped: String = text.chars().filter(|c| !c.is_control()).collect();
    secrets
        .redact(&stripped)
        .chars()
        .take(MAX_COMPOSED_CHARS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_outside_the_rfc_charset_become_invalid_response() {
        let none = Secrets::none();
        assert_eq!(code("invalid_grant", &none), "invalid_grant");
        assert_eq!(code("x\ny", &none), INVALID_CODE);
        assert_eq!(code("x\x1b[2J", &none), INVALID_CODE);
        assert_eq!(code("say \"hi\"", &none), INVALID_CODE);
        assert_eq!(code("back\\slash", &none), INVALID_CODE);
        assert_eq!(code("ünïcode", &none), INVALID_CODE);
        assert_eq!(code("", &none), INVALID_CODE);
        assert_eq!(code(&"a".repeat(65), &none), INVALID_CODE);
        assert_eq!(code("with space!", &none), "with space!");
    }

    #[test]
    fn secrets_are_redacted_in_codes_and_text() {
        let mut s = Secrets::none();
        s.add("RT-SECRET-123");
        s.add("RT-SECRET");
        s.add("");
        assert_eq!(code("x RT-SECRET-123", &s), "x [redacted]");
        assert_eq!(
            text_with("a RT-SECRET-123 b RT-SECRET c", &s),
            "a [redacted] b [redacted] c"
        );
        // A control character inside the secret does not hide it.
        assert_eq!(text_with("RT-SEC\x07RET-123", &s), "[redacted]");
        assert_eq!(composed("x: RT-SECRET\n", &s), "x: [redacted]");
    }

    #[test]
    fn text_loses_control_characters_and_is_capped() {
        assert_eq!(text("a\x1b[31mb\nc\u{9b}d"), "a[31mbcd");
        assert_eq!(text(&"x".repeat(500)).chars().count(), MAX_TEXT_CHARS);
        // The cap never cuts a secret in half: it is redacted first.
        let long = format!("{}SECRETSECRET", "y".repeat(195));
        let mut s = Secrets::none();
        s.add("SECRETSECRET");
        let out = text_with(&long, &s);
        assert!(!out.contains("SECRET"), "{out}");
    }
}
