package broker

import "time"

// Clock tells the wall-clock time. TokenSource compares token expiry with it;
// tests inject a clock that jumps, as a laptop suspend does.
type Clock interface {
	Now() time.Time
}

// SystemClock is the real wall clock (a vDSO read on Linux, not a syscall).
type SystemClock struct{}

// Now implements Clock.
func (SystemClock) Now() time.Time { return time.Now() }
