package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"

	"github.com/vublk/vublk/backend"
)

// replay rebuilds a disk image from a write log (vublk serve --write-log).
func replay(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("vublk replay", flag.ContinueOnError)
	logPath := fs.String("log", "", "write log made by vublk serve --write-log")
	base := fs.String("base", "", "the disk image as it was when logging started (default: zeros)")
	out := fs.String("out", "", "image to write")
	mark := fs.Int("mark", -1, "replay up to and including flush mark N (0: none of the log; default: the whole log)")
	crash := fs.Bool("crash", false, "write a random crash state: everything up to --mark (default: the last mark) plus any subset of what followed it, torn at 512-byte sectors")
	seed := fs.Uint64("seed", 1, "random seed for --crash")
	info := fs.Bool("info", false, "print the log's size, records and marks as JSON and exit")
	if code, ok := parseFlags(fs, args, stdout, stderr); !ok {
		return code
	}
	fail := func(code int, format string, a ...any) int {
		fmt.Fprintf(stderr, "vublk replay: "+format+"\n", a...)
		return code
	}
	if *logPath == "" || (*out == "" && !*info) || fs.NArg() > 0 {
		return fail(exitUsage, "usage: vublk replay --log PATH [--base IMAGE] --out IMAGE [--mark N] [--crash --seed S] | --info")
	}
	f, err := os.Open(*logPath)
	if err != nil {
		return fail(exitUsage, "%v", err)
	}
	l, err := backend.ReadWriteLog(f)
	f.Close()
	if err != nil {
		return fail(1, "%s: %v", *logPath, err)
	}
	if *info {
		counts := map[string]int{}
		for _, r := range l.Records {
			counts[r.Type.String()]++
		}
		b, _ := json.Marshal(map[string]any{"disk_size": l.DiskSize, "records": len(l.Records), "marks": l.Marks, "by_type": counts})
		fmt.Fprintln(stdout, string(b))
		return 0
	}
	img := make([]byte, l.DiskSize)
	if *base != "" {
		b, err := os.ReadFile(*base)
		if err != nil {
			return fail(exitUsage, "--base: %v", err)
		}
		if int64(len(b)) != l.DiskSize {
			return fail(exitUsage, "--base %s has %d bytes, the log's disk has %d", *base, len(b), l.DiskSize)
		}
		img = b
	}
	if *crash {
		m := *mark
		if m < 0 {
			m = l.Marks
		}
		err = l.ReplayCrash(img, m, rand.New(rand.NewPCG(*seed, *seed^0x9e3779b97f4a7c15)))
	} else {
		err = l.ReplayToMark(img, *mark)
	}
	if err != nil {
		return fail(exitUsage, "%v", err)
	}
	if err := os.WriteFile(*out, img, 0o644); err != nil {
		return fail(1, "%v", err)
	}
	return 0
}
