package broker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"example.invalid/kontext-broker/client-go/wire"
)

// Version is this client's version, sent in Hello.
const Version = "0.1.0"

// Defaults for Options.
const (
	DefaultConnectTimeout = 2 * time.Second
	// DefaultRequestTimeout leaves room for one full IdP call (the broker's
	// own IdP timeout is 15 s) when GetToken has to wait for a refresh.
	DefaultRequestTimeout = 30 * time.Second
)

// Options say where and how to connect. The zero value is the default socket
// and timeouts.
type Options struct {
	// Socket is the broker's socket path; empty means SocketPath().
	Socket string
	// ClientName is sent in Hello and shown in broker logs.
	ClientName string
	// ConnectTimeout bounds connect plus handshake (default 2 s).
	ConnectTimeout time.Duration
	// RequestTimeout bounds each request unless its context ends sooner (default 30 s).
	RequestTimeout time.Duration
}

func (o Options) withDefaults() Options {
	if o.Socket == "" {
		o.Socket = SocketPath()
	}
	if o.ClientName == "" {
		o.ClientName = "kontext-broker-client-go"
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = DefaultConnectTimeout
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = DefaultRequestTimeout
	}
	return o
}

// Dial connects to the broker. Before it sends a byte it checks that the
// socket file and the process serving it belong to this process's effective
// uid; then it performs the Hello/Welcome handshake.
func Dial(ctx context.Context, opts Options) (*Conn, error) {
	opts = opts.withDefaults()
	ctx, cancel := context.WithTimeout(ctx, opts.ConnectTimeout)
	defer cancel()
	path := opts.Socket
	me := uint32(os.Geteuid())
	if err := checkSocketOwner(path, me); err != nil {
		return nil, err
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, &NotRunningError{Path: path}
		}
		if ctx.Err() != nil {
			return nil, ErrTimeout
		}
		return nil, fmt.Errorf("cannot connect to %s: %w", path, err)
	}
	uc := nc.(*net.UnixConn)
	peer, err := peerUID(uc)
	if err != nil {
		uc.Close()
		return nil, fmt.Errorf("cannot read the credentials of the process serving %s: %w", path, err)
	}
	if peer != me {
		uc.Close()
		return nil, &PeerRejectedError{Path: path, Reason: fmt.Sprintf("the process serving socket %s runs as uid %d, not you (uid %d)", path, peer, me)}
	}
	welcome, br, err := handshake(ctx, uc, opts.ClientName)
	if err != nil {
		uc.Close()
		return nil, err
	}
	return newConn(path, uc, br, welcome, opts.RequestTimeout), nil
}

func handshake(ctx context.Context, uc *net.UnixConn, name string) (*wire.Welcome, *bufio.Reader, error) {
	if deadline, ok := ctx.Deadline(); ok {
		_ = uc.SetDeadline(deadline)
	}
	hello, err := wire.EncodeClientFrame(&wire.Hello{ProtocolVersion: wire.ProtocolVersion, ClientName: name, ClientVersion: Version})
	if err != nil {
		return nil, nil, err
	}
	if _, err := uc.Write(hello); err != nil {
		return nil, nil, ioError(ctx, err)
	}
	br := bufio.NewReader(uc)
	payload, err := wire.ReadFrame(br)
	if err != nil {
		return nil, nil, ioError(ctx, err)
	}
	msg, err := wire.DecodeServer(payload)
	if err != nil {
		return nil, nil, &ProtocolError{Err: err}
	}
	_ = uc.SetDeadline(time.Time{})
	switch m := msg.(type) {
	case *wire.Welcome:
		if m.ProtocolVersion != wire.ProtocolVersion {
			return nil, nil, &VersionMismatchError{Broker: m.ProtocolVersion, Client: wire.ProtocolVersion}
		}
		return m, br, nil
	case *wire.ErrorFrame:
		return nil, nil, fromWire(m.Err)
	default:
		return nil, nil, &ProtocolError{Err: fmt.Errorf("expected Welcome, got %T", msg)}
	}
}

// ioError maps a socket failure during the handshake.
func ioError(ctx context.Context, err error) error {
	var ne net.Error
	if ctx.Err() != nil || (errors.As(err, &ne) && ne.Timeout()) {
		return ErrTimeout
	}
	return ErrDisconnected
}
