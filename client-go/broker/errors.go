package broker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"example.invalid/kontext-broker/client-go/wire"
)

// ErrDisconnected means the connection closed before the answer arrived.
var ErrDisconnected = errors.New("connection to the broker was lost; it may be restarting, retry or check `broker-ctl status`")

// ErrTimeout means the broker did not answer in time. errors.Is(ErrTimeout,
// context.DeadlineExceeded) is true.
var ErrTimeout error = timeoutError{}

type timeoutError struct{}

func (timeoutError) Error() string {
	return "broker did not answer in time; check it with `broker-ctl status` or restart it"
}

func (timeoutError) Is(target error) bool { return target == context.DeadlineExceeded }

// ErrLocked means the broker's store is locked.
var ErrLocked = errors.New("broker is locked; run `broker-ctl unlock`")

// NotRunningError means nothing listens at the socket path.
type NotRunningError struct{ Path string }

func (e *NotRunningError) Error() string {
	return "broker not running at " + e.Path + "; start it with `kontext-broker`"
}

// PeerRejectedError means the socket or the process serving it belongs to
// another user. Nothing was sent.
type PeerRejectedError struct {
	Path   string
	Reason string
}

func (e *PeerRejectedError) Error() string { return e.Reason + "; refusing to send credentials" }

// ReauthRequiredError means the refresh token is dead and a human must log in
// again. Message is the broker's instruction, e.g. "Session expired, run
// `kontext login` to re-authenticate".
type ReauthRequiredError struct {
	Profile string
	Message string
}

func (e *ReauthRequiredError) Error() string { return e.Message }

// ClientRejectedError means the IdP rejected the client's credential (not the
// grant). Message names the issuer, the client and the fix.
type ClientRejectedError struct {
	Profile string
	Message string
}

func (e *ClientRejectedError) Error() string { return e.Message }

// UnavailableError means the IdP is unreachable and no valid token is cached.
type UnavailableError struct {
	RetryAfter time.Duration
	Detail     string
}

func (e *UnavailableError) Error() string {
	return fmt.Sprintf("identity provider unavailable (%s); the broker retries in %ds", e.Detail, int64(e.RetryAfter/time.Second))
}

// UnknownProfileError means the broker has no profile of that name.
type UnknownProfileError struct{ Profile string }

func (e *UnknownProfileError) Error() string {
	return "unknown profile `" + e.Profile + "`; list profiles with `broker-ctl status`"
}

// VersionMismatchError means client and broker speak different protocol versions.
type VersionMismatchError struct{ Broker, Client uint32 }

func (e *VersionMismatchError) Error() string {
	return fmt.Sprintf("protocol version mismatch: broker speaks %d, client speaks %d; upgrade the older side", e.Broker, e.Client)
}

// BrokerError is any other error the broker reported (bad request, internal).
type BrokerError = wire.BrokerError

// ProtocolError means the broker sent something this client cannot decode or
// did not expect.
type ProtocolError struct{ Err error }

func (e *ProtocolError) Error() string { return "broker protocol error: " + e.Err.Error() }

// Unwrap returns the cause.
func (e *ProtocolError) Unwrap() error { return e.Err }

// IsUnreachable reports whether err is a failure to reach a trustworthy broker
// (not running, refused peer, lost connection, timeout) rather than an answer.
func IsUnreachable(err error) bool {
	var nr *NotRunningError
	var pr *PeerRejectedError
	return errors.As(err, &nr) || errors.As(err, &pr) || errors.Is(err, ErrDisconnected) || errors.Is(err, ErrTimeout)
}

// fromWire maps a broker-reported error to this package's typed errors.
func fromWire(e *wire.BrokerError) error {
	switch e.Kind {
	case wire.ErrReauthRequired:
		return &ReauthRequiredError{Profile: e.Profile, Message: e.Message}
	case wire.ErrClientRejected:
		return &ClientRejectedError{Profile: e.Profile, Message: e.Message}
	case wire.ErrIdpUnavailable:
		return &UnavailableError{RetryAfter: time.Duration(e.RetryAfterSecs) * time.Second, Detail: e.Detail}
	case wire.ErrUnknownProfile:
		return &UnknownProfileError{Profile: e.Profile}
	case wire.ErrLocked:
		return ErrLocked
	case wire.ErrVersionMismatch:
		return &VersionMismatchError{Broker: e.Broker, Client: e.Client}
	default:
		return e
	}
}
