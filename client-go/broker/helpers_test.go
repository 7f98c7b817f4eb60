package broker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"example.invalid/kontext-broker/client-go/wire"
)

// waitLimit is a safety net for conditions on a loaded machine, not a budget.
const waitLimit = 60 * time.Second

func TestMain(m *testing.M) {
	if path := os.Getenv("KONTEXT_GO_SQUATTER"); path != "" {
		squat(path)
		return
	}
	os.Exit(m.Run())
}

// need fails the test under CI and skips it elsewhere.
func need(t testing.TB, what string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("missing prerequisite under CI: %s", what)
	}
	t.Skipf("skipping: %s", what)
}

// brokerBinary is $KONTEXT_BROKER_BIN, else the workspace's debug build.
func brokerBinary(t testing.TB) string {
	t.Helper()
	bin := os.Getenv("KONTEXT_BROKER_BIN")
	if bin == "" {
		bin = filepath.Join("..", "..", "target", "debug", "kontext-broker")
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(abs); err != nil {
		need(t, fmt.Sprintf("the broker binary %s (build it with `cargo build -p kontext-broker --bins` or set KONTEXT_BROKER_BIN): %v", abs, err))
	}
	return abs
}

// syncBuffer collects a child's stderr.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// brokerProc is a real kontext-broker on a private socket and state dir.
type brokerProc struct {
	t        testing.TB
	bin      string
	socket   string
	stateDir string
	config   string
	cmd      *exec.Cmd
	exited   chan struct{}
	stderr   *syncBuffer
}

func startBroker(t testing.TB) *brokerProc {
	t.Helper()
	dir, err := os.MkdirTemp("", "kbgo")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	b := &brokerProc{
		t:        t,
		bin:      brokerBinary(t),
		socket:   filepath.Join(dir, "run", "broker.sock"),
		stateDir: filepath.Join(dir, "state"),
		config:   filepath.Join(dir, "broker.toml"),
		stderr:   &syncBuffer{},
	}
	if err := os.WriteFile(b.config, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		b.stop()
		if t.Failed() {
			t.Logf("--- broker stderr ---\n%s", b.stderr.String())
		}
	})
	b.start()
	return b
}

func (b *brokerProc) start() {
	b.t.Helper()
	cmd := exec.Command(b.bin, "--socket", b.socket, "--state-dir", b.stateDir, "--config", b.config)
	cmd.Env = append(os.Environ(), "RUST_LOG=info,kontext_broker=debug")
	cmd.Stderr = b.stderr
	if err := cmd.Start(); err != nil {
		b.t.Fatalf("starting the broker: %v", err)
	}
	b.cmd = cmd
	b.exited = make(chan struct{})
	go func() { _ = cmd.Wait(); close(b.exited) }()
	deadline := time.Now().Add(waitLimit)
	for {
		select {
		case <-b.exited:
			b.t.Fatalf("the broker exited before serving:\n%s", b.stderr.String())
		default:
		}
		c, err := Dial(context.Background(), b.opts())
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			b.t.Fatalf("the broker did not answer within %v: %v", waitLimit, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits for the exit.
func (b *brokerProc) stop() {
	if b.cmd == nil {
		return
	}
	_ = b.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.exited:
	case <-time.After(waitLimit):
		_ = b.cmd.Process.Kill()
		<-b.exited
	}
	b.cmd = nil
}

func (b *brokerProc) restart() {
	b.stop()
	b.start()
}

func (b *brokerProc) opts() Options { return Options{Socket: b.socket, ClientName: "go-test"} }

func (b *brokerProc) dial(t testing.TB) *Conn {
	t.Helper()
	c, err := Dial(context.Background(), b.opts())
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// fakeIdP is a minimal OpenID provider: discovery and a refresh-token grant
// that issues at-N / rt-N, or answers invalid_grant once made dead.
type fakeIdP struct {
	srv *httptest.Server

	mu        sync.Mutex
	ttl       int
	dead      bool
	next      int
	refreshes int
}

func newFakeIdP(t testing.TB, ttl int) *fakeIdP {
	f := &fakeIdP{ttl: ttl}
	mux := http.NewServeMux()
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]string{
			"issuer":         f.srv.URL,
			"token_endpoint": f.srv.URL + "/token",
		})
	})
	mux.HandleFunc("/token", func(w http.ResponseWriter, r *http.Request) {
		if err := r.ParseForm(); err != nil || r.PostForm.Get("grant_type") != "refresh_token" {
			http.Error(w, `{"error":"invalid_request"}`, http.StatusBadRequest)
			return
		}
		f.mu.Lock()
		f.refreshes++
		dead := f.dead
		f.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		if dead {
			w.WriteHeader(http.StatusBadRequest)
			_, _ = w.Write([]byte(`{"error":"invalid_grant","error_description":"grant request is invalid"}`))
			return
		}
		_, _ = w.Write(f.issue())
	})
	f.srv = httptest.NewServer(mux)
	t.Cleanup(f.srv.Close)
	return f
}

// issue makes the next token response.
func (f *fakeIdP) issue() []byte {
	f.mu.Lock()
	f.next++
	n, ttl := f.next, f.ttl
	f.mu.Unlock()
	body, _ := json.Marshal(map[string]interface{}{
		"access_token":  "at-" + strconv.Itoa(n),
		"token_type":    "Bearer",
		"expires_in":    ttl,
		"refresh_token": "rt-" + strconv.Itoa(n),
		"scope":         "openid offline_access",
	})
	return body
}

func (f *fakeIdP) setDead(dead bool) {
	f.mu.Lock()
	f.dead = dead
	f.mu.Unlock()
}

func (f *fakeIdP) refreshCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.refreshes
}

// importProfile imports a fresh grant of idp as profile.
func importProfile(t testing.TB, c *Conn, idp *fakeIdP, profile string) *ProfileStatus {
	t.Helper()
	st, err := c.Import(context.Background(), &wire.ImportRequest{
		Profile:       profile,
		Issuer:        idp.srv.URL,
		ClientID:      "kontext-cli",
		Credential:    wire.ClientCredential{Kind: wire.CredentialNone},
		Scopes:        []string{"openid", "offline_access"},
		TokenResponse: string(idp.issue()),
	})
	if err != nil {
		t.Fatalf("import: %v", err)
	}
	return st
}

// waitFor re-checks cond after every change of s, up to waitLimit.
func waitFor(t testing.TB, s *TokenSource, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(waitLimit)
	defer deadline.Stop()
	for {
		changed := s.Changed()
		if cond() {
			return
		}
		select {
		case <-changed:
		case <-deadline.C:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// sentBy is the number of requests the source's shared connection has written.
func sentBy(s *TokenSource) uint64 {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	if s.conn == nil {
		return 0
	}
	return s.conn.sentCount()
}
