package broker

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"example.invalid/kontext-broker/client-go/wire"
)

// fakeBroker speaks the protocol on a socket of ours and answers each request
// with what answer returns (nil: no answer).
// dropConnection, returned by a fake broker's answer, closes the connection
// without an answer, as a broker that dies mid-call does.
type dropConnection struct{ wire.ServerMessage }

func fakeBroker(t *testing.T, answer func(*wire.RequestFrame) wire.ServerMessage) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kbfake")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "broker.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				for {
					payload, err := wire.ReadFrame(c)
					if err != nil {
						return
					}
					msg, err := wire.DecodeClient(payload)
					if err != nil {
						return
					}
					var out wire.ServerMessage
					switch m := msg.(type) {
					case *wire.Hello:
						out = &wire.Welcome{ProtocolVersion: wire.ProtocolVersion, BrokerVersion: "fake", PID: 1}
					case *wire.RequestFrame:
						out = answer(m)
					}
					if out == nil {
						continue
					}
					if _, drop := out.(dropConnection); drop {
						return
					}
					frame, _ := wire.EncodeServerFrame(out)
					if _, err := c.Write(frame); err != nil {
						return
					}
					if _, ok := out.(*wire.ErrorFrame); ok {
						return
					}
				}
			}()
		}
	}()
	return path
}

func TestStatusFollowsEveryPage(t *testing.T) {
	var afters []string
	path := fakeBroker(t, func(f *wire.RequestFrame) wire.ServerMessage {
		page := &wire.StatusReport{Broker: wire.BrokerStatus{Version: "fake"}}
		switch r := f.Request.(type) {
		case *wire.Status:
			next := "b"
			page.Profiles = []wire.ProfileStatus{{Name: "a"}, {Name: "b"}}
			page.NextAfter = &next
		case *wire.StatusPage:
			afters = append(afters, r.After)
			if r.After == "b" {
				next := "c"
				page.Profiles = []wire.ProfileStatus{{Name: "c"}}
				page.NextAfter = &next
			} else {
				page.Profiles = []wire.ProfileStatus{{Name: "d"}}
				page.Broker.Connections = 9
			}
		default:
			return nil
		}
		return &wire.ResponseFrame{ID: f.ID, Response: page}
	})
	c, err := Dial(context.Background(), Options{Socket: path})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	st, err := c.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range st.Profiles {
		names = append(names, p.Name)
	}
	if len(names) != 4 || names[0] != "a" || names[3] != "d" || st.NextAfter != nil || st.Broker.Connections != 9 {
		t.Fatalf("profiles %v, next %v, broker %+v", names, st.NextAfter, st.Broker)
	}
	if len(afters) != 2 || afters[0] != "b" || afters[1] != "c" {
		t.Fatalf("StatusPage afters %v", afters)
	}
}

func TestAConnectionLevelErrorFailsPendingCallsWithIt(t *testing.T) {
	path := fakeBroker(t, func(f *wire.RequestFrame) wire.ServerMessage {
		if _, ok := f.Request.(*wire.Ping); ok {
			return &wire.ErrorFrame{Err: &wire.BrokerError{Kind: wire.ErrBadRequest, Detail: "undecodable frame: x"}}
		}
		return nil
	})
	c, err := Dial(context.Background(), Options{Socket: path})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// A call whose answer never comes, then the fatal one.
	pending := make(chan error, 1)
	go func() { _, err := c.GetToken(context.Background(), "p", 0); pending <- err }()
	err = c.Ping(context.Background())
	var be *BrokerError
	if !errors.As(err, &be) || be.Kind != wire.ErrBadRequest {
		t.Fatalf("ping: %v", err)
	}
	<-c.Done()
	if err := <-pending; !errors.As(err, &be) {
		t.Fatalf("pending call: %v", err)
	}
	if err := c.Ping(context.Background()); !errors.As(err, &be) {
		t.Fatalf("a call after the close: %v", err)
	}
}

func TestVersionMismatchIsTyped(t *testing.T) {
	dir, _ := os.MkdirTemp("", "kbvm")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "s")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = wire.ReadFrame(c)
		frame, _ := wire.EncodeServerFrame(&wire.ErrorFrame{Err: &wire.BrokerError{Kind: wire.ErrVersionMismatch, Broker: 3, Client: 2}})
		_, _ = c.Write(frame)
	}()
	_, err = Dial(context.Background(), Options{Socket: path})
	var vm *VersionMismatchError
	if !errors.As(err, &vm) || vm.Broker != 3 || vm.Client != 2 {
		t.Fatalf("dial: %v", err)
	}
}

func TestSocketPathRules(t *testing.T) {
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	cases := []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{EnvSocket: "rel.sock", "XDG_RUNTIME_DIR": "/run/user/7"}, "rel.sock"},
		{map[string]string{"XDG_RUNTIME_DIR": "/run/user/7"}, "/run/user/7/kontext/broker.sock"},
		{map[string]string{"XDG_RUNTIME_DIR": "relative", "TMPDIR": "/var/tmp"}, "/var/tmp/kontext-7/broker.sock"},
		{map[string]string{EnvSocket: "", "TMPDIR": "tmp"}, "/tmp/kontext-7/broker.sock"},
	}
	for _, c := range cases {
		if got := socketPathWith(env(c.env), 7); got != c.want {
			t.Errorf("%v: %s, want %s", c.env, got, c.want)
		}
	}
}

// A broker restart drops calls and refuses connections for a moment; a
// TokenSource call that lands in that window waits for it (restartGrace)
// instead of failing. Here three calls in a row lose their connection.
func TestATokenSourceCallRidesOutABrokerRestart(t *testing.T) {
	var mu sync.Mutex
	dropped := 0
	path := fakeBroker(t, func(f *wire.RequestFrame) wire.ServerMessage {
		if _, ok := f.Request.(*wire.Invalidate); !ok {
			return nil // the watch stays unanswered
		}
		mu.Lock()
		defer mu.Unlock()
		if dropped < 3 {
			dropped++
			return dropConnection{}
		}
		return &wire.ResponseFrame{ID: f.ID, Response: &wire.Token{AccessToken: "at-2", TokenType: "Bearer", Generation: 2, IssuedAt: 1, ExpiresAt: 1 << 40}}
	})
	s := NewTokenSource(SourceOptions{Dial: Options{Socket: path}})
	defer s.Close()
	tok, err := s.Invalidate(context.Background(), Token{Generation: 1})
	if err != nil || tok.Generation != 2 {
		t.Fatalf("after three dropped calls: generation %d, %v", tok.Generation, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if dropped != 3 {
		t.Fatalf("%d calls dropped, want 3", dropped)
	}
}
