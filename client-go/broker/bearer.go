package broker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net/http"
)

// Source is what BearerTransport needs: *TokenSource implements it.
type Source interface {
	// Token returns a token that is valid now.
	Token(ctx context.Context) (Token, error)
	// Invalidate reports that stale was rejected and returns a newer token.
	Invalidate(ctx context.Context, stale Token) (Token, error)
}

// DefaultMaxReplayBody is the largest request body kept in memory for a retry (1 MiB).
const DefaultMaxReplayBody = 1 << 20

// maxErrorBody is the largest error body read to look for a Connect code.
const maxErrorBody = 64 << 10

// BearerTransport is an http.RoundTripper that authenticates requests with a
// token from Source. It sets "Authorization: Bearer <token>". When the server
// rejects the token (HTTP 401, a "grpc-status: 16" header, or a Connect error
// body {"code":"unauthenticated"}), it invalidates that token's generation and
// retries exactly once with the fresh token and the same body. A second
// rejection is returned as it is.
//
// To replay a body it uses req.GetBody when set, else it buffers bodies of up
// to MaxReplayBody bytes. A larger body is sent as it comes, and its rejection
// is returned without a retry (the token is still invalidated, so the next
// request gets a fresh one).
type BearerTransport struct {
	// Source hands out tokens (required).
	Source Source
	// Base sends the requests (default http.DefaultTransport).
	Base http.RoundTripper
	// MaxReplayBody is the largest body buffered for a retry (default 1 MiB).
	MaxReplayBody int64
}

func (t *BearerTransport) base() http.RoundTripper {
	if t.Base != nil {
		return t.Base
	}
	return http.DefaultTransport
}

// RoundTrip implements http.RoundTripper. It never modifies req.
func (t *BearerTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	tok, err := t.Source.Token(ctx)
	if err != nil {
		closeBody(req)
		return nil, err
	}
	replay, first, err := t.replayable(req)
	if err != nil {
		return nil, err
	}
	resp, err := t.base().RoundTrip(authorized(req, tok, first))
	if err != nil {
		return nil, err
	}
	rejected, resp := isRejected(resp)
	if !rejected {
		return resp, nil
	}
	fresh, err := t.Source.Invalidate(ctx, tok)
	if err != nil {
		drain(resp)
		return nil, err
	}
	if replay == nil {
		// The body is gone; the caller's next request gets the fresh token.
		return resp, nil
	}
	body, err := replay()
	if err != nil {
		return resp, nil
	}
	drain(resp)
	return t.base().RoundTrip(authorized(req, fresh, body))
}

// replayable returns a function making a fresh copy of the body (nil when
// the body cannot be replayed) and the body for the first attempt.
func (t *BearerTransport) replayable(req *http.Request) (func() (io.ReadCloser, error), io.ReadCloser, error) {
	if req.Body == nil || req.Body == http.NoBody {
		none := func() (io.ReadCloser, error) { return req.Body, nil }
		return none, req.Body, nil
	}
	if req.GetBody != nil {
		return req.GetBody, req.Body, nil
	}
	max := t.MaxReplayBody
	if max <= 0 {
		max = DefaultMaxReplayBody
	}
	if req.ContentLength > max {
		return nil, req.Body, nil
	}
	buf, err := io.ReadAll(io.LimitReader(req.Body, max+1))
	if err != nil {
		req.Body.Close()
		return nil, nil, err
	}
	if int64(len(buf)) > max {
		// Too large to keep: send what was read, then the rest, once.
		return nil, readCloser{io.MultiReader(bytes.NewReader(buf), req.Body), req.Body}, nil
	}
	req.Body.Close()
	again := func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf)), nil }
	first, _ := again()
	return again, first, nil
}

type readCloser struct {
	io.Reader
	io.Closer
}

// authorized is a shallow copy of req with the token and body set.
func authorized(req *http.Request, tok Token, body io.ReadCloser) *http.Request {
	out := req.Clone(req.Context())
	out.Body = body
	out.Header.Set("Authorization", "Bearer "+tok.AccessToken)
	return out
}

// isRejected says whether resp rejects the token, and returns resp with its
// body intact.
func isRejected(resp *http.Response) (bool, *http.Response) {
	if resp.StatusCode == http.StatusUnauthorized {
		return true, resp
	}
	if resp.Header.Get("Grpc-Status") == "16" {
		return true, resp
	}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return false, resp
	}
	media, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if media != "application/json" || resp.ContentLength > maxErrorBody {
		return false, resp
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody+1))
	rest := resp.Body
	resp.Body = readCloser{io.MultiReader(bytes.NewReader(body), rest), rest}
	if err != nil || len(body) > maxErrorBody {
		return false, resp
	}
	var connect struct {
		Code string `json:"code"`
	}
	if json.Unmarshal(body, &connect) != nil {
		return false, resp
	}
	return connect.Code == "unauthenticated", resp
}

func drain(resp *http.Response) {
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
}

func closeBody(req *http.Request) {
	if req.Body != nil {
		req.Body.Close()
	}
}

// IsReauthRequired reports whether err (from a Source, a Conn or through a
// BearerTransport) means the user must log in again, and returns the broker's
// message for the user.
func IsReauthRequired(err error) (string, bool) {
	var e *ReauthRequiredError
	if errors.As(err, &e) {
		return e.Message, true
	}
	return "", false
}
