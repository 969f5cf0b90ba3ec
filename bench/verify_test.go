package bench

import (
	"strings"
	"testing"
)

func TestPattern(t *testing.T) {
	const bs = 4096
	const off, run, gen = 3 * bs, 0xabcdef, 7
	good := make([]byte, bs)
	fillPattern(good, off, run, gen)
	scratch := make([]byte, bs)
	if err := checkPattern(good, scratch, off, run, gen); err != nil {
		t.Fatalf("the pattern does not check: %v", err)
	}
	other := func(off int64, run uint64, gen uint32) []byte {
		b := make([]byte, bs)
		fillPattern(b, off, run, gen)
		return b
	}
	tests := []struct {
		name string
		got  []byte
		want string
	}{
		{"zeros", make([]byte, bs), "offset 12288: want generation 7, found data that --verify did not write"},
		{"another offset", other(off+bs, run, gen), "found the sector written at offset 16384"},
		{"another run", other(off, run+1, gen), "found a sector of another run"},
		{"an older write", other(off, run, gen-1), "found generation 6"},
		{"torn: the second half is older", append(append([]byte(nil), good[:bs/2]...), other(off, run, gen-1)[bs/2:]...), "offset 14336: want generation 7, found generation 6"},
		{"a flipped payload bit", func() []byte { b := append([]byte(nil), good...); b[1000] ^= 1; return b }(), "offset 12800: generation 7 has a corrupt payload"},
		{"short", good[:bs-512], "3584 bytes read, want 4096"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := checkPattern(tt.got, scratch[:len(tt.got)], off, run, gen)
			if tt.name == "short" {
				err = checkPattern(tt.got, scratch, off, run, gen)
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("checkPattern = %v, want %q", err, tt.want)
			}
		})
	}
	// Sectors of one block differ: a sector copied within the block is caught.
	b := append([]byte(nil), good...)
	copy(b[512:1024], b[0:512])
	if err := checkPattern(b, scratch, off, run, gen); err == nil {
		t.Fatal("a sector duplicated within the block was not caught")
	}
	for g, want := range map[uint32]uint32{genNone: 1, 1: 2, genUnknown - 1: 1} {
		if got := nextGen(g); got != want {
			t.Errorf("nextGen(%d) = %d, want %d", g, got, want)
		}
	}
}
