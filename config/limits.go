package config

import (
	"fmt"
	"math"
)

// Rate is one I/O limit: an average rate per second and an optional burst, as QEMU's throttle
// groups have them (iops-total, iops-total-max, iops-total-max-length).
type Rate struct {
	Avg       int64 // KEY: per second; 0 is no limit
	Max       int64 // KEY_max: the burst rate; 0 is no burst
	MaxLength int64 // KEY_max_length: how long a burst at Max lasts, in seconds; default 1 with Max
}

// Limits are the I/O limits of an export or an [[io_group]]. Every field zero limits nothing.
// The struct is comparable, so that Diff sees a change of limits.
type Limits struct {
	IOPSTotal, IOPSRead, IOPSWrite Rate  // iops_total, iops_read, iops_write: I/Os per second
	BPSTotal, BPSRead, BPSWrite    Rate  // bps_total, bps_read, bps_write: bytes per second
	IOPSSize                       int64 // iops_size: a larger request counts as ceil(len/iops_size) I/Os
}

// Set reports whether any limit is set.
func (l Limits) Set() bool { return l != Limits{} }

// IOGroup is one [[io_group]] table: limits shared by every export that names it.
type IOGroup struct {
	Name   string
	Limits Limits
	Line   int
}

// LimitKeys are the limit keys of an export or an [[io_group]], in the order they are read.
var LimitKeys = limitKeys()

var rateKeys = []string{"iops_total", "iops_read", "iops_write", "bps_total", "bps_read", "bps_write"}

func limitKeys() []string {
	var keys []string
	for _, k := range rateKeys {
		keys = append(keys, k, k+"_max", k+"_max_length")
	}
	return append(keys, "iops_size")
}

// MaxBurstLength is the longest burst, in seconds (a day).
const MaxBurstLength = 86400

// rates returns pointers to l's rates in the order of rateKeys.
func (l *Limits) rates() []*Rate {
	return []*Rate{&l.IOPSTotal, &l.IOPSRead, &l.IOPSWrite, &l.BPSTotal, &l.BPSRead, &l.BPSWrite}
}

// limits reads the limit keys of t. bps keys take a size ("10M") or an integer; iops keys an
// integer.
func (p *parser) limits(t *table) Limits {
	var l Limits
	for i, r := range l.rates() {
		k := rateKeys[i]
		bytes := k[0] == 'b'
		r.Avg = p.rateValue(t, k, bytes)
		r.Max = p.rateValue(t, k+"_max", bytes)
		if n, ok := t.integer(k+"_max_length", 1, MaxBurstLength); ok {
			r.MaxLength = int64(n)
		}
		_, hasAvg := t.m[k]
		_, hasMax := t.m[k+"_max"]
		_, hasLen := t.m[k+"_max_length"]
		switch {
		case hasMax && !hasAvg:
			p.errorf(t.path(k+"_max"), "needs %s: a burst is above an average rate", k)
		case r.Max > 0 && r.Max < r.Avg:
			p.errorf(t.path(k+"_max"), "%d is below %s (%d): a burst must be faster than the average", r.Max, k, r.Avg)
		case hasLen && !hasMax:
			p.errorf(t.path(k+"_max_length"), "needs %s_max: the length of a burst at that rate", k)
		}
		if r.Max > 0 && r.MaxLength == 0 {
			r.MaxLength = 1
		}
	}
	if v, ok := t.get("iops_size"); ok {
		l.IOPSSize = p.byteCount(t, "iops_size", v)
		if l.IOPSSize > 0 && l.IOPSSize < 512 {
			p.errorf(t.path("iops_size"), "%d is less than a sector (512 bytes)", l.IOPSSize)
		}
	}
	return l
}

// rateValue reads one rate: a positive integer, or for bytes also a size string.
func (p *parser) rateValue(t *table, k string, bytes bool) int64 {
	v, ok := t.get(k)
	if !ok {
		return 0
	}
	if bytes {
		return p.byteCount(t, k, v)
	}
	n, ok := v.(int64)
	if !ok {
		t.typeError(k, "an integer (I/Os per second)", v)
		return 0
	}
	if n < 1 || n > math.MaxInt32 {
		p.errorf(t.path(k), "must be between 1 and %d, not %d (leave it out for no limit)", math.MaxInt32, n)
		return 0
	}
	return n
}

// byteCount reads a positive byte count: an integer or a size like "10M".
func (p *parser) byteCount(t *table, k string, v any) int64 {
	var n int64
	switch v := v.(type) {
	case int64:
		n = v
	case string:
		var err error
		if n, err = ParseSize(v); err != nil {
			p.errorf(t.path(k), "%v", err)
			return 0
		}
	default:
		t.typeError(k, `a byte count (an integer or a size like "10M")`, v)
		return 0
	}
	if n < 1 {
		p.errorf(t.path(k), "must be positive, not %v (leave it out for no limit)", v)
		return 0
	}
	return n
}

// decodeIOGroups reads the [[io_group]] tables.
func (p *parser) decodeIOGroups(root *table, cfg *Config) {
	v, ok := root.get("io_group")
	if !ok {
		return
	}
	tables, ok := tableArray(v)
	if !ok {
		root.typeError("io_group", "an array of tables ([[io_group]])", v)
		return
	}
	seen := map[string]int{}
	for i, m := range tables {
		t := p.table(fmt.Sprintf("io_group[%d]", i), m)
		g := IOGroup{Line: p.lines.lineOf(t.key)}
		if s, ok := t.str("name"); ok {
			if err := checkName(s); err != nil {
				p.errorf(t.path("name"), "%v", err)
			} else if j, dup := seen[s]; dup {
				p.errorf(t.path("name"), "duplicate io_group name %q (also io_group[%d], line %d)", s, j, cfg.IOGroups[j].Line)
			} else {
				seen[s] = i
			}
			g.Name = s
		} else if _, there := t.m["name"]; !there {
			p.errorf(t.path("name"), "missing: every io_group needs a name")
		}
		g.Limits = p.limits(t)
		t.unknown()
		cfg.IOGroups = append(cfg.IOGroups, g)
	}
}

// LookupIOGroup returns the [[io_group]] called name, or nil.
func (c *Config) LookupIOGroup(name string) *IOGroup {
	for i := range c.IOGroups {
		if c.IOGroups[i].Name == name {
			return &c.IOGroups[i]
		}
	}
	return nil
}

// checkIOGroups checks that every export's io_group exists and that an export in a group sets no
// limits of its own: the group's limits are the export's.
func (p *parser) checkIOGroups(cfg *Config) {
	for i := range cfg.Exports {
		e := &cfg.Exports[i]
		if e.IOGroup == "" {
			continue
		}
		key := fmt.Sprintf("export[%d]", i)
		if cfg.LookupIOGroup(e.IOGroup) == nil {
			p.errorf(key+".io_group", "no [[io_group]] is called %q", e.IOGroup)
		}
		if e.Limits.Set() {
			p.errorf(key+".io_group", "an export in an io_group takes the group's limits: set them in its [[io_group]] table, not here")
		}
	}
}
