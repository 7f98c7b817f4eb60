//go:build linux

package broker

// Benchmarks (not run by `go test` without -bench; budgets live here, not in tests):
//
//	KONTEXT_BROKER_BIN=$PWD/../target/release/kontext-broker \
//	  go test -run '^$' -bench . -benchtime 2000000x ./broker
//
// BenchmarkTokenSourceFresh: TokenSource.Token() on a fresh cached token (ns/op,
// allocs/op, and cpu-ns/op: the calling thread's CPU time, which a loaded
// machine's descheduling does not inflate as it inflates wall-clock ns/op).
// BenchmarkTokenSourceFreshSyscalls: syscalls made by the calling thread per
// Token() call, counted by strace between two marker syscalls (needs strace).
// BenchmarkGetTokenVsEcho: a cached GetToken round trip through the real
// broker as a ratio to a raw Unix-socket echo of the same frame sizes, same run.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"example.invalid/kontext-broker/client-go/wire"
)

// freshSource is a source with a one-hour token pushed by a real broker.
func freshSource(b testing.TB) (*TokenSource, *brokerProc) {
	br := startBroker(b)
	idp := newFakeIdP(b, 3600)
	importProfile(b, br.dial(b), idp, "default")
	s := NewTokenSource(SourceOptions{Dial: br.opts()})
	b.Cleanup(func() { s.Close() })
	waitFor(b, s, "the first push", func() bool { _, ok := s.CachedGeneration(); return ok })
	return s, br
}

func BenchmarkTokenSourceFresh(b *testing.B) {
	s, _ := freshSource(b)
	ctx := context.Background()
	before := sentBy(s)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := threadCPU(b)
	for i := 0; i < b.N; i++ {
		if _, err := s.Token(ctx); err != nil {
			b.Fatal(err)
		}
	}
	cpu := threadCPU(b) - cpu0
	b.StopTimer()
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
	if sentBy(s) != before {
		b.Fatalf("%d requests while fresh", sentBy(s)-before)
	}
}

// threadCPU is the CPU time of the calling OS thread (RUSAGE_THREAD).
func threadCPU(b testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(1 /* RUSAGE_THREAD */, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// probeCalls is how many Token() calls the syscall probe makes.
const probeCalls = 1_000_000

// TestSyscallProbe is the child of BenchmarkTokenSourceFreshSyscalls: it runs
// only with KONTEXT_SYSCALL_PROBE set (the socket), under strace.
func TestSyscallProbe(t *testing.T) {
	socket := os.Getenv("KONTEXT_SYSCALL_PROBE")
	if socket == "" {
		t.Skip("the child of BenchmarkTokenSourceFreshSyscalls")
	}
	s := NewTokenSource(SourceOptions{Dial: Options{Socket: socket}})
	defer s.Close()
	waitFor(t, s, "the first push", func() bool { _, ok := s.CachedGeneration(); return ok })
	ctx := context.Background()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for i := 0; i < 1000; i++ { // warm up
		_, _ = s.Token(ctx)
	}
	tid := syscall.Gettid()
	syscall.Getppid() // marker 1: Token() loop
	start := time.Now()
	for i := 0; i < probeCalls; i++ {
		if _, err := s.Token(ctx); err != nil {
			t.Fatal(err)
		}
	}
	spent := time.Since(start)
	syscall.Getppid() // marker 2: a baseline loop of the same duration
	// The baseline does no I/O at all; whatever syscalls it shows are the Go
	// scheduler's (sysmon preempts a goroutine that runs for 10 ms, and a
	// locked thread hands its P over with futex calls).
	var sink uint64
	for start = time.Now(); time.Since(start) < spent; {
		for i := 0; i < 1000; i++ {
			sink += uint64(i)
		}
	}
	syscall.Getppid() // marker 3: end
	fmt.Printf("probe-tid %d sink %d\n", tid, sink%2)
}

func BenchmarkTokenSourceFreshSyscalls(b *testing.B) {
	strace, err := exec.LookPath("strace")
	if err != nil {
		b.Skip("strace not installed")
	}
	_, br := freshSource(b)
	exe, _ := os.Executable()
	trace := filepath.Join(b.TempDir(), "trace")
	cmd := exec.Command(strace, "-f", "-qq", "-o", trace, exe, "-test.run", "^TestSyscallProbe$", "-test.v")
	cmd.Env = append(os.Environ(), "KONTEXT_SYSCALL_PROBE="+br.socket, "GODEBUG=asyncpreemptoff=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		b.Fatalf("probe: %v\n%s", err, out)
	}
	var tid string
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "probe-tid ") {
			tid = strings.Fields(line)[1]
		}
	}
	f, err := os.Open(trace)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	markers := 0
	var counts [2]int
	var seen []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		fields := strings.SplitN(sc.Text(), " ", 2)
		if len(fields) != 2 || fields[0] != tid {
			continue
		}
		call := strings.TrimSpace(fields[1])
		if strings.HasPrefix(call, "getppid(") {
			markers++
			continue
		}
		if markers == 1 || markers == 2 {
			counts[markers-1]++
			if markers == 1 && len(seen) < 3 {
				seen = append(seen, call)
			}
		}
	}
	if markers < 3 {
		b.Fatalf("markers not found for thread %s in the trace", tid)
	}
	// strace writes an interrupted call as two lines; either way, compare.
	b.ReportMetric(float64(counts[0]), "trace-lines/1M-Token")
	b.ReportMetric(float64(counts[1]), "trace-lines/baseline")
	b.Logf("calling thread: %d trace lines during 1M Token() calls (e.g. %q), %d during a no-I/O loop of the same duration",
		counts[0], seen, counts[1])
}

func BenchmarkGetTokenVsEcho(b *testing.B) {
	br := startBroker(b)
	idp := newFakeIdP(b, 3600)
	c := br.dial(b)
	importProfile(b, c, idp, "default")
	ctx := context.Background()
	tok, err := c.GetToken(ctx, "default", 0)
	if err != nil {
		b.Fatal(err)
	}
	reqFrame, _ := wire.EncodeClientFrame(&wire.RequestFrame{ID: 1, Request: &wire.GetToken{Profile: "default"}})
	respFrame, _ := wire.EncodeServerFrame(&wire.ResponseFrame{ID: 1, Response: &tok})
	samples := b.N
	if samples < 5000 {
		samples = 5000
	}
	getToken := make([]time.Duration, 0, samples)
	for i := 0; i < samples; i++ {
		t0 := time.Now()
		if _, err := c.GetToken(ctx, "default", 0); err != nil {
			b.Fatal(err)
		}
		getToken = append(getToken, time.Since(t0))
	}
	echo := rawEcho(b, len(reqFrame), len(respFrame), samples)
	gt, ec := median(getToken), median(echo)
	b.ReportMetric(float64(gt.Nanoseconds()), "getToken-median-ns")
	b.ReportMetric(float64(ec.Nanoseconds()), "echo-median-ns")
	b.ReportMetric(float64(gt)/float64(ec), "ratio")
	b.Logf("GetToken median %v p99 %v; raw echo (%d B out, %d B back) median %v p99 %v; ratio %.2f",
		gt, p99(getToken), len(reqFrame), len(respFrame), ec, p99(echo), float64(gt)/float64(ec))
}

// rawEcho times a write of `out` bytes answered by `back` bytes over a Unix
// socket, with the server in this process.
func rawEcho(b testing.TB, out, back, samples int) []time.Duration {
	dir, _ := os.MkdirTemp("", "kbecho")
	defer os.RemoveAll(dir)
	l, err := net.Listen("unix", filepath.Join(dir, "echo.sock"))
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	go func() {
		s, err := l.Accept()
		if err != nil {
			return
		}
		defer s.Close()
		in, reply := make([]byte, out), make([]byte, back)
		for {
			if _, err := io.ReadFull(s, in); err != nil {
				return
			}
			if _, err := s.Write(reply); err != nil {
				return
			}
		}
	}()
	c, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	msg, reply := make([]byte, out), make([]byte, back)
	times := make([]time.Duration, 0, samples)
	for i := 0; i < samples; i++ {
		t0 := time.Now()
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, reply); err != nil {
			b.Fatal(err)
		}
		times = append(times, time.Since(t0))
	}
	return times
}

func median(d []time.Duration) time.Duration { return quantile(d, 0.5) }
func p99(d []time.Duration) time.Duration    { return quantile(d, 0.99) }

func quantile(d []time.Duration, q float64) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[int(float64(len(s)-1)*q)]
}
