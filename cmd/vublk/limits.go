package main

import (
	"flag"
	"fmt"
	"time"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/config"
)

// backendLimits turns validated limits from the configuration into the engine's.
func backendLimits(l config.Limits) backend.Limits {
	rate := func(r config.Rate) backend.Rate {
		return backend.Rate{Avg: r.Avg, Max: r.Max, MaxLength: time.Duration(r.MaxLength) * time.Second}
	}
	return backend.Limits{
		IOPS: rate(l.IOPSTotal), IOPSRead: rate(l.IOPSRead), IOPSWrite: rate(l.IOPSWrite),
		BPS: rate(l.BPSTotal), BPSRead: rate(l.BPSRead), BPSWrite: rate(l.BPSWrite),
		IOPSSize: l.IOPSSize,
	}
}

// limitFlags are "vublk serve"'s limit flags: --iops-total, --bps-read-max, ... named as the
// configuration keys with dashes.
type limitFlags struct {
	rates  [6]struct{ avg, max, length string }
	iopsSz string
}

var limitFlagNames = [6]string{"iops-total", "iops-read", "iops-write", "bps-total", "bps-read", "bps-write"}

func (f *limitFlags) register(fs *flag.FlagSet) {
	for i, name := range limitFlagNames {
		what := "I/Os per second"
		if name[0] == 'b' {
			what = "bytes per second (or with K/M/G)"
		}
		fs.StringVar(&f.rates[i].avg, name, "", "limit: "+what+" (like QEMU's "+name+")")
		fs.StringVar(&f.rates[i].max, name+"-max", "", "burst rate allowed above --"+name)
		fs.StringVar(&f.rates[i].length, name+"-max-length", "", "seconds a burst at --"+name+"-max may last (default 1)")
	}
	fs.StringVar(&f.iopsSz, "iops-size", "", "bytes per I/O for the iops limits: a larger request counts as several (like QEMU's iops-size)")
}

// limits parses the flags into limits, checked as the configuration file's keys are.
func (f *limitFlags) limits() (backend.Limits, error) {
	var l config.Limits
	rates := []*config.Rate{&l.IOPSTotal, &l.IOPSRead, &l.IOPSWrite, &l.BPSTotal, &l.BPSRead, &l.BPSWrite}
	num := func(flag, s string, bytes bool) (int64, error) {
		if s == "" {
			return 0, nil
		}
		var n int64
		var err error
		if bytes {
			n, err = config.ParseSize(s)
		} else {
			_, err = fmt.Sscan(s, &n)
		}
		if err != nil || n < 1 {
			return 0, fmt.Errorf("--%s %q: want a positive number", flag, s)
		}
		return n, nil
	}
	var err error
	for i, name := range limitFlagNames {
		r, in := rates[i], f.rates[i]
		bytes := name[0] == 'b'
		if r.Avg, err = num(name, in.avg, bytes); err != nil {
			return backend.Limits{}, err
		}
		if r.Max, err = num(name+"-max", in.max, bytes); err != nil {
			return backend.Limits{}, err
		}
		if r.MaxLength, err = num(name+"-max-length", in.length, false); err != nil {
			return backend.Limits{}, err
		}
		switch {
		case r.Max > 0 && r.Avg == 0:
			return backend.Limits{}, fmt.Errorf("--%s-max needs --%s", name, name)
		case r.Max > 0 && r.Max < r.Avg:
			return backend.Limits{}, fmt.Errorf("--%s-max is below --%s", name, name)
		case r.MaxLength > 0 && r.Max == 0:
			return backend.Limits{}, fmt.Errorf("--%s-max-length needs --%s-max", name, name)
		case r.MaxLength > config.MaxBurstLength:
			return backend.Limits{}, fmt.Errorf("--%s-max-length must be at most %d seconds", name, config.MaxBurstLength)
		}
		if r.Max > 0 && r.MaxLength == 0 {
			r.MaxLength = 1
		}
	}
	if l.IOPSSize, err = num("iops-size", f.iopsSz, true); err != nil {
		return backend.Limits{}, err
	}
	if l.IOPSSize > 0 && l.IOPSSize < 512 {
		return backend.Limits{}, fmt.Errorf("--iops-size must be at least 512 bytes")
	}
	return backendLimits(l), nil
}
