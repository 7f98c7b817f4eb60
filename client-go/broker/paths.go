package broker

import (
	"os"
	"path/filepath"
	"strconv"
)

// EnvSocket overrides the socket path.
const EnvSocket = "KONTEXT_BROKER_SOCKET"

// SocketPath is the broker's default socket path: $KONTEXT_BROKER_SOCKET if
// set and not empty, else $XDG_RUNTIME_DIR/kontext/broker.sock if that
// variable is absolute, else ${TMPDIR:-/tmp}/kontext-$UID/broker.sock (TMPDIR
// only when absolute). These are the rules of protocol/WIRE.md §1.
func SocketPath() string {
	return socketPathWith(os.Getenv, os.Geteuid())
}

func socketPathWith(getenv func(string) string, uid int) string {
	if p := getenv(EnvSocket); p != "" {
		return p
	}
	if dir := getenv("XDG_RUNTIME_DIR"); filepath.IsAbs(dir) {
		return filepath.Join(dir, "kontext", "broker.sock")
	}
	tmp := getenv("TMPDIR")
	if !filepath.IsAbs(tmp) {
		tmp = "/tmp"
	}
	return filepath.Join(tmp, "kontext-"+strconv.Itoa(uid), "broker.sock")
}
