package config

import (
	"fmt"
	"strconv"
	"strings"
)

// ParseSize reads a byte count: a number, optionally followed by K, M, G or T (powers of 1024,
// with or without "iB"/"B"), as "vublk serve --size" takes it. Zero is accepted here; whether a
// size may be zero is the caller's rule.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	u := strings.ToUpper(t)
	u = strings.TrimSuffix(u, "IB")
	u = strings.TrimSuffix(u, "B")
	mult := int64(1)
	if n := len(u); n > 0 {
		switch u[n-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			u = u[:n-1]
		}
	}
	v, err := strconv.ParseInt(strings.TrimSpace(u), 10, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("invalid size %q (want bytes or a number with K, M, G or T)", s)
	}
	if v > (1<<62)/mult {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return v * mult, nil
}
