package broker

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"example.invalid/kontext-broker/client-go/wire"
)

func TestDialHandshakeAndPing(t *testing.T) {
	b := startBroker(t)
	c := b.dial(t)
	if v := c.Welcome().ProtocolVersion; v != wire.ProtocolVersion {
		t.Fatalf("welcome version %d", v)
	}
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	var unknown *UnknownProfileError
	if _, err := c.GetToken(context.Background(), "nobody", 0); !errors.As(err, &unknown) || unknown.Profile != "nobody" {
		t.Fatalf("unknown profile: %v", err)
	}
	st, err := c.Status(context.Background())
	if err != nil || st.Broker.Connections < 1 || len(st.Profiles) != 0 {
		t.Fatalf("status: %+v, %v", st, err)
	}
}

func TestHundredConcurrentCallsShareOneConnection(t *testing.T) {
	b := startBroker(t)
	idp := newFakeIdP(t, 3600)
	c := b.dial(t)
	importProfile(t, c, idp, "default")
	before := c.sentCount()
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	gens := make(chan uint64, 100)
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if i%2 == 0 {
				errs <- c.Ping(context.Background())
				return
			}
			tok, err := c.GetToken(context.Background(), "default", 0)
			errs <- err
			gens <- tok.Generation
		}(i)
	}
	wg.Wait()
	close(errs)
	close(gens)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for g := range gens {
		if g != 1 {
			t.Fatalf("generation %d, want the imported 1", g)
		}
	}
	if n := c.sentCount() - before; n != 100 {
		t.Fatalf("%d requests written on the connection, want 100", n)
	}
	if idp.refreshCount() != 0 {
		t.Fatalf("a cached token needed %d refreshes", idp.refreshCount())
	}
}

func TestWatchPushesTheTokenOfARefresh(t *testing.T) {
	b := startBroker(t)
	idp := newFakeIdP(t, 3600)
	c := b.dial(t)
	importProfile(t, c, idp, "default")
	w, err := c.Watch(context.Background(), "default")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	first := nextToken(ctx, t, w, 0)
	refreshed, err := c.Refresh(ctx, "default")
	if err != nil {
		t.Fatal(err)
	}
	if refreshed.Generation != first.Generation+1 || refreshed.AccessToken == first.AccessToken {
		t.Fatalf("refresh gave generation %d after %d", refreshed.Generation, first.Generation)
	}
	pushed := nextToken(ctx, t, w, first.Generation)
	if pushed.Generation != refreshed.Generation || pushed.AccessToken != refreshed.AccessToken {
		t.Fatalf("pushed generation %d, refreshed %d", pushed.Generation, refreshed.Generation)
	}
}

// nextToken is the next pushed token newer than after.
func nextToken(ctx context.Context, t *testing.T, w *Watcher, after uint64) Token {
	t.Helper()
	for {
		ev, err := w.Next(ctx)
		if err != nil {
			t.Fatalf("watch: %v", err)
		}
		if te, ok := ev.(*wire.TokenEvent); ok && te.Token.Generation > after {
			return te.Token
		}
	}
}

func TestTokenSourceReconnectsAfterABrokerRestart(t *testing.T) {
	b := startBroker(t)
	idp := newFakeIdP(t, 3600)
	importProfile(t, b.dial(t), idp, "default")
	s := NewTokenSource(SourceOptions{Dial: b.opts()})
	defer s.Close()
	waitFor(t, s, "the first push", func() bool { _, ok := s.CachedGeneration(); return ok })

	b.restart()
	c := b.dial(t)
	refreshed, err := c.Refresh(context.Background(), "default")
	if err != nil {
		t.Fatal(err)
	}
	// Only a watch re-established on the new broker can deliver this push.
	waitFor(t, s, "a push from the restarted broker", func() bool {
		g, _ := s.CachedGeneration()
		return g >= refreshed.Generation
	})
	tok, err := s.Token(context.Background())
	if err != nil || tok.AccessToken != refreshed.AccessToken {
		t.Fatalf("token after restart: generation %d, %v", tok.Generation, err)
	}
}

func TestTokenSourceServesAFreshTokenWithoutIPC(t *testing.T) {
	b := startBroker(t)
	idp := newFakeIdP(t, 3600)
	importProfile(t, b.dial(t), idp, "default")
	s := NewTokenSource(SourceOptions{Dial: b.opts()})
	defer s.Close()
	waitFor(t, s, "the first push", func() bool { _, ok := s.CachedGeneration(); return ok })
	before := sentBy(s)
	for i := 0; i < 1000; i++ {
		if _, err := s.Token(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if n := sentBy(s) - before; n != 0 {
		t.Fatalf("%d requests for 1000 fresh tokens", n)
	}
}

// fakeClock is a wall clock a test moves by hand, as a suspend moves it.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func TestASuspendDoesNotMakeAnExpiredTokenLookFresh(t *testing.T) {
	b := startBroker(t)
	idp := newFakeIdP(t, 3600)
	importProfile(t, b.dial(t), idp, "default")
	// Round(0) strips the monotonic reading: freshness must be wall-clock.
	clock := &fakeClock{now: time.Now().Round(0)}
	s := NewTokenSource(SourceOptions{Dial: b.opts(), Clock: clock})
	defer s.Close()
	waitFor(t, s, "the first push", func() bool { _, ok := s.CachedGeneration(); return ok })
	before := sentBy(s)
	if _, err := s.Token(context.Background()); err != nil || sentBy(s) != before {
		t.Fatalf("fresh token: %v, %d requests", err, sentBy(s)-before)
	}
	// The laptop sleeps for two hours: the monotonic clock stood still, the
	// wall clock did not, and the one-hour token has expired.
	clock.advance(2 * time.Hour)
	if _, err := s.Token(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := sentBy(s) - before; n != 1 {
		t.Fatalf("after the suspend the source sent %d requests, want 1 (it must ask the broker)", n)
	}
	// Just before the margin (min(30 s, 360 s) before expiry) it is fresh again.
	clock.mu.Lock()
	tok := s.load().token
	clock.now = time.Unix(int64(tok.ExpiresAt), 0).Add(-31 * time.Second)
	clock.mu.Unlock()
	if _, err := s.Token(context.Background()); err != nil || sentBy(s)-before != 1 {
		t.Fatalf("31 s before expiry: %v, %d requests", err, sentBy(s)-before)
	}
	clock.advance(2 * time.Second)
	if _, err := s.Token(context.Background()); err != nil || sentBy(s)-before != 2 {
		t.Fatalf("29 s before expiry: %v, %d requests", err, sentBy(s)-before)
	}
}

func TestReauthIsStickyAndLoggedOnce(t *testing.T) {
	b := startBroker(t)
	idp := newFakeIdP(t, 3600)
	c := b.dial(t)
	importProfile(t, c, idp, "default")
	var logged []string
	var logMu sync.Mutex
	s := NewTokenSource(SourceOptions{Dial: b.opts(), Logf: func(format string, args ...interface{}) {
		logMu.Lock()
		logged = append(logged, strings.TrimSpace(sprintf(format, args...)))
		logMu.Unlock()
	}})
	defer s.Close()
	waitFor(t, s, "the first push", func() bool { _, ok := s.CachedGeneration(); return ok })

	idp.setDead(true)
	_, err := c.Refresh(context.Background(), "default")
	msg, ok := IsReauthRequired(err)
	if !ok || !strings.Contains(msg, "kontext login") {
		t.Fatalf("refresh of a dead grant: %v", err)
	}
	waitFor(t, s, "the reauth push", func() bool { return s.load().reauth != nil })
	before := sentBy(s)
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t.Errorf("a request reached the backend without a token")
	}))
	defer backend.Close()
	client := &http.Client{Transport: &BearerTransport{Source: s}}
	for i := 0; i < 50; i++ {
		_, err := s.Token(context.Background())
		if got, ok := IsReauthRequired(err); !ok || got != msg {
			t.Fatalf("call %d: %v", i, err)
		}
		_, err = client.Get(backend.URL)
		if got, ok := IsReauthRequired(err); !ok || got != msg {
			t.Fatalf("request %d: %v", i, err)
		}
	}
	if n := sentBy(s) - before; n != 0 {
		t.Fatalf("a sticky reauth sent %d requests", n)
	}
	logMu.Lock()
	defer logMu.Unlock()
	if len(logged) != 1 || !strings.Contains(logged[0], msg) {
		t.Fatalf("logged %q, want the broker's message once", logged)
	}
	if refreshes := idp.refreshCount(); refreshes != 1 {
		t.Fatalf("the IdP saw %d refreshes, want the one that found the grant dead", refreshes)
	}
}

func TestBearerTransportInvalidatesAndRetriesOnceWithTheSameBody(t *testing.T) {
	b := startBroker(t)
	idp := newFakeIdP(t, 3600)
	importProfile(t, b.dial(t), idp, "default")
	s := NewTokenSource(SourceOptions{Dial: b.opts()})
	defer s.Close()
	waitFor(t, s, "the first push", func() bool { _, ok := s.CachedGeneration(); return ok })

	type hit struct{ auth, body string }
	var mu sync.Mutex
	var hits []hit
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		auth := r.Header.Get("Authorization")
		mu.Lock()
		hits = append(hits, hit{auth, string(body)})
		mu.Unlock()
		// The backend has revoked the first token.
		if auth == "Bearer at-1" {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		w.WriteHeader(http.StatusOK)
	}))
	defer backend.Close()
	client := &http.Client{Transport: &BearerTransport{Source: s}}
	// No GetBody: the transport must buffer the body to replay it.
	req, _ := http.NewRequest(http.MethodPost, backend.URL, io.NopCloser(strings.NewReader(`{"seq":1}`)))
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	mu.Lock()
	defer mu.Unlock()
	want := []hit{{"Bearer at-1", `{"seq":1}`}, {"Bearer at-2", `{"seq":1}`}}
	if len(hits) != 2 || hits[0] != want[0] || hits[1] != want[1] {
		t.Fatalf("backend saw %q, want %q", hits, want)
	}
	if idp.refreshCount() != 1 {
		t.Fatalf("%d refreshes for one invalidation", idp.refreshCount())
	}
	if g, _ := s.CachedGeneration(); g != 2 {
		t.Fatalf("cached generation %d after the retry", g)
	}
}

// scriptedSource hands out generation N and counts invalidations, without a broker.
type scriptedSource struct {
	gen         uint64
	invalidated int32
}

func (s *scriptedSource) Token(context.Context) (Token, error) {
	return Token{AccessToken: "t" + uitoa(atomic.LoadUint64(&s.gen)), Generation: atomic.LoadUint64(&s.gen)}, nil
}

func (s *scriptedSource) Invalidate(_ context.Context, stale Token) (Token, error) {
	atomic.AddInt32(&s.invalidated, 1)
	atomic.CompareAndSwapUint64(&s.gen, stale.Generation, stale.Generation+1)
	return s.Token(context.Background())
}

func uitoa(v uint64) string { return strconv.FormatUint(v, 10) }

func TestBearerTransportRejectionKinds(t *testing.T) {
	rejections := map[string]func(w http.ResponseWriter){
		"http 401": func(w http.ResponseWriter) { w.WriteHeader(http.StatusUnauthorized) },
		"grpc-status 16": func(w http.ResponseWriter) {
			w.Header().Set("Grpc-Status", "16")
			w.WriteHeader(http.StatusOK)
		},
		"connect unauthenticated body": func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", "application/json; charset=utf-8")
			w.WriteHeader(http.StatusForbidden)
			_, _ = w.Write([]byte(`{"code":"unauthenticated","message":"token expired"}`))
		},
	}
	for name, reject := range rejections {
		for _, always := range []bool{false, true} {
			t.Run(name+map[bool]string{false: " once", true: " always"}[always], func(t *testing.T) {
				src := &scriptedSource{gen: 1}
				var bodies []string
				var auths []string
				backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					body, _ := io.ReadAll(r.Body)
					bodies = append(bodies, string(body))
					auths = append(auths, r.Header.Get("Authorization"))
					if always || r.Header.Get("Authorization") == "Bearer t1" {
						reject(w)
						return
					}
					w.WriteHeader(http.StatusOK)
				}))
				defer backend.Close()
				client := &http.Client{Transport: &BearerTransport{Source: src}}
				// http.NewRequest sets GetBody for a bytes.Reader.
				resp, err := client.Post(backend.URL, "application/json", bytes.NewReader([]byte("hello")))
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if len(bodies) != 2 || bodies[0] != "hello" || bodies[1] != "hello" {
					t.Fatalf("bodies %q, want the same body twice", bodies)
				}
				if auths[0] != "Bearer t1" || auths[1] != "Bearer t2" {
					t.Fatalf("authorization %q", auths)
				}
				if src.invalidated != 1 {
					t.Fatalf("%d invalidations", src.invalidated)
				}
				rejected := resp.StatusCode != http.StatusOK || resp.Header.Get("Grpc-Status") == "16"
				if rejected != always {
					t.Fatalf("final answer %d %v; a second rejection must be returned as is", resp.StatusCode, resp.Header)
				}
			})
		}
	}
}

func TestBearerTransportLeavesOtherErrorsAlone(t *testing.T) {
	src := &scriptedSource{gen: 1}
	calls := 0
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls++
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusForbidden)
		_, _ = w.Write([]byte(`{"code":"permission_denied"}`))
	}))
	defer backend.Close()
	client := &http.Client{Transport: &BearerTransport{Source: src}}
	resp, err := client.Get(backend.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if calls != 1 || src.invalidated != 0 || string(body) != `{"code":"permission_denied"}` {
		t.Fatalf("calls %d, invalidations %d, body %q", calls, src.invalidated, body)
	}
}

func TestBearerTransportDoesNotReplayABodyOverTheLimit(t *testing.T) {
	src := &scriptedSource{gen: 1}
	var bodies []string
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		bodies = append(bodies, string(body))
		w.WriteHeader(http.StatusUnauthorized)
	}))
	defer backend.Close()
	client := &http.Client{Transport: &BearerTransport{Source: src, MaxReplayBody: 4}}
	req, _ := http.NewRequest(http.MethodPost, backend.URL, io.NopCloser(strings.NewReader("0123456789")))
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if len(bodies) != 1 || bodies[0] != "0123456789" || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("bodies %q, status %d", bodies, resp.StatusCode)
	}
	if src.invalidated != 1 {
		t.Fatalf("the rejected token was not invalidated")
	}
}
