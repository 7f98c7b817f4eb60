//! The authorization code flow with PKCE (S256) on a loopback redirect
//! (RFC 8252): build the URL, wait for the redirect, redeem the code.

use kontext_broker::idp::client_auth::Prepared;
use kontext_broker::idp::EndpointKind;
use kontext_broker_protocol::Secret;
use openidconnect::core::{CoreAuthPrompt, CoreAuthenticationFlow};
use openidconnect::{
    AuthUrl, AuthorizationCode, CsrfToken, EndpointState, Nonce, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, RequestTokenError, Scope,
};

use super::token::{LoginClient, RawTokenResponse};
use super::{browser, callback, token_error, LoginContext, LoginError, LoginOutcome, LoginUi};

pub(super) async fn code_flow(
    ctx: &LoginContext<'_>,
    client: LoginClient,
    open_browser: bool,
    ui: &mut dyn LoginUi,
) -> Result<LoginOutcome, LoginError> {
    let auth_url = ctx
        .discovered
        .endpoints
        .authorization
        .clone()
        .unwrap_or_default();
    let auth_url = AuthUrl::new(auth_url)
        .map_err(|e| LoginError::Unsupported(format!("authorization endpoint URL: {e}")))?;
    // Bound before the URL exists, so the port in the URL is ours. Dropped on
    // every return path (and when this future is dropped): no leaked port.
    let listener = callback::CallbackListener::bind()
        .await
        .map_err(LoginError::Listener)?;
    let redirect = RedirectUrl::new(listener.redirect_uri())
        .map_err(|e| LoginError::Usage(format!("redirect URI: {e}")))?;
    let client = client.set_auth_uri(auth_url).set_redirect_uri(redirect);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, state, nonce) = client
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .add_scopes(ctx.scopes.iter().cloned().map(Scope::new))
        .set_pkce_challenge(challenge)
        .add_prompt(CoreAuthPrompt::Consent)
        .url();
    ui.show_url(url.as_str());
    if open_browser {
        if let Err(e) = browser::open(url.as_str()) {
            ui.notice(&format!(
                "could not start a browser ({e}); open the URL above yourself"
            ));
        }
    }
    let expected = callback::ExpectedIssuer {
        issuer: &ctx.discovered.issuer,
        required: ctx.discovered.iss_parameter_supported,
    };
    let timeout = ctx.opts.timeout;
    let (code, reply) =
        tokio::time::timeout(timeout, listener.wait(&state, expected, &ctx.opts.tasks))
            .await
            .map_err(|_| LoginError::TimedOut {
                after: timeout,
                what: "no redirect reached the loopback listener",
            })??;
    drop(listener);
    // The browser waits (at most `HOLD_LIMIT`) for the outcome of this part.
    let result = async {
        let response = exchange_code(ctx, &client, &code, &verifier).await?;
        ctx.accept(response, Some(&nonce)).await
    }
    .await;
    reply.finish(ctx.page(&result));
    result
}

/// Redeems the authorization code, with each client authentication method to
/// try. The server refuses a client before it looks at the code, so after an
/// `invalid_client` the code is still good for the other method.
async fn exchange_code(
    ctx: &LoginContext<'_>,
    client: &LoginClient<openidconnect::EndpointSet>,
    code: &Secret,
    verifier: &PkceCodeVerifier,
) -> Result<RawTokenResponse, LoginError> {
    let attempts = ctx.attempts(EndpointKind::Token);
    for (i, method) in attempts.iter().enumerate() {
        let prepared = ctx.prepare(*method)?;
        let configured = with_client_auth(&prepared, client.clone());
        let mut request = configured
            .exchange_code(AuthorizationCode::new(code.expose().to_owned()))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.secret().clone()));
        for (name, value) in prepared.extra_params() {
            request = request.add_extra_param(name, value);
        }
        match request.request_async(ctx.http).await {
            Ok(response) => {
                if i > 0 {
                    ctx.detected(*method);
                }
                return Ok(response);
            }
            Err(RequestTokenError::ServerResponse(r))
                if r.error().as_ref() == "invalid_client" && i + 1 < attempts.len() => {}
            Err(e) => return Err(ctx.client_error(token_error(e))),
        }
    }
    Err(LoginError::Usage(
        "no client authentication method to try".into(),
    ))
}

/// Sets `prepared`'s secret and auth style on a login client.
pub(super) fn with_client_auth<A: EndpointState, D: EndpointState, T: EndpointState>(
    prepared: &Prepared,
    client: LoginClient<A, D, T>,
) -> LoginClient<A, D, T> {
    match prepared.secret_and_style() {
        Some((secret, style)) => client.set_client_secret(secret).set_auth_type(style),
        None => client,
    }
}
