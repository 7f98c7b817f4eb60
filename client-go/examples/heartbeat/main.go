// Command heartbeat is kontext's sidecar heartbeat: it POSTs
// {"sidecar":ID,"seq":N} to a backend every interval, authenticated by the
// broker through broker.BearerTransport (pushed tokens, no IPC per request,
// one retry with the same body after a 401). A dead login is logged once,
// with the broker's message, not on every heartbeat.
//
//	go run ./examples/heartbeat -url http://127.0.0.1:8080/heartbeat -interval 200ms
//
// With -report it prints {"sent":N,"ok":N,"failures":[...]} on stdout when it
// stops (SIGTERM, SIGINT, or end of stdin with -stop-on-eof).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"example.invalid/kontext-broker/client-go/broker"
)

// report is what the heartbeats found.
type report struct {
	Sent     uint64   `json:"sent"`
	OK       uint64   `json:"ok"`
	Failures []string `json:"failures"`
}

// health is what the last heartbeat found; each condition is logged on entry.
type health struct {
	reauth bool
	reason string
}

// beater sends heartbeats through an authenticated client.
type beater struct {
	url    string
	id     uint64
	client *http.Client
	log    *log.Logger
	report report
	last   health
}

func (b *beater) beat(ctx context.Context) {
	b.report.Sent++
	seq := b.report.Sent
	body, _ := json.Marshal(map[string]uint64{"sidecar": b.id, "seq": seq})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, b.url, bytes.NewReader(body))
	if err != nil {
		b.fail(seq, health{reason: err.Error()})
		return
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := b.client.Do(req)
	switch {
	case err != nil:
		if msg, ok := broker.IsReauthRequired(err); ok {
			b.fail(seq, health{reauth: true, reason: msg})
		} else {
			b.fail(seq, health{reason: err.Error()})
		}
	case resp.StatusCode/100 != 2:
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		b.fail(seq, health{reason: fmt.Sprintf("backend answered %d", resp.StatusCode)})
	default:
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		b.report.OK++
		if b.last != (health{}) {
			b.log.Printf("heartbeats succeed again (beat %d)", seq)
		}
		b.last = health{}
	}
}

func (b *beater) fail(seq uint64, now health) {
	b.report.Failures = append(b.report.Failures, fmt.Sprintf("beat %d: %s", seq, now.reason))
	if now == b.last {
		return
	}
	b.last = now
	if now.reauth {
		// The broker's own words, e.g. "Session expired, run `kontext login` to re-authenticate".
		b.log.Printf("%s", now.reason)
	} else {
		b.log.Printf("heartbeat failing (beat %d): %s", seq, now.reason)
	}
}

// run beats every interval until stop is closed.
func (b *beater) run(ctx context.Context, interval time.Duration, stop <-chan struct{}) report {
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		b.beat(ctx)
		select {
		case <-ticker.C:
		case <-stop:
			return b.report
		}
	}
}

func main() {
	url := flag.String("url", "", "backend heartbeat URL (required)")
	interval := flag.Duration("interval", time.Second, "time between heartbeats")
	profile := flag.String("profile", "default", "broker profile")
	socket := flag.String("socket", "", "broker socket (default: $KONTEXT_BROKER_SOCKET or the XDG default)")
	id := flag.Uint64("id", 0, "sidecar id sent in each heartbeat")
	stopOnEOF := flag.Bool("stop-on-eof", false, "stop when stdin reaches end of file")
	printReport := flag.Bool("report", false, "print a JSON report on stdout at exit")
	flag.Parse()
	if *url == "" {
		fmt.Fprintln(os.Stderr, "usage: heartbeat -url URL [-interval 1s] [-profile default] [-socket PATH]")
		os.Exit(2)
	}
	logger := log.New(os.Stderr, fmt.Sprintf("heartbeat[%d] ", *id), log.LstdFlags|log.Lmicroseconds)

	src := broker.NewTokenSource(broker.SourceOptions{
		Profile: *profile,
		Dial:    broker.Options{Socket: *socket, ClientName: "heartbeat"},
		// The heartbeat loop logs the reauth message itself, once.
		Logf: func(string, ...interface{}) {},
	})
	defer src.Close()
	b := &beater{
		url:    *url,
		id:     *id,
		client: &http.Client{Transport: &broker.BearerTransport{Source: src}, Timeout: 30 * time.Second},
		log:    logger,
	}

	stop := make(chan struct{})
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-signals
		close(stop)
	}()
	if *stopOnEOF {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			signals <- syscall.SIGTERM
		}()
	}
	r := b.run(context.Background(), *interval, stop)
	if *printReport {
		_ = json.NewEncoder(os.Stdout).Encode(r)
	}
}
