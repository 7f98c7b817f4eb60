package broker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// foreignUID is the uid the squatter runs as (nobody).
const foreignUID = 65534

// squat is the child process's body: listen at path, say "ready", accept one
// connection, and report how many bytes the client sent before closing.
func squat(path string) {
	l, err := net.Listen("unix", path)
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	fmt.Println("ready")
	c, err := l.Accept()
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	_ = c.SetReadDeadline(time.Now().Add(waitLimit))
	n, err := io.Copy(io.Discard, c)
	fmt.Println("bytes", n, err)
}

func TestDialRefusesASquattedSocket(t *testing.T) {
	if os.Geteuid() != 0 {
		need(t, "root, to run a squatter as another uid")
	}
	// The squatter runs a copy of this test binary: the original may sit in
	// a directory other users cannot enter.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	binDir, err := os.MkdirTemp("", "kbsq")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(binDir)
	data, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(binDir, "squatter")
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	sockDir := filepath.Join(binDir, "run")
	if err := os.Mkdir(sockDir, 0o777); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{binDir, sockDir} {
		if err := os.Chmod(d, map[bool]os.FileMode{true: 0o755, false: 0o777}[d == binDir]); err != nil {
			t.Fatal(err)
		}
	}
	socket := filepath.Join(sockDir, "broker.sock")

	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "KONTEXT_GO_SQUATTER="+socket)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: foreignUID, Gid: foreignUID}}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting the squatter: %v", err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	lines := bufio.NewScanner(out)
	if !lines.Scan() || lines.Text() != "ready" {
		t.Fatalf("squatter: %q %v", lines.Text(), lines.Err())
	}

	// 1. The socket file belongs to uid 65534: refused before connecting.
	_, err = Dial(context.Background(), Options{Socket: socket})
	var rejected *PeerRejectedError
	if !errors.As(err, &rejected) || !strings.Contains(err.Error(), "owned by uid 65534") {
		t.Fatalf("a socket owned by another uid: %v", err)
	}

	// 2. The file is made ours, but the process serving it is still not:
	// the peer check refuses after connecting, before writing a byte.
	if err := os.Lchown(socket, 0, 0); err != nil {
		t.Fatal(err)
	}
	_, err = Dial(context.Background(), Options{Socket: socket})
	if !errors.As(err, &rejected) || !strings.Contains(err.Error(), "runs as uid 65534") {
		t.Fatalf("a peer of another uid: %v", err)
	}
	if !lines.Scan() {
		t.Fatalf("squatter report: %v", lines.Err())
	}
	if got := lines.Text(); got != "bytes 0 <nil>" {
		t.Fatalf("the squatter received something: %q", got)
	}
}
