// Package install checks `make install`: the binary, the systemd unit, the example config and
// the vhost-user back-end description land where systemd, QEMU and libvirt look for them.
package install

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestMakeInstall(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	dest := t.TempDir()
	install := func() {
		cmd := exec.Command("make", "-s", "install", "DESTDIR="+dest, "BIN="+filepath.Join(t.TempDir(), "vublk"))
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("make install: %v\n%s", err, out)
		}
	}
	install()

	bin := filepath.Join(dest, "usr/local/bin/vublk")
	out, err := exec.Command(bin, "--print-capabilities").Output()
	if err != nil || !strings.Contains(string(out), `"type":"block"`) {
		t.Fatalf("installed binary: %v %s", err, out)
	}

	unit, err := os.ReadFile(filepath.Join(dest, "etc/systemd/system/vublk.service"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"Type=notify",
		"ExecStart=/usr/local/bin/vublk serve --config /etc/vublk/vublk.toml",
		"ExecReload=/bin/kill -HUP $MAINPID",
		"WantedBy=multi-user.target",
	} {
		if !bytes.Contains(unit, []byte(want)) {
			t.Errorf("unit file lacks %q", want)
		}
	}
	if bytes.Contains(unit, []byte("@")) {
		t.Errorf("unit file has an unfilled placeholder:\n%s", unit)
	}

	var desc struct {
		Description, Type, Binary string
	}
	raw, err := os.ReadFile(filepath.Join(dest, "usr/share/qemu/vhost-user/50-vublk.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &desc); err != nil {
		t.Fatalf("50-vublk.json: %v", err)
	}
	if desc.Type != "block" || desc.Binary != "/usr/local/bin/vublk" || desc.Description == "" {
		t.Errorf("50-vublk.json: %+v", desc)
	}

	// The example config is installed, and valid; a second install keeps the operator's edits.
	conf := filepath.Join(dest, "etc/vublk/vublk.toml")
	if out, err := exec.Command(bin, "check", "--config", conf).CombinedOutput(); err != nil {
		t.Errorf("vublk check on the installed example: %v\n%s", err, out)
	}
	edited := []byte("# the operator's own\n")
	if err := os.WriteFile(conf, edited, 0o644); err != nil {
		t.Fatal(err)
	}
	install()
	if got, _ := os.ReadFile(conf); !bytes.Equal(got, edited) {
		t.Error("make install overwrote an existing /etc/vublk/vublk.toml")
	}
}
