//go:build darwin

package broker

import (
	"net"
	"syscall"
	"unsafe"
)

// From <sys/un.h> and <sys/ucred.h>: getsockopt(fd, SOL_LOCAL, LOCAL_PEERCRED)
// fills a struct xucred; getpeereid(3) is a libc wrapper around the same call.
const (
	solLocal      = 0
	localPeercred = 0x001
	xucredVersion = 0
)

type xucred struct {
	Version uint32
	UID     uint32
	NGroups int16
	Groups  [16]uint32
}

// peerUID reads the uid of the process at the other end (LOCAL_PEERCRED).
func peerUID(c *net.UnixConn) (uint32, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred xucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		size := uint32(unsafe.Sizeof(cred))
		_, _, errno := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, solLocal, localPeercred,
			uintptr(unsafe.Pointer(&cred)), uintptr(unsafe.Pointer(&size)), 0)
		if errno != 0 {
			credErr = errno
		}
	}); err != nil {
		return 0, err
	}
	if credErr != nil {
		return 0, credErr
	}
	if cred.Version != xucredVersion {
		return 0, syscall.EINVAL
	}
	return cred.UID, nil
}
