//! A tiny HTML form driver for `oidc-provider`'s devInteractions pages
//! (login, consent, device code input and confirmation) and for
//! django-oauth-toolkit's login, consent and device pages. TEST FIXTURE ONLY.
//!
//! It plays a browser without JavaScript: GET a page with a cookie jar, find its
//! single `<form>`, fill the known fields, submit it, and follow redirects by
//! hand until the flow leaves the provider (a redirect to another origin, such as
//! a loopback `redirect_uri`) or lands on a page without a form.
//! Parsing is plain string scanning, good for the provider's own markup only.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context as _, Result};
use url::Url;

/// Login name the driver types in; `findAccount` in provider.mjs accepts any.
pub const LOGIN_NAME: &str = "test-user";

/// The most pages and redirects one flow may take before the driver gives up.
const MAX_STEPS: usize = 25;

/// One parsed HTML form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Form {
    /// Absolute submit URL (the `action`, resolved against the page URL).
    pub action: Url,
    /// Upper-case method, `GET` or `POST`.
    pub method: String,
    /// `(name, value)` of every named `<input>`, in document order.
    pub fields: Vec<(String, String)>,
    /// `(name, value)` of every named submit button (`<input type="submit">`
    /// or `<button>`), in document order. A browser sends only the one pressed.
    pub buttons: Vec<(String, String)>,
}

impl Form {
    /// Sets `name` to `value` where the form has such a field; returns whether it had one.
    pub fn fill(&mut self, name: &str, value: &str) -> bool {
        let mut found = false;
        for (n, v) in &mut self.fields {
            if n == name {
                *v = value.to_owned();
                found = true;
            }
        }
        found
    }
}

/// Where a driven flow ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A redirect left the provider's origin; this is its target (e.g. the callback).
    Redirected(Url),
    /// A page without a form (e.g. the device flow's success page).
    Page {
        /// URL of the page.
        url: Url,
        /// Its HTML.
        html: String,
    },
}

/// Approves a device authorization (RFC 8628) as the user would in a browser:
/// opens `{issuer}/device?user_code=...`, confirms the code, logs in as
/// [`LOGIN_NAME`] and consents.
pub async fn approve_device_code(issuer: &str, user_code: &str) -> Result<()> {
    let start = Url::parse(issuer)
        .context("issuer URL")?
        .join("device")
        .context("device URL")?;
    let mut start = start;
    start.query_pairs_mut().append_pair("user_code", user_code);
    let fields = HashMap::from([("user_code", user_code)]);
    match drive(start, &fields).await? {
        Outcome::Page { html, .. } if html.contains("Sign-in Success") => Ok(()),
        Outcome::Page { url, html } => {
            bail!(
                "device flow ended on {url} without success: {}",
                page_text(&html)
            )
        }
        Outcome::Redirected(url) => bail!("device flow left the provider for {url}"),
    }
}

/// Completes an authorization-code login (login as [`LOGIN_NAME`] plus consent)
/// starting at `authorization_url`, and returns the redirect to the client's
/// `redirect_uri` (with `code` and `state`, or `error`). The callback itself is
/// not requested: delivering it is up to the caller.
pub async fn complete_login(authorization_url: &str) -> Result<Url> {
    let start = Url::parse(authorization_url).context("authorization URL")?;
    match drive(start, &HashMap::new()).await? {
        Outcome::Redirected(url) => Ok(url),
        Outcome::Page { url, html } => {
            bail!(
                "login ended on {url} without a redirect: {}",
                page_text(&html)
            )
        }
    }
}

/// Drives a flow from `start`: fills `login`, `password` and `extra` fields in
/// every form it meets, and stops at the first redirect to another origin or at
/// the first page without a form.
pub async fn drive(start: Url, extra: &HashMap<&str, &str>) -> Result<Outcome> {
    drive_pressing(start, extra, &[]).await
}

/// Like [`drive`], and in every form that has a submit button with one of the
/// `(name, value)` pairs of `press`, presses it (sends that pair), as a user
/// choosing "Authorize" or "Accept" would.
pub async fn drive_pressing(
    start: Url,
    extra: &HashMap<&str, &str>,
    press: &[(&str, &str)],
) -> Result<Outcome> {
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(15))
        .build()
        .context("build reqwest client")?;
    let origin = start.origin();
    let mut request = client.get(start.clone());
    let mut url = start;
    for _ in 0..MAX_STEPS {
        let resp = request
            .send()
            .await
            .with_context(|| format!("request to {url}"))?;
        let status = resp.status();
        if status.is_redirection() {
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| anyhow!("{status} from {url} without a Location"))?;
            let next = url
                .join(location)
                .with_context(|| format!("bad Location {location:?}"))?;
            if next.origin() != origin {
                return Ok(Outcome::Redirected(next));
            }
            request = client.get(next.clone());
            url = next;
            continue;
        }
        let html = resp.text().await.context("read page")?;
        if !status.is_success() {
            bail!("{status} from {url}: {}", page_text(&html));
        }
        if error_message(&html).is_some() {
            bail!("provider rejected the input at {url}: {}", page_text(&html));
        }
        if !html.contains("<form") {
            return Ok(Outcome::Page { url, html });
        }
        let mut form = parse_single_form(&html, &url)?;
        form.fill("login", LOGIN_NAME);
        form.fill("password", "any-password");
        for (name, value) in extra {
            form.fill(name, value);
        }
        if let Some(button) = form
            .buttons
            .iter()
            .find(|(n, v)| press.iter().any(|(pn, pv)| pn == n && pv == v))
        {
            form.fields.push(button.clone());
        }
        request = if form.method == "GET" {
            let mut target = form.action.clone();
            target.query_pairs_mut().extend_pairs(&form.fields);
            client.get(target)
        } else {
            client.post(form.action.clone()).form(&form.fields)
        };
        url = form.action;
    }
    bail!("flow did not finish within {MAX_STEPS} steps (last URL {url})")
}

/// Parses the page's only `<form>`; fails if it has none or several.
pub fn parse_single_form(html: &str, page_url: &Url) -> Result<Form> {
    let lower = html.to_ascii_lowercase();
    let starts: Vec<usize> = lower.match_indices("<form").map(|(i, _)| i).collect();
    let [start] = starts[..] else {
        bail!("expected one <form>, found {}", starts.len());
    };
    let tag_end = find_tag_end(&lower, start).ok_or_else(|| anyhow!("unterminated <form> tag"))?;
    let attrs = parse_attributes(&html[start + "<form".len()..tag_end]);
    let body_end = lower[tag_end..]
        .find("</form")
        .map_or(html.len(), |i| tag_end + i);
    let action = match attrs.get("action") {
        Some(a) if !a.is_empty() => page_url
            .join(a)
            .with_context(|| format!("bad form action {a:?}"))?,
        _ => page_url.clone(),
    };
    let method = attrs
        .get("method")
        .map_or_else(|| "GET".to_owned(), |m| m.to_ascii_uppercase());

    let mut fields = Vec::new();
    let mut buttons = Vec::new();
    let inner_lower = &lower[tag_end..body_end];
    for (i, _) in inner_lower.match_indices("<button") {
        let abs = tag_end + i;
        let end = find_tag_end(&lower, abs).ok_or_else(|| anyhow!("unterminated <button>"))?;
        let a = parse_attributes(&html[abs + "<button".len()..end]);
        let is_submit = a
            .get("type")
            .is_none_or(|t| t.eq_ignore_ascii_case("submit"));
        if let (true, Some(name)) = (is_submit, a.get("name")) {
            buttons.push((
                abs,
                name.clone(),
                a.get("value").cloned().unwrap_or_default(),
            ));
        }
    }
    for (i, _) in inner_lower.match_indices("<input") {
        let abs = tag_end + i;
        let end = find_tag_end(&lower, abs).ok_or_else(|| anyhow!("unterminated <input>"))?;
        let a = parse_attributes(&html[abs + "<input".len()..end]);
        let kind = a
            .get("type")
            .map_or("text", String::as_str)
            .to_ascii_lowercase();
        let Some(name) = a.get("name") else { continue };
        match kind.as_str() {
            "submit" | "image" => {
                buttons.push((
                    abs,
                    name.clone(),
                    a.get("value").cloned().unwrap_or_default(),
                ));
                continue;
            }
            "button" | "reset" | "file" => continue,
            "checkbox" | "radio" if !a.contains_key("checked") => continue,
            _ => {}
        }
        let value = a.get("value").cloned().unwrap_or_else(|| {
            if matches!(kind.as_str(), "checkbox" | "radio") {
                "on".to_owned()
            } else {
                String::new()
            }
        });
        fields.push((name.clone(), value));
    }
    // Document order across `<input>` and `<button>`.
    buttons.sort_by_key(|(at, _, _)| *at);
    Ok(Form {
        action,
        method,
        fields,
        buttons: buttons.into_iter().map(|(_, n, v)| (n, v)).collect(),
    })
}

/// Index of the `>` closing the tag that starts at `start`, skipping quoted values.
fn find_tag_end(s: &str, start: usize) -> Option<usize> {
    let mut quote = None;
    for (i, c) in s[start..].char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '>') => return Some(start + i),
            _ => {}
        }
    }
    None
}

/// Parses `name="v" name='v' name=v flag` into a map with lower-case names and
/// entity-decoded values. Order does not matter; a repeated name keeps the first.
fn parse_attributes(s: &str) -> HashMap<String, String> {
    let mut attrs = HashMap::new();
    let mut rest = s.trim_end_matches('/').trim_start();
    while !rest.is_empty() {
        let name_len = rest
            .find(|c: char| c.is_whitespace() || c == '=' || c == '/')
            .unwrap_or(rest.len());
        let name = rest[..name_len].to_ascii_lowercase();
        rest = rest[name_len..].trim_start();
        let mut value = String::new();
        if let Some(after_eq) = rest.strip_prefix('=') {
            let after_eq = after_eq.trim_start();
            let (raw, remaining) = match after_eq.chars().next() {
                Some(q @ ('"' | '\'')) => {
                    let body = &after_eq[1..];
                    let close = body.find(q).unwrap_or(body.len());
                    (&body[..close], body.get(close + 1..).unwrap_or(""))
                }
                _ => {
                    let end = after_eq.find(char::is_whitespace).unwrap_or(after_eq.len());
                    (&after_eq[..end], &after_eq[end..])
                }
            };
            value = decode_entities(raw);
            rest = remaining;
        } else if name_len == 0 {
            // A stray character (e.g. '/'); skip it.
            rest = &rest[rest.chars().next().map_or(0, char::len_utf8)..];
        }
        if !name.is_empty() {
            attrs.entry(name).or_insert(value);
        }
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '/');
    }
    attrs
}

/// Decodes the entities HTML escapers emit (named basics and numeric ones).
fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let decoded = rest.find(';').and_then(|semi| {
            let entity = &rest[1..semi];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => entity
                    .strip_prefix("#x")
                    .or_else(|| entity.strip_prefix("#X"))
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                    .and_then(char::from_u32),
            }?;
            Some((c, semi + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The provider's inline error paragraph (`<p class="red">`), if any.
fn error_message(html: &str) -> Option<&str> {
    let start = html.find("class=\"red\"")?;
    let text_start = start + html[start..].find('>')? + 1;
    let text_end = text_start + html[text_start..].find('<')?;
    Some(&html[text_start..text_end])
}

/// A short, tag-free excerpt of a page for error messages.
fn page_text(html: &str) -> String {
    let body = html.find("<body").map_or(html, |i| &html[i..]);
    let mut text = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    let collapsed: Vec<&str> = text.split_whitespace().collect();
    let mut excerpt = collapsed.join(" ");
    if excerpt.len() > 300 {
        let mut cut = 300;
        while !excerpt.is_char_boundary(cut) {
            cut -= 1;
        }
        excerpt.truncate(cut);
        excerpt.push('…');
    }
    excerpt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_attributes_in_any_order_and_quoting() {
        let html = r#"<html><form method='post' id=x action="/i/abc?a=1&amp;b=2">
            <input value="v1" type="hidden" name="xsrf"/>
            <input name=user_code type=text>
            <input type="submit" name="go" value="Go">
            <input type="checkbox" name="unchecked">
            <input type="checkbox" name="checked" checked>
            </form></html>"#;
        let page = Url::parse("http://127.0.0.1:1/device").unwrap();
        let form = parse_single_form(html, &page).unwrap();
        assert_eq!(form.action.as_str(), "http://127.0.0.1:1/i/abc?a=1&b=2");
        assert_eq!(form.method, "POST");
        assert_eq!(
            form.fields,
            vec![
                ("xsrf".to_owned(), "v1".to_owned()),
                ("user_code".to_owned(), String::new()),
                ("checked".to_owned(), "on".to_owned()),
            ]
        );
        assert_eq!(form.buttons, vec![("go".to_owned(), "Go".to_owned())]);
    }

    #[test]
    fn collects_named_submit_buttons_only() {
        let html = r#"<form method="post">
            <input type="submit" value="Cancel"/>
            <input type="submit" name="allow" value="Authorize"/>
            <button type="submit" name="action" value="accept">Accept</button>
            <button name="action" value="deny">Deny</button>
            <button type="button" name="js" value="x">JS</button>
            </form>"#;
        let page = Url::parse("http://127.0.0.1:1/o/authorize/").unwrap();
        let form = parse_single_form(html, &page).unwrap();
        assert!(form.fields.is_empty(), "{:?}", form.fields);
        assert_eq!(
            form.buttons,
            vec![
                ("allow".to_owned(), "Authorize".to_owned()),
                ("action".to_owned(), "accept".to_owned()),
                ("action".to_owned(), "deny".to_owned()),
            ]
        );
    }

    #[test]
    fn rejects_pages_with_several_forms_or_none() {
        let page = Url::parse("http://127.0.0.1:1/").unwrap();
        assert!(parse_single_form("<p>nothing</p>", &page).is_err());
        assert!(parse_single_form("<form></form><FORM></FORM>", &page).is_err());
    }

    #[test]
    fn decodes_entities() {
        assert_eq!(
            decode_entities("a&amp;b&#39;c&#x2F;d&bogus"),
            "a&b'c/d&bogus"
        );
    }

    #[test]
    fn finds_the_red_error_paragraph() {
        let html = r#"<p class="red">The code you entered is incorrect. Try again</p>"#;
        assert_eq!(
            error_message(html),
            Some("The code you entered is incorrect. Try again")
        );
        assert_eq!(error_message("<p>Enter the code</p>"), None);
    }
}
