package xoauth2

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"example.invalid/kontext-broker/client-go/broker"
	"golang.org/x/oauth2"
)

type fixedSource struct {
	tok broker.Token
	err error
}

func (f *fixedSource) Token(context.Context) (broker.Token, error) { return f.tok, f.err }

func (f *fixedSource) Invalidate(context.Context, broker.Token) (broker.Token, error) {
	return f.tok, f.err
}

func TestAnOAuth2ClientSendsTheBrokersToken(t *testing.T) {
	expires := time.Now().Add(time.Hour).Unix()
	src := &fixedSource{tok: broker.Token{AccessToken: "at-7", TokenType: "Bearer", ExpiresAt: uint64(expires), Generation: 7}}
	var got string
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = r.Header.Get("Authorization")
	}))
	defer backend.Close()
	ts := TokenSource(context.Background(), src)
	tok, err := ts.Token()
	if err != nil || !tok.Valid() || tok.Expiry.Unix() != expires {
		t.Fatalf("token: %+v, %v", tok, err)
	}
	resp, err := oauth2.NewClient(context.Background(), ts).Get(backend.URL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if got != "Bearer at-7" {
		t.Fatalf("Authorization %q", got)
	}
}

func TestTheReauthErrorReachesTheCaller(t *testing.T) {
	reauth := &broker.ReauthRequiredError{Profile: "default", Message: "Session expired, run `kontext login` to re-authenticate"}
	ts := TokenSource(context.Background(), &fixedSource{err: reauth})
	_, err := oauth2.NewClient(context.Background(), ts).Get("http://127.0.0.1:1/")
	if msg, ok := broker.IsReauthRequired(err); !ok || msg != reauth.Message {
		t.Fatalf("error %v", err)
	}
	var e *broker.ReauthRequiredError
	if !errors.As(err, &e) {
		t.Fatalf("not typed: %T", err)
	}
}
