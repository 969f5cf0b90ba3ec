package config

import (
	"reflect"
	"testing"
)

func TestDiff(t *testing.T) {
	base := func() *Config {
		return &Config{
			Global: Global{LogLevel: "info", LogFormat: "text", Lanes: 4, IOEngine: IOEngineLanes},
			Exports: []Export{
				{Name: "a", SocketPath: "/run/vublk/a.sock", FD: -1, File: "/d/a.img", Size: 1 << 30, NumQueues: 16, Lanes: 4, IOEngine: IOEngineLanes, Line: 3},
				{Name: "b", SocketPath: "/run/vublk/b.sock", FD: -1, File: "/d/b.img", NumQueues: 16, Lanes: 4, IOEngine: IOEngineLanes, Line: 9},
				{Name: "c", SocketPath: "/run/vublk/c.sock", FD: -1, File: "/d/c.img", NumQueues: 16, Lanes: 4, IOEngine: IOEngineLanes, Line: 15},
			},
		}
	}
	tests := []struct {
		name   string
		change func(c *Config)
		want   Changes
	}{
		{"nothing", func(c *Config) {}, Changes{}},
		{"moved in the file", func(c *Config) {
			c.Exports[0], c.Exports[2] = c.Exports[2], c.Exports[0]
			c.Exports[0].Line, c.Exports[2].Line = 3, 15
		}, Changes{}},
		{"added", func(c *Config) {
			c.Exports = append(c.Exports, Export{Name: "d", SocketPath: "/run/vublk/d.sock", File: "/d/d.img"})
		}, Changes{Added: []string{"d"}}},
		{"removed", func(c *Config) { c.Exports = c.Exports[:1] }, Changes{Removed: []string{"b", "c"}}},
		{"resized", func(c *Config) { c.Exports[0].Size = 2 << 30 }, Changes{Resized: []string{"a"}}},
		{"resize turned on", func(c *Config) { c.Exports[1].Size, c.Exports[1].Resize = 1<<30, true }, Changes{Resized: []string{"b"}}},
		{"resized and read-only", func(c *Config) { c.Exports[0].Size, c.Exports[0].ReadOnly = 2<<30, true }, Changes{Changed: []string{"a"}}},
		{"socket mode", func(c *Config) { c.Exports[2].SocketMode = 0o660 }, Changes{Changed: []string{"c"}}},
		{"file", func(c *Config) { c.Exports[1].File = "/d/b2.img" }, Changes{Changed: []string{"b"}}},
		{"global log level", func(c *Config) { c.Global.LogLevel = "debug" }, Changes{Global: true}},
		{"global lanes", func(c *Config) {
			c.Global.Lanes = 8
			for i := range c.Exports[:2] {
				c.Exports[i].Lanes = 8 // c sets its own lanes
			}
		}, Changes{Changed: []string{"a", "b"}, Global: true}},
		{"direct", func(c *Config) { c.Exports[0].Direct = true }, Changes{Changed: []string{"a"}}},
		{"io engine", func(c *Config) { c.Exports[1].IOEngine = IOEngineURing }, Changes{Changed: []string{"b"}}},
		{"resized and direct", func(c *Config) { c.Exports[0].Size, c.Exports[0].Direct = 2<<30, true }, Changes{Changed: []string{"a"}}},
		{"global direct", func(c *Config) {
			c.Global.Direct = true
			for i := range c.Exports[1:] {
				c.Exports[1+i].Direct = true // a sets direct = false itself
			}
		}, Changes{Changed: []string{"b", "c"}, Global: true}},
		{"global io engine", func(c *Config) {
			c.Global.IOEngine = IOEngineURing
			c.Exports[2].IOEngine = IOEngineURing // a and b set io_engine themselves
		}, Changes{Changed: []string{"c"}, Global: true}},
		{"limits", func(c *Config) { c.Exports[1].Limits.IOPSTotal.Avg = 500 }, Changes{Limited: []string{"b"}}},
		{"io group", func(c *Config) { c.Exports[2].IOGroup = "t1" }, Changes{Limited: []string{"c"}}},
		{"limits and size", func(c *Config) { c.Exports[0].Size, c.Exports[0].Limits.BPSRead.Avg = 2<<30, 1<<20 }, Changes{Resized: []string{"a"}, Limited: []string{"a"}}},
		{"limits and file", func(c *Config) { c.Exports[0].File, c.Exports[0].Limits.BPSRead.Avg = "/d/x.img", 1<<20 }, Changes{Changed: []string{"a"}}},
		{"group limits", func(c *Config) { c.IOGroups = []IOGroup{{Name: "t1", Limits: Limits{IOPSSize: 4096}}} }, Changes{IOGroups: true}},
		{"renamed", func(c *Config) { c.Exports[1].Name = "b2" }, Changes{Added: []string{"b2"}, Removed: []string{"b"}}},
		{"everything", func(c *Config) {
			c.Exports[0].Size = 3 << 30
			c.Exports[1].NumQueues = 2
			c.Exports = append(c.Exports[:2], Export{Name: "e"})
		}, Changes{Added: []string{"e"}, Removed: []string{"c"}, Resized: []string{"a"}, Changed: []string{"b"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			old, new := base(), base()
			tt.change(new)
			got := Diff(old, new)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Diff = %+v, want %+v", got, tt.want)
			}
			if got.Empty() != reflect.DeepEqual(tt.want, Changes{}) {
				t.Errorf("Empty() = %v", got.Empty())
			}
		})
	}
}
