package broker

import (
	"context"
	crand "crypto/rand"
	"encoding/binary"
	"errors"
	"log"
	"math/rand"
	"sync"
	"sync/atomic"
	"time"

	"example.invalid/kontext-broker/client-go/wire"
)

// Reconnect timing of TokenSource.
const (
	backoffStart    = 50 * time.Millisecond
	backoffMax      = 2 * time.Second
	healthyWatch    = 10 * time.Second
	reconnectSpread = 100 * time.Millisecond
	// restartGrace is how long a call waits for a restarting broker before it
	// reports the broker gone.
	restartGrace = 3 * time.Second
)

// DefaultMaxMargin is the most validity a cached token must have left to be
// served without asking the broker (capped at a tenth of its lifetime).
const DefaultMaxMargin = 30 * time.Second

// SourceOptions configure a TokenSource. The zero value serves profile
// "default" from the default socket.
type SourceOptions struct {
	// Profile to serve (default "default").
	Profile string
	// Dial options: socket, timeouts, client name.
	Dial Options
	// MaxMargin: a cached token is served while more than
	// min(MaxMargin, lifetime/10) of it is left (default 30 s).
	MaxMargin time.Duration
	// Clock is the wall clock freshness is judged by (default SystemClock).
	Clock Clock
	// Logf logs the reauth message once per episode and nothing else
	// (default log.Printf; never passed a token).
	Logf func(format string, args ...interface{})
}

// cacheState is what a TokenSource knows, swapped as a whole.
type cacheState struct {
	token Token
	has   bool
	// freshUntil is unix nanoseconds: wall-clock, so a suspend that stops
	// the monotonic clock cannot make an expired token look fresh.
	freshUntil int64
	reauth     *ReauthRequiredError
}

var emptyCache = &cacheState{}

// TokenSource serves one profile's access token from memory. A background
// goroutine holds a Watch on the broker and swaps in every pushed token, so
// Token is an atomic load and a clock read while the token is fresh: no IPC,
// no syscall, no allocation. When the cached token is stale or missing it asks
// the broker (GetToken). After a broker restart it reconnects with jittered
// backoff (50 ms doubling to 2 s). A reauth error is sticky and answered
// without IPC until the broker pushes a new token; it is logged once.
type TokenSource struct {
	profile   string
	dial      Options
	maxMargin time.Duration
	clock     Clock
	logf      func(string, ...interface{})

	cache atomic.Value // *cacheState

	changeMu sync.Mutex
	changed  chan struct{} // closed and replaced on every change

	connMu sync.Mutex
	conn   *Conn

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	rng    *rand.Rand // used by the watch goroutine only
}

// NewTokenSource starts a source. It does not wait for the broker, so it
// works while the broker is still starting. Call Close when done.
func NewTokenSource(opts SourceOptions) *TokenSource {
	if opts.Profile == "" {
		opts.Profile = wire.DefaultProfile
	}
	if opts.MaxMargin <= 0 {
		opts.MaxMargin = DefaultMaxMargin
	}
	if opts.Clock == nil {
		opts.Clock = SystemClock{}
	}
	if opts.Logf == nil {
		opts.Logf = log.Printf
	}
	ctx, cancel := context.WithCancel(context.Background())
	var seed [8]byte
	_, _ = crand.Read(seed[:])
	s := &TokenSource{
		profile:   opts.Profile,
		dial:      opts.Dial.withDefaults(),
		maxMargin: opts.MaxMargin,
		clock:     opts.Clock,
		logf:      opts.Logf,
		changed:   make(chan struct{}),
		ctx:       ctx,
		cancel:    cancel,
		done:      make(chan struct{}),
		rng:       rand.New(rand.NewSource(int64(binary.LittleEndian.Uint64(seed[:])))),
	}
	s.cache.Store(emptyCache)
	go s.watchLoop()
	return s
}

// Profile is the profile this source serves.
func (s *TokenSource) Profile() string { return s.profile }

// Close stops the background goroutine and closes the connection.
func (s *TokenSource) Close() error {
	s.cancel()
	s.connMu.Lock()
	if s.conn != nil {
		s.conn.Close()
	}
	s.connMu.Unlock()
	<-s.done
	return nil
}

// Changed returns a channel that is closed at the next change of the cached
// state (a pushed token, reauth, removal, or a fallback answer).
func (s *TokenSource) Changed() <-chan struct{} {
	s.changeMu.Lock()
	defer s.changeMu.Unlock()
	return s.changed
}

// CachedGeneration is the generation of the cached token, fresh or not.
func (s *TokenSource) CachedGeneration() (uint64, bool) {
	st := s.load()
	return st.token.Generation, st.has
}

func (s *TokenSource) load() *cacheState { return s.cache.Load().(*cacheState) }

func (s *TokenSource) store(st *cacheState) {
	s.cache.Store(st)
	s.notifyChanged()
}

// freshUntil is expiry minus min(maxMargin, lifetime/10), the broker's own
// margin rule, so short test lifetimes behave like real ones.
func (s *TokenSource) freshUntil(t *Token) int64 {
	lifetime := time.Duration(0)
	if t.ExpiresAt > t.IssuedAt {
		lifetime = time.Duration(t.ExpiresAt-t.IssuedAt) * time.Second
	}
	margin := lifetime / 10
	if margin > s.maxMargin {
		margin = s.maxMargin
	}
	return int64(t.ExpiresAt)*int64(time.Second) - int64(margin)
}

func (s *TokenSource) tokenState(t Token) *cacheState {
	return &cacheState{token: t, has: true, freshUntil: s.freshUntil(&t)}
}

// Token returns a token that is valid now with a margin. While the cached
// token is fresh this is a memory read. The returned value shares its scopes
// slice with the cache; do not modify it.
func (s *TokenSource) Token(ctx context.Context) (Token, error) {
	st := s.load()
	if st.reauth != nil {
		return Token{}, st.reauth
	}
	minValid := time.Duration(0)
	if st.has {
		now := s.clock.Now().UnixNano()
		if now < st.freshUntil {
			return st.token, nil
		}
		// Ask for exactly the validity our own rule wants, so the broker
		// refreshes when we would (rounded up to whole seconds).
		minValid = time.Duration(int64(st.token.ExpiresAt)*int64(time.Second) - st.freshUntil)
	}
	return s.withConn(ctx, func(c *Conn) (Token, error) {
		return c.GetToken(ctx, s.profile, minValid)
	})
}

// Invalidate reports that stale was rejected by a server and returns a newer
// token. The broker refreshes only if stale is still its current token.
func (s *TokenSource) Invalidate(ctx context.Context, stale Token) (Token, error) {
	// Stop serving the rejected token at once.
	for {
		st := s.load()
		if !st.has || st.token.Generation != stale.Generation {
			break
		}
		if s.cache.CompareAndSwap(st, emptyCache) {
			break
		}
	}
	return s.withConn(ctx, func(c *Conn) (Token, error) {
		return c.Invalidate(ctx, s.profile, stale.Generation)
	})
}

// withConn runs call on a live connection and caches what it learns. While
// the broker is gone (a restart leaves a short window with no socket), it
// retries on fresh connections for up to restartGrace instead of failing the
// caller at once.
func (s *TokenSource) withConn(ctx context.Context, call func(*Conn) (Token, error)) (Token, error) {
	var t Token
	var err error
	delay, waited := backoffStart, time.Duration(0)
	for {
		var c *Conn
		if c, err = s.client(ctx); err == nil {
			t, err = call(c)
		}
		if !brokerGone(err) || waited >= restartGrace || s.ctx.Err() != nil {
			break
		}
		timer := time.NewTimer(delay)
		select {
		case <-timer.C:
		case <-ctx.Done():
			timer.Stop()
			return Token{}, err
		case <-s.ctx.Done():
			timer.Stop()
			return Token{}, err
		}
		waited += delay
		if delay *= 2; delay > backoffMax {
			delay = backoffMax
		}
	}
	var reauth *ReauthRequiredError
	switch {
	case err == nil:
		s.storeToken(t)
	case errors.As(err, &reauth):
		s.setReauth(reauth)
	}
	return t, err
}

// storeToken caches t unless a newer generation is cached already (a slow
// fallback answer must not replace a newer pushed token).
func (s *TokenSource) storeToken(t Token) {
	next := s.tokenState(t)
	for {
		st := s.load()
		if st.has && st.token.Generation > t.Generation {
			return
		}
		if s.cache.CompareAndSwap(st, next) {
			s.notifyChanged()
			return
		}
	}
}

func (s *TokenSource) notifyChanged() {
	s.changeMu.Lock()
	close(s.changed)
	s.changed = make(chan struct{})
	s.changeMu.Unlock()
}

func (s *TokenSource) setReauth(e *ReauthRequiredError) {
	if s.load().reauth == nil {
		s.logf("kontext broker: profile %s: %s", s.profile, e.Message)
	}
	s.store(&cacheState{reauth: e})
}

// brokerGone reports an error that a broker restart causes: the connection
// dropped, or nothing listens at the socket yet.
func brokerGone(err error) bool {
	var nr *NotRunningError
	return errors.Is(err, ErrDisconnected) || errors.As(err, &nr)
}

// client returns the shared live connection, dialing a new one if needed.
func (s *TokenSource) client(ctx context.Context) (*Conn, error) {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	if s.ctx.Err() != nil {
		return nil, ErrDisconnected
	}
	if s.conn != nil && s.conn.Err() == nil {
		return s.conn, nil
	}
	c, err := Dial(ctx, s.dial)
	if err != nil {
		return nil, err
	}
	s.conn = c
	return c, nil
}

func (s *TokenSource) apply(ev WatchEvent) {
	switch ev := ev.(type) {
	case *wire.TokenEvent:
		// A push is authoritative: it also ends a sticky reauth.
		s.store(s.tokenState(ev.Token))
	case *wire.ReauthEvent:
		s.setReauth(&ReauthRequiredError{Profile: ev.Profile, Message: ev.Message})
	case *wire.RemovedEvent:
		s.store(emptyCache)
	}
	// State and ClientRejected: the broker keeps serving the current token
	// while it is valid, and GetToken reports the rest.
}

// jitter is a random duration in [0, max).
func (s *TokenSource) jitter(max time.Duration) time.Duration {
	if max <= 0 {
		return 0
	}
	return time.Duration(s.rng.Int63n(int64(max)))
}

func (s *TokenSource) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-s.ctx.Done():
		return false
	}
}

// watchLoop keeps a Watch open, reconnecting with backoff, and applies
// every pushed event to the cache.
func (s *TokenSource) watchLoop() {
	defer close(s.done)
	backoff := backoffStart
	for s.ctx.Err() == nil {
		c, err := s.client(s.ctx)
		var w *Watcher
		if err == nil {
			w, err = c.Watch(s.ctx, s.profile)
		}
		if err == nil {
			since := time.Now()
			for {
				ev, err := w.Next(s.ctx)
				if err != nil {
					break
				}
				s.apply(ev)
			}
			if time.Since(since) >= healthyWatch {
				// A subscription that lived a while ended: the broker probably
				// restarted, and every sidecar of this user sees it at the
				// same moment, so spread the reconnects a little.
				backoff = backoffStart
				if !s.sleep(s.jitter(reconnectSpread)) {
					return
				}
				continue
			}
		} else {
			var reauth *ReauthRequiredError
			if errors.As(err, &reauth) {
				s.setReauth(reauth)
			}
		}
		// "Equal jitter": half the delay fixed, half random.
		if !s.sleep(backoff/2 + s.jitter(backoff/2)) {
			return
		}
		if backoff *= 2; backoff > backoffMax {
			backoff = backoffMax
		}
	}
}
