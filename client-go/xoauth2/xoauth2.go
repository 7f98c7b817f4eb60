// Package xoauth2 adapts the broker's token source to golang.org/x/oauth2,
// for code that already takes an oauth2.TokenSource (oauth2.NewClient, gRPC
// per-RPC credentials, cloud SDKs).
//
// It is its own module so that the core client stays dependency-free. In CI it
// is built in GOPATH mode against Debian's golang-golang-x-oauth2-dev.
//
// Do not wrap the result in oauth2.ReuseTokenSource: the broker's TokenSource
// already caches, and a second cache would keep serving a token after the
// broker replaced it. oauth2.Transport does not retry after a 401; prefer
// broker.BearerTransport for plain HTTP clients.
package xoauth2

import (
	"context"
	"time"

	"example.invalid/kontext-broker/client-go/broker"
	"golang.org/x/oauth2"
)

// TokenSource returns an oauth2.TokenSource that asks src for each token,
// with ctx for the (rare) calls that reach the broker.
func TokenSource(ctx context.Context, src broker.Source) oauth2.TokenSource {
	return &tokenSource{ctx: ctx, src: src}
}

type tokenSource struct {
	ctx context.Context
	src broker.Source
}

// Token implements oauth2.TokenSource. Errors are the broker package's typed
// errors (e.g. *broker.ReauthRequiredError with the message for the user).
func (t *tokenSource) Token() (*oauth2.Token, error) {
	tok, err := t.src.Token(t.ctx)
	if err != nil {
		return nil, err
	}
	return &oauth2.Token{
		AccessToken: tok.AccessToken,
		TokenType:   tok.TokenType,
		Expiry:      time.Unix(int64(tok.ExpiresAt), 0),
	}, nil
}
