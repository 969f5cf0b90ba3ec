package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vublk/vublk/backend/rbd"
)

func TestRBDExports(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "ceph.conf")
	if err := os.WriteFile(conf, []byte("[global]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	head := "[[export]]\nname = \"a\"\nsocket_path = \"a.sock\"\n"
	tests := []struct {
		name string
		toml string
		errs []string // substrings of the expected errors; none: valid (with librbd)
		want func(e Export) bool
	}{
		{name: "image", toml: head + "rbd = \"rbd/disk0\"\nceph_conf = \"ceph.conf\"\nceph_user = \"vublk\"\nrbd_timeout = \"30s\"\nsize = \"1G\"\n",
			want: func(e Export) bool {
				return e.RBD == "rbd/disk0" && e.CephConf == conf && e.CephUser == "vublk" && e.RBDTimeout == 30*time.Second && !e.ReadOnly && e.File == ""
			}},
		{name: "cache", toml: head + "rbd = \"rbd/d\"\nrbd_cache = true\n", want: func(e Export) bool { return e.RBDCache }},
		{name: "cache on a file", toml: head + "file = \"x.img\"\nsize = \"1M\"\nrbd_cache = true\n", errs: []string{"export[0].rbd_cache: applies only to an RBD export"}},
		{name: "snapshot is read-only", toml: head + "rbd = \"rbd/disk0@s1\"\n", want: func(e Export) bool { return e.ReadOnly && e.RBDSnap() }},
		{name: "timeout in seconds", toml: head + "rbd = \"rbd/d\"\nrbd_timeout = 5\n", want: func(e Export) bool { return e.RBDTimeout == 5*time.Second }},
		{name: "file and rbd", toml: head + "rbd = \"rbd/d\"\nfile = \"x.img\"\nsize = \"1M\"\n", errs: []string{"export[0].rbd: file and rbd exclude each other"}},
		{name: "neither", toml: head, errs: []string{"export[0].file: missing"}},
		{name: "bad spec", toml: head + "rbd = \"disk\"\n", errs: []string{"export[0].rbd: \"disk\" is not pool/image"}},
		{name: "ceph key on a file", toml: head + "file = \"x.img\"\nsize = \"1M\"\nceph_user = \"admin\"\n", errs: []string{"export[0].ceph_user: applies only to an RBD export"}},
		{name: "client. prefix", toml: head + "rbd = \"rbd/d\"\nceph_user = \"client.admin\"\n", errs: []string{"export[0].ceph_user"}},
		{name: "missing ceph_conf", toml: head + "rbd = \"rbd/d\"\nceph_conf = \"nope.conf\"\n", errs: []string{"export[0].ceph_conf: " + filepath.Join(dir, "nope.conf")}},
		{name: "bad timeout", toml: head + "rbd = \"rbd/d\"\nrbd_timeout = \"soon\"\n", errs: []string{"export[0].rbd_timeout"}},
		{name: "tiny timeout", toml: head + "rbd = \"rbd/d\"\nrbd_timeout = \"1ms\"\n", errs: []string{"export[0].rbd_timeout: must be between 1s"}},
		{name: "resize a snapshot", toml: head + "rbd = \"rbd/d@s\"\nsize = \"1G\"\nresize = true\n", errs: []string{"export[0].resize"}},
		{name: "one image twice", toml: head + "rbd = \"rbd/d\"\n[[export]]\nname = \"b\"\nsocket_path = \"b.sock\"\nrbd = \"rbd/d\"\n",
			errs: []string{"export[1].rbd: rbd/d is also the image of export \"a\""}},
		{name: "an image and its snapshot", toml: head + "rbd = \"rbd/d\"\n[[export]]\nname = \"b\"\nsocket_path = \"b.sock\"\nrbd = \"rbd/d@s\"\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Parse(filepath.Join(dir, "vublk.toml"), []byte(tt.toml))
			var errs Errors
			errors.As(err, &errs)
			want := tt.errs
			if !rbd.Built && strings.Contains(tt.toml, "rbd = ") && len(want) == 0 {
				want = []string{"export[0].rbd: built without RBD support"}
			}
			if len(want) == 0 {
				if err != nil {
					t.Fatalf("unexpected errors: %v", err)
				}
				if tt.want != nil && !tt.want(cfg.Exports[0]) {
					t.Errorf("export %+v", cfg.Exports[0])
				}
				return
			}
			for _, w := range want {
				if err == nil || !strings.Contains(err.Error(), w) {
					t.Errorf("errors %v: want one with %q", err, w)
				}
			}
		})
	}
}

// TestRBDExample: examples/vublk-rbd.toml is valid (with librbd) once its paths are local.
func TestRBDExample(t *testing.T) {
	data, err := os.ReadFile("../examples/vublk-rbd.toml")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	text := strings.ReplaceAll(string(data), "/run/vublk", dir)
	cfg, err := Parse(filepath.Join(dir, "vublk.toml"), []byte(text))
	if !rbd.Built {
		if err == nil || !strings.Contains(err.Error(), "built without RBD support") {
			t.Fatalf("without librbd: %v", err)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Exports) != 2 || cfg.Exports[0].RBDTimeout != time.Minute || !cfg.Exports[1].ReadOnly {
		t.Errorf("exports %+v", cfg.Exports)
	}
}
