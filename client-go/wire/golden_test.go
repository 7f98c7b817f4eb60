package wire

import (
	"bytes"
	"encoding/hex"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
)

func str(s string) *string                      { return &s }
func u64(v uint64) *uint64                      { return &v }
func auth(m ClientAuthMethod) *ClientAuthMethod { return &m }
func lifetime(s LifetimeSource) *LifetimeSource { return &s }

func sampleToken() Token {
	return Token{AccessToken: "at", TokenType: "Bearer", ExpiresAt: 1_700_000_600, IssuedAt: 1_700_000_000, Generation: 3, Scopes: []string{"openid"}}
}

func sampleProfile() ProfileStatus {
	return ProfileStatus{
		Name: "p", Issuer: "https://i", ClientID: "c", Subject: str("s"), State: StateValid,
		AccessTokenExpiresAt: u64(9), Generation: 1, RefreshCount: 2, RefreshFailures: 0,
		NextRefreshAt: u64(8), LifetimeSource: lifetime(LifetimeJWTExp),
	}
}

func req(id uint64, r Request) ClientMessage { return &RequestFrame{ID: id, Request: r} }

func ok(id uint64, r Response) ServerMessage { return &ResponseFrame{ID: id, Response: r} }

func fail(id uint64, e BrokerError) ServerMessage { return &ResponseFrame{ID: id, Err: &e} }

// clientSamples and serverSamples mirror samples() in
// protocol/src/codec/tests.rs, by file name in protocol/testdata.
func clientSamples() map[string]ClientMessage {
	return map[string]ClientMessage{
		"hello":              &Hello{ProtocolVersion: 2, ClientName: "c", ClientVersion: "1"},
		"request_get_token":  req(1, &GetToken{Profile: "p", MinValidSecs: 60}),
		"request_invalidate": req(2, &Invalidate{Profile: "p", Generation: 3}),
		"request_watch":      req(3, &Watch{Profile: "p"}),
		"request_status":     req(4, &Status{}),
		"request_import": req(5, &ImportRequest{
			Profile: "p", Issuer: "https://i", ClientID: "c",
			Credential: ClientCredential{Kind: CredentialSecret, Value: "s"},
			ClientAuth: auth(AuthClientSecretPost), Scopes: []string{"openid"},
			Endpoints:     EndpointOverrides{Revocation: str("r")},
			TokenResponse: "{}",
		}),
		"request_import_public": req(14, &ImportRequest{
			Profile: "p", Issuer: "https://i", ClientID: "c",
			Credential: ClientCredential{Kind: CredentialNone},
			ClientAuth: auth(AuthNone), Scopes: []string{},
			Endpoints:     EndpointOverrides{Token: str("t"), DeviceAuthorization: str("d")},
			TokenResponse: "{}",
		}),
		"request_logout":   req(6, &Logout{Profile: "p", Revoke: true}),
		"request_refresh":  req(7, &Refresh{Profile: "p"}),
		"request_unlock":   req(8, &Unlock{Passphrase: "pw"}),
		"request_lock":     req(9, &Lock{}),
		"request_shutdown": req(10, &Shutdown{}),
		"request_ping":     req(11, &Ping{}),
		"request_set_client": req(12, &SetClientRequest{
			Profile: "p", Credential: ClientCredential{Kind: CredentialPrivateKey, Value: "k"},
		}),
		"request_set_client_basic": req(15, &SetClientRequest{
			Profile: "p", Credential: ClientCredential{Kind: CredentialSecret, Value: "s"},
			ClientAuth: auth(AuthClientSecretBasic),
		}),
		"request_status_page": req(13, &StatusPage{After: "p"}),
	}
}

func serverSamples() map[string]ServerMessage {
	tok := sampleToken()
	broker := BrokerStatus{Version: "0", PID: 7, UptimeSecs: 5, Socket: "/s", StateDir: "/d", Connections: 1, HandshakeTimeouts: 2}
	lastPage := broker
	lastPage.Locked, lastPage.RejectedPeers, lastPage.HandshakeTimeouts = true, 3, 0
	p1 := sampleProfile()
	p1.State, p1.Subject, p1.LifetimeSource, p1.LastError = StateClientRejected, nil, lifetime(LifetimeDefault), str("e")
	p2 := sampleProfile()
	p2.Name, p2.State, p2.LifetimeSource = "q", StateError, lifetime(LifetimeExpiresIn)
	p3 := sampleProfile()
	p3.Name, p3.State, p3.AccessTokenExpiresAt, p3.LifetimeSource = "r", StateLocked, nil, nil
	return map[string]ServerMessage{
		"welcome":           &Welcome{ProtocolVersion: 2, BrokerVersion: "0", PID: 7},
		"response_token":    ok(1, &tok),
		"response_watching": ok(2, &Watching{}),
		"response_status": ok(3, &StatusReport{
			Broker: broker, Profiles: []ProfileStatus{sampleProfile()}, NextAfter: str("p"),
		}),
		"response_status_last_page": ok(16, &StatusReport{
			Broker: lastPage, Profiles: []ProfileStatus{p1, p2, p3},
		}),
		"response_imported":                  ok(4, &Imported{Profile: sampleProfile()}),
		"response_logged_out":                ok(5, &LoggedOut{RevokeError: str("x")}),
		"response_done":                      ok(6, &Done{}),
		"response_pong":                      ok(7, &Pong{}),
		"error_reauth_required":              fail(8, BrokerError{Kind: ErrReauthRequired, Profile: "p", Message: "m"}),
		"error_unknown_profile":              fail(9, BrokerError{Kind: ErrUnknownProfile, Profile: "p"}),
		"error_idp_unavailable":              fail(10, BrokerError{Kind: ErrIdpUnavailable, RetryAfterSecs: 4, Detail: "d"}),
		"error_locked":                       fail(11, BrokerError{Kind: ErrLocked}),
		"error_bad_request":                  fail(12, BrokerError{Kind: ErrBadRequest, Detail: "b"}),
		"error_internal":                     fail(13, BrokerError{Kind: ErrInternal, Detail: "i"}),
		"error_client_rejected":              fail(14, BrokerError{Kind: ErrClientRejected, Profile: "p", Message: "m"}),
		"error_version_mismatch_in_response": fail(15, BrokerError{Kind: ErrVersionMismatch, Broker: 2, Client: 1}),
		"connection_error_version_mismatch":  &ErrorFrame{Err: &BrokerError{Kind: ErrVersionMismatch, Broker: 1, Client: 2}},
		"connection_error_bad_request":       &ErrorFrame{Err: &BrokerError{Kind: ErrBadRequest, Detail: "malformed Hello"}},
		"event_token":                        &EventFrame{ID: 3, Event: &TokenEvent{Profile: "p", Token: tok}},
		"event_state":                        &EventFrame{ID: 3, Event: &StateEvent{Profile: "p", State: StateBackoff, Generation: 3}},
		"event_state_client_rejected":        &EventFrame{ID: 3, Event: &StateEvent{Profile: "p", State: StateClientRejected, Generation: 4, ExpiresAt: u64(9)}},
		"event_reauth_required":              &EventFrame{ID: 3, Event: &ReauthEvent{Profile: "p", Message: "m"}},
		"event_removed":                      &EventFrame{ID: 3, Event: &RemovedEvent{Profile: "p"}},
		"event_client_rejected":              &EventFrame{ID: 3, Event: &ClientRejectedEvent{Profile: "p", Message: "m"}},
	}
}

// readGolden parses protocol/testdata/<name>.hex: '#' starts a comment,
// whitespace is ignored.
func readGolden(t *testing.T, path string) []byte {
	t.Helper()
	text, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading golden frame: %v", err)
	}
	var digits strings.Builder
	for _, line := range strings.Split(string(text), "\n") {
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		digits.WriteString(strings.Join(strings.Fields(line), ""))
	}
	b, err := hex.DecodeString(digits.String())
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return b
}

func testdataDir() string { return filepath.Join("..", "..", "protocol", "testdata") }

func TestGoldenFramesMatchTestdata(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(testdataDir(), "*.hex"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden frames in %s (%v)", testdataDir(), err)
	}
	clients, servers := clientSamples(), serverSamples()
	seen := map[string]bool{}
	for _, path := range files {
		name := strings.TrimSuffix(filepath.Base(path), ".hex")
		seen[name] = true
		want := readGolden(t, path)
		var got []byte
		var back interface{}
		var sample interface{}
		var err error
		if m, ok := clients[name]; ok {
			sample = m
			if got, err = EncodeClientFrame(m); err == nil {
				back, err = DecodeClient(want[4:])
			}
		} else if m, ok := servers[name]; ok {
			sample = m
			if got, err = EncodeServerFrame(m); err == nil {
				back, err = DecodeServer(want[4:])
			}
		} else {
			t.Errorf("testdata/%s.hex has no Go sample", name)
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s: encoded\n  got  %x\n  want %x", name, got, want)
		}
		if !reflect.DeepEqual(back, sample) {
			t.Errorf("%s: decoded %#v, want %#v", name, back, sample)
		}
	}
	var missing []string
	for name := range clients {
		if !seen[name] {
			missing = append(missing, name)
		}
	}
	for name := range servers {
		if !seen[name] {
			missing = append(missing, name)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("Go samples without a testdata file: %v", missing)
	}
}

func TestMalformedPayloadsAreRefused(t *testing.T) {
	ping, _ := EncodeClientFrame(&RequestFrame{ID: 1, Request: &Ping{}})
	payload := ping[4:]
	cases := map[string][]byte{
		"empty":           {},
		"trailing byte":   append(append([]byte{}, payload...), 0),
		"unknown request": func() []byte { b := append([]byte{}, payload...); b[12] = 200; return b }(),
		"truncated":       payload[:10],
	}
	for name, b := range cases {
		if _, err := DecodeClient(b); err == nil {
			t.Errorf("%s: decoded", name)
		}
	}
	// A string length of 2^64-1 inside a small frame fails without allocating.
	watch, _ := EncodeClientFrame(&RequestFrame{ID: 1, Request: &Watch{Profile: "p"}})
	w := append([]byte{}, watch[4:]...)
	for i := 16; i < 24; i++ {
		w[i] = 0xff
	}
	if _, err := DecodeClient(w); err == nil {
		t.Error("huge string length decoded")
	}
	// Invalid bool, Option tag and UTF-8 in server messages.
	logged, _ := EncodeServerFrame(ok(5, &LoggedOut{RevokeError: str("x")}))
	bad := append([]byte{}, logged[4:]...)
	bad[20] = 2 // revoked
	if _, err := DecodeServer(bad); err == nil {
		t.Error("bool 2 decoded")
	}
	bad = append([]byte{}, logged[4:]...)
	bad[21] = 7 // Option tag
	if _, err := DecodeServer(bad); err == nil {
		t.Error("Option tag 7 decoded")
	}
	bad = append([]byte{}, logged[4:]...)
	bad[len(bad)-1] = 0xff
	if _, err := DecodeServer(bad); err == nil {
		t.Error("invalid UTF-8 decoded")
	}
}

func TestFramesOverTheCapAreRefused(t *testing.T) {
	if _, err := EncodeClientFrame(&RequestFrame{ID: 1, Request: &Watch{Profile: strings.Repeat("x", MaxFrameLen)}}); err != ErrTooLarge {
		t.Fatalf("encoding an oversized message: %v", err)
	}
	head := []byte{0, 1, 0, 1}
	if _, err := ReadFrame(bytes.NewReader(head)); err == nil {
		t.Fatal("a 65537-byte prefix was accepted")
	}
	exact := append([]byte{0, 1, 0, 0}, make([]byte, MaxFrameLen)...)
	if p, err := ReadFrame(bytes.NewReader(exact)); err != nil || len(p) != MaxFrameLen {
		t.Fatalf("a frame of exactly the cap: %d bytes, %v", len(p), err)
	}
}
