package buildvublk

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestBuildUsesMakeLDFlags builds vublk and reads back, from the binary's build information,
// that it was linked with the Makefile's flags.
func TestBuildUsesMakeLDFlags(t *testing.T) {
	if testing.Short() {
		t.Skip("builds vublk")
	}
	flags, err := LDFlags()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(flags, "godebugDefault") {
		t.Fatalf("make print-ldflags gave %q, want make build's GODEBUG default", flags)
	}
	bin := filepath.Join(t.TempDir(), "vublk")
	if err := Build(bin, "", "CGO_ENABLED=0"); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("go", "version", "-m", bin).CombinedOutput()
	if err != nil {
		t.Fatalf("go version -m: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "-ldflags="+flags) && !strings.Contains(string(out), `-ldflags="`+flags+`"`) {
		t.Fatalf("the built vublk's build settings do not show -ldflags %q:\n%s", flags, out)
	}
}
