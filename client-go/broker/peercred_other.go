//go:build !linux && !darwin

package broker

import (
	"errors"
	"net"
)

// peerUID is not implemented here, so Dial refuses to send anything.
func peerUID(*net.UnixConn) (uint32, error) {
	return 0, errors.New("reading a Unix socket peer's uid is not implemented on this platform")
}
