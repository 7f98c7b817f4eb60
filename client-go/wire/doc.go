// Package wire is the kontext-broker wire protocol, version 2: the message
// types, their bincode encoding (fixed-width little-endian integers, u64
// lengths, u32 enum variant indices, 0/1 Option tags) and the framing (a 4-byte
// big-endian length prefix, payloads of at most 64 KiB).
//
// protocol/WIRE.md in the kontext-broker repository is the contract; the
// golden frames in protocol/testdata/ pin every byte, and this package's tests
// read the same files as the Rust tests. The package uses only the standard
// library and does no I/O beyond ReadFrame.
package wire
