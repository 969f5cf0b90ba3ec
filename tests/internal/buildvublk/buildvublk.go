// Package buildvublk builds the vublk binary for the tests that run it as a process (tests/e2e,
// tests/hostile, tests/crash). It links with the flags `make build` ships, read from the
// Makefile (`make -s print-ldflags`), so that those tests run the runtime settings users get
// (today the runtime's GODEBUG default that keeps sysmon out of its deep sleep) and the Makefile
// stays the one place they are written.
package buildvublk

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
)

// Root is the repository's root directory (where go.mod and the Makefile are).
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", "..", ".."))
}

var ldflags struct {
	once  sync.Once
	flags string
	err   error
}

// LDFlags returns the Makefile's LDFLAGS, the link flags of `make build`.
func LDFlags() (string, error) {
	ldflags.once.Do(func() {
		cmd := exec.Command("make", "-s", "--no-print-directory", "-C", Root(), "print-ldflags")
		out, err := cmd.Output()
		if err != nil {
			ldflags.err = fmt.Errorf("make print-ldflags: %w", err)
			return
		}
		ldflags.flags = strings.TrimSpace(string(out))
	})
	return ldflags.flags, ldflags.err
}

// Build builds ./cmd/vublk into out with the build tags (comma- or space-separated, may be
// empty) and make build's link flags. env is added to the go command's environment
// (CGO_ENABLED=0 for a static binary, say).
func Build(out, tags string, env ...string) error {
	flags, err := LDFlags()
	if err != nil {
		return err
	}
	cmd := exec.Command("go", "build", "-tags", tags, "-ldflags", flags, "-o", out, "./cmd/vublk")
	cmd.Dir = Root()
	cmd.Env = append(os.Environ(), env...)
	if msg, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build -tags %q -ldflags %q: %w\n%s", tags, flags, err, msg)
	}
	return nil
}
