package main

import (
	"errors"
	"flag"
	"fmt"
	"io"

	"github.com/vublk/vublk/config"
)

// check is `vublk check --config FILE`: validate a configuration as `vublk serve --config`
// would, without serving it. Every problem goes to stderr on a line of its own, as
// file:line: key: message, and the exit code is 2; a valid file prints one line to stdout.
func check(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("vublk check", flag.ContinueOnError)
	path := fs.String("config", "", "the configuration file to validate")
	if code, ok := parseFlags(fs, args, stdout, stderr); !ok {
		return code
	}
	switch {
	case fs.NArg() > 0:
		fmt.Fprintf(stderr, "vublk check: unexpected argument %q\n", fs.Arg(0))
		return exitUsage
	case *path == "":
		fmt.Fprintln(stderr, "vublk check: --config is required (usage: vublk check --config FILE)")
		return exitUsage
	}
	cfg, ok := loadConfig(*path, stderr)
	if !ok {
		return exitUsage
	}
	noun := "exports"
	if len(cfg.Exports) == 1 {
		noun = "export"
	}
	fmt.Fprintf(stdout, "%s: %d %s OK\n", *path, len(cfg.Exports), noun)
	return 0
}

// loadConfig loads and validates a configuration file; on failure it writes every problem to w,
// one per line, and ok is false.
func loadConfig(path string, w io.Writer) (cfg *config.Config, ok bool) {
	cfg, err := config.Load(path)
	if err == nil {
		return cfg, true
	}
	var errs config.Errors
	if errors.As(err, &errs) {
		for _, e := range errs {
			fmt.Fprintln(w, e)
		}
	} else {
		fmt.Fprintln(w, err)
	}
	return nil, false
}
