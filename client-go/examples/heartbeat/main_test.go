package main

import (
	"bytes"
	"context"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"example.invalid/kontext-broker/client-go/broker"
)

// dyingSource serves a token for the first good calls, then the reauth error.
type dyingSource struct{ good int }

const reauthMessage = "Session expired, run `kontext login` to re-authenticate"

func (s *dyingSource) Token(context.Context) (broker.Token, error) {
	if s.good > 0 {
		s.good--
		return broker.Token{AccessToken: "at", Generation: 1}, nil
	}
	return broker.Token{}, &broker.ReauthRequiredError{Profile: "default", Message: reauthMessage}
}

func (s *dyingSource) Invalidate(ctx context.Context, _ broker.Token) (broker.Token, error) {
	return s.Token(ctx)
}

func TestTheReauthMessageIsLoggedOnce(t *testing.T) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer backend.Close()
	var logs bytes.Buffer
	b := &beater{
		url:    backend.URL,
		client: &http.Client{Transport: &broker.BearerTransport{Source: &dyingSource{good: 3}}},
		log:    log.New(&logs, "", 0),
	}
	for i := 0; i < 20; i++ {
		b.beat(context.Background())
	}
	if b.report.Sent != 20 || b.report.OK != 3 || len(b.report.Failures) != 17 {
		t.Fatalf("report %+v", b.report)
	}
	if n := strings.Count(logs.String(), reauthMessage); n != 1 {
		t.Fatalf("the reauth message was logged %d times:\n%s", n, logs.String())
	}
}
