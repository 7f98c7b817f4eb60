//go:build unix

package broker

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
)

// checkSocketOwner refuses a socket path that is not ours: both the path
// itself (lstat) and, through a symlink, its target (stat) must belong to uid.
func checkSocketOwner(path string, uid uint32) error {
	for _, stat := range []func(string) (os.FileInfo, error){os.Lstat, os.Stat} {
		info, err := stat(path)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return &NotRunningError{Path: path}
			}
			return fmt.Errorf("cannot inspect socket %s: %w", path, err)
		}
		st, ok := info.Sys().(*syscall.Stat_t)
		if !ok {
			return fmt.Errorf("cannot read the owner of socket %s", path)
		}
		if st.Uid != uid {
			return &PeerRejectedError{Path: path, Reason: fmt.Sprintf("socket %s is owned by uid %d, not you (uid %d)", path, st.Uid, uid)}
		}
	}
	return nil
}
