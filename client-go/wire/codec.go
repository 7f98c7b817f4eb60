package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unicode/utf8"
)

// MaxFrameLen is the largest payload either side sends or accepts (64 KiB).
const MaxFrameLen = 64 * 1024

// ErrTooLarge is returned when a message would not fit one frame.
var ErrTooLarge = errors.New("message larger than the 65536 byte frame limit")

// DecodeError says why a payload is not a valid message.
type DecodeError struct {
	// Reason names what was wrong and where.
	Reason string
}

func (e *DecodeError) Error() string { return "undecodable frame: " + e.Reason }

// encoder appends bincode (fixint, little-endian) to a byte slice.
type encoder struct{ buf []byte }

func (e *encoder) u8(v uint8)   { e.buf = append(e.buf, v) }
func (e *encoder) u32(v uint32) { e.buf = binary.LittleEndian.AppendUint32(e.buf, v) }
func (e *encoder) u64(v uint64) { e.buf = binary.LittleEndian.AppendUint64(e.buf, v) }

func (e *encoder) boolean(v bool) {
	if v {
		e.u8(1)
	} else {
		e.u8(0)
	}
}

func (e *encoder) str(s string) {
	e.u64(uint64(len(s)))
	e.buf = append(e.buf, s...)
}

func (e *encoder) strs(v []string) {
	e.u64(uint64(len(v)))
	for _, s := range v {
		e.str(s)
	}
}

func (e *encoder) optStr(s *string) {
	if s == nil {
		e.u8(0)
		return
	}
	e.u8(1)
	e.str(*s)
}

func (e *encoder) optU64(v *uint64) {
	if v == nil {
		e.u8(0)
		return
	}
	e.u8(1)
	e.u64(*v)
}

// decoder reads bincode from a payload. The first error sticks; every read
// after it returns zero values, so callers check err once at the end.
type decoder struct {
	buf []byte
	err error
}

func (d *decoder) fail(format string, args ...interface{}) {
	if d.err == nil {
		d.err = &DecodeError{Reason: fmt.Sprintf(format, args...)}
	}
}

func (d *decoder) take(n uint64, what string) []byte {
	if d.err != nil {
		return nil
	}
	if n > uint64(len(d.buf)) {
		d.fail("%s: need %d bytes, %d left", what, n, len(d.buf))
		return nil
	}
	b := d.buf[:n]
	d.buf = d.buf[n:]
	return b
}

func (d *decoder) u8(what string) uint8 {
	b := d.take(1, what)
	if b == nil {
		return 0
	}
	return b[0]
}

func (d *decoder) u32(what string) uint32 {
	b := d.take(4, what)
	if b == nil {
		return 0
	}
	return binary.LittleEndian.Uint32(b)
}

func (d *decoder) u64(what string) uint64 {
	b := d.take(8, what)
	if b == nil {
		return 0
	}
	return binary.LittleEndian.Uint64(b)
}

func (d *decoder) boolean(what string) bool {
	switch v := d.u8(what); v {
	case 0:
		return false
	case 1:
		return true
	default:
		d.fail("%s: invalid bool %d", what, v)
		return false
	}
}

// tag reads an Option tag: false for none, true for some.
func (d *decoder) tag(what string) bool {
	switch v := d.u8(what); v {
	case 0:
		return false
	case 1:
		return true
	default:
		d.fail("%s: invalid Option tag %d", what, v)
		return false
	}
}

func (d *decoder) str(what string) string {
	n := d.u64(what)
	b := d.take(n, what)
	if b == nil {
		return ""
	}
	if !utf8.Valid(b) {
		d.fail("%s: invalid UTF-8", what)
		return ""
	}
	return string(b)
}

func (d *decoder) strs(what string) []string {
	n := d.u64(what)
	if d.err != nil {
		return nil
	}
	// Each string takes at least its 8-byte length: bound the count before allocating.
	if n > uint64(len(d.buf))/8 {
		d.fail("%s: %d elements cannot fit in %d bytes", what, n, len(d.buf))
		return nil
	}
	out := make([]string, 0, n)
	for i := uint64(0); i < n && d.err == nil; i++ {
		out = append(out, d.str(what))
	}
	return out
}

func (d *decoder) optStr(what string) *string {
	if !d.tag(what) {
		return nil
	}
	s := d.str(what)
	return &s
}

func (d *decoder) optU64(what string) *uint64 {
	if !d.tag(what) {
		return nil
	}
	v := d.u64(what)
	return &v
}

// variant reads an enum index and checks it is below count.
func (d *decoder) variant(what string, count uint32) uint32 {
	v := d.u32(what)
	if d.err == nil && v >= count {
		d.fail("%s: unknown variant %d", what, v)
	}
	return v
}

// finish reports the sticky error, or trailing bytes.
func (d *decoder) finish() error {
	if d.err != nil {
		return d.err
	}
	if len(d.buf) != 0 {
		return &DecodeError{Reason: fmt.Sprintf("%d trailing bytes", len(d.buf))}
	}
	return nil
}
