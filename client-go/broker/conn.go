package broker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"example.invalid/kontext-broker/client-go/wire"
)

// Type aliases for the wire types a caller sees.
type (
	// Token is an access token as served by the broker. Treat it as read-only.
	Token = wire.Token
	// StatusReport is the broker's status (all pages merged by Conn.Status).
	StatusReport = wire.StatusReport
	// ProfileStatus describes one profile.
	ProfileStatus = wire.ProfileStatus
	// WatchEvent is a pushed event (*wire.TokenEvent, *wire.StateEvent, ...).
	WatchEvent = wire.WatchEvent
	// ImportRequest adds or replaces a profile.
	ImportRequest = wire.ImportRequest
)

type result struct {
	resp wire.Response
	err  error
}

// Conn is one multiplexed connection to the broker. It is safe for
// concurrent use: any number of calls may be in flight, each with its own id,
// and answers are routed back by id in whatever order they come.
//
// One goroutine reads and routes answers while callers write, so a Conn
// always reads while it writes, as the broker's backpressure rules require.
type Conn struct {
	path           string
	nc             *net.UnixConn
	welcome        wire.Welcome
	requestTimeout time.Duration

	nextID uint64 // atomic
	sent   uint64 // atomic: request frames written (tests count IPC with it)

	wmu sync.Mutex // one frame at a time on the socket

	mu      sync.Mutex
	calls   map[uint64]chan result
	watches map[uint64]*Watcher
	err     error // non-nil once closed
	done    chan struct{}
}

func newConn(path string, nc *net.UnixConn, br *bufio.Reader, welcome *wire.Welcome, timeout time.Duration) *Conn {
	c := &Conn{
		path:           path,
		nc:             nc,
		welcome:        *welcome,
		requestTimeout: timeout,
		calls:          make(map[uint64]chan result),
		watches:        make(map[uint64]*Watcher),
		done:           make(chan struct{}),
	}
	go c.readLoop(br)
	return c
}

// Welcome is the broker's handshake answer (its version and pid).
func (c *Conn) Welcome() wire.Welcome { return c.welcome }

// Path is the socket path this connection was made to.
func (c *Conn) Path() string { return c.path }

// Done is closed when the connection has ended.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err says why the connection ended, or nil while it is open.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close ends the connection; pending calls fail with ErrDisconnected.
func (c *Conn) Close() error {
	c.shutdown(ErrDisconnected)
	return nil
}

func (c *Conn) shutdown(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	calls, watches := c.calls, c.watches
	c.calls, c.watches = nil, nil
	close(c.done)
	c.mu.Unlock()
	c.nc.Close()
	for _, ch := range calls {
		ch <- result{err: err}
	}
	for _, w := range watches {
		w.end(err)
	}
}

func (c *Conn) readLoop(br *bufio.Reader) {
	for {
		payload, err := wire.ReadFrame(br)
		if err != nil {
			var tooLarge *wire.FrameTooLargeError
			if errors.As(err, &tooLarge) {
				c.shutdown(&ProtocolError{Err: err})
			} else {
				c.shutdown(ErrDisconnected)
			}
			return
		}
		msg, err := wire.DecodeServer(payload)
		if err != nil {
			c.shutdown(&ProtocolError{Err: err})
			return
		}
		switch m := msg.(type) {
		case *wire.ResponseFrame:
			c.route(m)
		case *wire.EventFrame:
			c.mu.Lock()
			w := c.watches[m.ID]
			c.mu.Unlock()
			if w != nil {
				w.push(m.Event)
			}
		case *wire.ErrorFrame:
			// The connection-level error: the broker closes next.
			c.shutdown(fromWire(m.Err))
			return
		default:
			c.shutdown(&ProtocolError{Err: fmt.Errorf("unexpected %T after the handshake", msg)})
			return
		}
	}
}

func (c *Conn) route(m *wire.ResponseFrame) {
	r := result{resp: m.Response}
	if m.Err != nil {
		r = result{err: fromWire(m.Err)}
	}
	c.mu.Lock()
	ch := c.calls[m.ID]
	delete(c.calls, m.ID)
	if r.err != nil {
		// A refused Watch gets no events.
		delete(c.watches, m.ID)
	}
	c.mu.Unlock()
	if ch != nil {
		ch <- r
	}
}

// register reserves an id for a call (and, for a Watch, its event queue).
func (c *Conn) register(w *Watcher) (uint64, chan result, error) {
	id := atomic.AddUint64(&c.nextID, 1)
	ch := make(chan result, 1)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, nil, c.err
	}
	c.calls[id] = ch
	if w != nil {
		w.id = id
		c.watches[id] = w
	}
	return id, ch, nil
}

func (c *Conn) forget(id uint64) {
	c.mu.Lock()
	if c.calls != nil {
		delete(c.calls, id)
		delete(c.watches, id)
	}
	c.mu.Unlock()
}

// send writes one request frame. A write that fails or times out part-way
// would leave half a frame on the wire, so it ends the connection.
func (c *Conn) send(ctx context.Context, id uint64, req wire.Request) error {
	frame, err := wire.EncodeClientFrame(&wire.RequestFrame{ID: id, Request: req})
	if err != nil {
		return &BrokerError{Kind: wire.ErrBadRequest, Detail: err.Error()}
	}
	c.wmu.Lock()
	deadline, _ := ctx.Deadline()
	_ = c.nc.SetWriteDeadline(deadline)
	_, err = c.nc.Write(frame)
	c.wmu.Unlock()
	for i := range frame {
		frame[i] = 0 // it may hold a secret
	}
	if err != nil {
		if ctx.Err() == nil {
			// The broker closed its end. Its reason (a closing error frame) may
			// still be on its way to the reader: let the reader end the
			// connection with it, for at most a second.
			t := time.NewTimer(time.Second)
			select {
			case <-c.done:
			case <-t.C:
			}
			t.Stop()
		}
		c.shutdown(ErrDisconnected)
		if ctx.Err() != nil {
			return ErrTimeout
		}
		return c.Err()
	}
	atomic.AddUint64(&c.sent, 1)
	return nil
}

// call sends req and waits for its answer, the context, or the request timeout.
func (c *Conn) call(ctx context.Context, req wire.Request, w *Watcher) (wire.Response, error) {
	ctx, cancel := context.WithTimeout(ctx, c.requestTimeout)
	defer cancel()
	id, ch, err := c.register(w)
	if err != nil {
		return nil, err
	}
	if err := c.send(ctx, id, req); err != nil {
		c.forget(id)
		return nil, err
	}
	select {
	case r := <-ch:
		return r.resp, r.err
	case <-ctx.Done():
		c.forget(id)
		if errors.Is(ctx.Err(), context.Canceled) {
			return nil, ctx.Err()
		}
		return nil, ErrTimeout
	}
}

func (c *Conn) tokenCall(ctx context.Context, req wire.Request) (Token, error) {
	resp, err := c.call(ctx, req, nil)
	if err != nil {
		return Token{}, err
	}
	t, ok := resp.(*wire.Token)
	if !ok {
		return Token{}, unexpected("Token", resp)
	}
	return *t, nil
}

func unexpected(want string, got wire.Response) error {
	return &ProtocolError{Err: fmt.Errorf("expected %s, got %T", want, got)}
}

// GetToken returns a token valid for at least minValid more (the broker caps
// the request so a fresh token always qualifies; 0 means its own margin).
func (c *Conn) GetToken(ctx context.Context, profile string, minValid time.Duration) (Token, error) {
	secs := uint64(0)
	if minValid > 0 {
		secs = uint64((minValid + time.Second - 1) / time.Second)
	}
	return c.tokenCall(ctx, &wire.GetToken{Profile: profile, MinValidSecs: secs})
}

// Invalidate reports that the token of generation was rejected by a server
// and returns a newer token. The broker refreshes only if generation is still
// its current one; otherwise it answers with its current token.
func (c *Conn) Invalidate(ctx context.Context, profile string, generation uint64) (Token, error) {
	return c.tokenCall(ctx, &wire.Invalidate{Profile: profile, Generation: generation})
}

// Refresh makes the broker refresh now and returns the new token.
func (c *Conn) Refresh(ctx context.Context, profile string) (Token, error) {
	return c.tokenCall(ctx, &wire.Refresh{Profile: profile})
}

// Ping checks that the broker answers.
func (c *Conn) Ping(ctx context.Context) error {
	resp, err := c.call(ctx, &wire.Ping{}, nil)
	if err != nil {
		return err
	}
	if _, ok := resp.(*wire.Pong); !ok {
		return unexpected("Pong", resp)
	}
	return nil
}

// Status returns the broker's status with every profile: it follows
// next_after through StatusPage until the last page.
func (c *Conn) Status(ctx context.Context) (*StatusReport, error) {
	var req wire.Request = &wire.Status{}
	var all *StatusReport
	for {
		resp, err := c.call(ctx, req, nil)
		if err != nil {
			return nil, err
		}
		page, ok := resp.(*wire.StatusReport)
		if !ok {
			return nil, unexpected("Status", resp)
		}
		if all == nil {
			all = page
		} else {
			all.Broker = page.Broker
			all.Profiles = append(all.Profiles, page.Profiles...)
		}
		if page.NextAfter == nil {
			all.NextAfter = nil
			return all, nil
		}
		req = &wire.StatusPage{After: *page.NextAfter}
	}
}

// Import adds or replaces a profile from a token response obtained elsewhere.
func (c *Conn) Import(ctx context.Context, req *ImportRequest) (*ProfileStatus, error) {
	resp, err := c.call(ctx, req, nil)
	if err != nil {
		return nil, err
	}
	imported, ok := resp.(*wire.Imported)
	if !ok {
		return nil, unexpected("Imported", resp)
	}
	return &imported.Profile, nil
}

// Logout revokes the profile's refresh token at the IdP (when revoke) and deletes the profile.
func (c *Conn) Logout(ctx context.Context, profile string, revoke bool) (*wire.LoggedOut, error) {
	resp, err := c.call(ctx, &wire.Logout{Profile: profile, Revoke: revoke}, nil)
	if err != nil {
		return nil, err
	}
	out, ok := resp.(*wire.LoggedOut)
	if !ok {
		return nil, unexpected("LoggedOut", resp)
	}
	return out, nil
}

// Watch subscribes to the profile's tokens and state changes. The first event
// is the current state (the token, if one is valid). Events are queued
// without limit until read, so the connection never stalls on a slow reader.
func (c *Conn) Watch(ctx context.Context, profile string) (*Watcher, error) {
	w := &Watcher{conn: c, notify: make(chan struct{}, 1)}
	resp, err := c.call(ctx, &wire.Watch{Profile: profile}, w)
	if err != nil {
		c.forget(w.id)
		return nil, err
	}
	if _, ok := resp.(*wire.Watching); !ok {
		c.forget(w.id)
		return nil, unexpected("Watching", resp)
	}
	return w, nil
}

// Watcher receives the events of one Watch.
type Watcher struct {
	conn   *Conn
	id     uint64
	mu     sync.Mutex
	queue  []WatchEvent
	err    error
	notify chan struct{}
}

func (w *Watcher) push(ev WatchEvent) {
	w.mu.Lock()
	w.queue = append(w.queue, ev)
	w.mu.Unlock()
	w.wake()
}

func (w *Watcher) end(err error) {
	w.mu.Lock()
	if w.err == nil {
		w.err = err
	}
	w.mu.Unlock()
	w.wake()
}

func (w *Watcher) wake() {
	select {
	case w.notify <- struct{}{}:
	default:
	}
}

// Next returns the next event. After the connection ends, queued events are
// still returned, then the connection's error.
func (w *Watcher) Next(ctx context.Context) (WatchEvent, error) {
	for {
		w.mu.Lock()
		if len(w.queue) > 0 {
			ev := w.queue[0]
			w.queue[0] = nil
			w.queue = w.queue[1:]
			w.mu.Unlock()
			return ev, nil
		}
		err := w.err
		w.mu.Unlock()
		if err != nil {
			return nil, err
		}
		select {
		case <-w.notify:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// Close stops routing events to this watcher. (The protocol has no unwatch;
// the broker's subscription ends with the connection.)
func (w *Watcher) Close() {
	w.conn.forget(w.id)
	w.end(ErrDisconnected)
}

// sentCount is the number of request frames written so far.
func (c *Conn) sentCount() uint64 { return atomic.LoadUint64(&c.sent) }
