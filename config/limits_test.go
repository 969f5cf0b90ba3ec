package config

import (
	"path/filepath"
	"testing"
)

func TestLimitsParse(t *testing.T) {
	f := newFixture(t)
	doc := f.expand(`
[[io_group]]
name = "tenant1"
iops_total = 2000
iops_total_max = 4000
iops_total_max_length = 10
bps_write = "50M"
iops_size = "16K"

[[export]]
name = "a"
socket_path = "$DIR/a.sock"
file = "$DIR/a.img"
io_group = "tenant1"

[[export]]
name = "b"
socket_path = "$DIR/b.sock"
file = "$DIR/b.img"
iops_read = 300
bps_total = 1048576
bps_total_max = "2M"

[[export]]
name = "c"
socket_path = "$DIR/c.sock"
file = "$DIR/ok.img"
`)
	cfg, err := Parse(filepath.Join(f.dir, "vublk.toml"), []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	g := cfg.LookupIOGroup("tenant1")
	want := Limits{IOPSTotal: Rate{2000, 4000, 10}, BPSWrite: Rate{Avg: 50 << 20}, IOPSSize: 16 << 10}
	if g == nil || g.Limits != want || g.Line != 2 {
		t.Errorf("io_group = %+v, want limits %+v on line 2", g, want)
	}
	if a := cfg.Lookup("a"); a.IOGroup != "tenant1" || a.Limits.Set() {
		t.Errorf("export a: io_group %q, limits %+v", a.IOGroup, a.Limits)
	}
	wantB := Limits{IOPSRead: Rate{Avg: 300}, BPSTotal: Rate{1 << 20, 2 << 20, 1}}
	if b := cfg.Lookup("b"); b.Limits != wantB || b.IOGroup != "" {
		t.Errorf("export b: limits %+v, want %+v (a burst lasts 1 s by default)", b.Limits, wantB)
	}
	if c := cfg.Lookup("c"); c.Limits.Set() || c.IOGroup != "" {
		t.Errorf("export c has limits %+v", c.Limits)
	}
}
