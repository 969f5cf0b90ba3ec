package config

import (
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want int64
		err  string
	}{
		{"0", 0, ""},
		{"512", 512, ""},
		{" 4096 ", 4096, ""},
		{"1K", 1 << 10, ""},
		{"1k", 1 << 10, ""},
		{"1KB", 1 << 10, ""},
		{"1KiB", 1 << 10, ""},
		{"20G", 20 << 30, ""},
		{"20 GiB", 20 << 30, ""},
		{"3m", 3 << 20, ""},
		{"2T", 2 << 40, ""},
		{"4194304T", 4194304 << 40, ""},
		{"4194305T", 0, "too large"},
		{"", 0, "invalid size"},
		{"G", 0, "invalid size"},
		{"lots", 0, "invalid size"},
		{"-1", 0, "invalid size"},
		{"1.5G", 0, "invalid size"},
		{"1P", 0, "invalid size"},
		{"99999999999999999999", 0, "invalid size"},
	} {
		got, err := ParseSize(tt.in)
		switch {
		case tt.err == "" && (err != nil || got != tt.want):
			t.Errorf("ParseSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)):
			t.Errorf("ParseSize(%q) = %d, %v; want an error with %q", tt.in, got, err, tt.err)
		}
	}
}
