// Package broker is the Go client of kontext-broker, the per-user OAuth token
// broker. It uses only the standard library.
//
//   - Dial opens one uid-checked, multiplexed connection (Conn): before it
//     sends a byte it checks that the socket file and the process serving it
//     belong to this user. Conn offers GetToken, Invalidate, Refresh, Status
//     (all pages), Watch, Ping, Import and Logout, with per-call timeouts.
//   - TokenSource caches the profile's token from the broker's pushes: Token is
//     a memory read while the token is fresh by the wall clock, it falls back to
//     GetToken when not, reconnects after a broker restart with jittered
//     backoff, and keeps a reauth error sticky (logged once).
//   - BearerTransport is an http.RoundTripper that sets Authorization: Bearer
//     and, when the server rejects the token (401, grpc-status 16, or a Connect
//     "unauthenticated" body), invalidates it and retries once with the same body.
//
// Errors are typed: *ReauthRequiredError carries the broker's message for the
// user ("Session expired, run `kontext login` to re-authenticate"). No token
// ever appears in an error or a log line from this package.
//
// The protocol is described in protocol/WIRE.md; the encoding lives in the
// sibling package wire.
package broker
