package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"sync"
	"syscall"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/config"
)

// service runs every export of a configuration file. Exports are independent: one that fails
// to start on reload, or whose front-end misbehaves, leaves the others serving.
type service struct {
	path    string
	log     *logrus.Logger
	cfg     *config.Config
	exports map[string]*export
}

// serveConfig is `vublk serve --config FILE`: start every export, then SIGHUP reloads the file
// and SIGINT or SIGTERM drains, syncs and stops them all.
func serveConfig(path string, stderr io.Writer) int {
	cfg, err := config.Load(path)
	if err != nil {
		printConfigErrors(stderr, err)
		return exitUsage
	}
	log, err := newLogger(cfg.Global.LogLevel, cfg.Global.LogFormat, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "vublk: %v\n", err)
		return exitUsage
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)

	s := &service{path: path, log: log, cfg: cfg, exports: map[string]*export{}}
	for _, ec := range cfg.Exports {
		e, err := startExport(specFromConfig(ec), log)
		if err != nil {
			log.WithError(err).Error("cannot start the export; stopping")
			s.stopAll()
			return exitUsage
		}
		s.exports[ec.Name] = e
	}
	log.WithFields(logrus.Fields{"config": path, "exports": len(s.exports)}).Info("vublk serving")
	notifySystemd(log, daemon.SdNotifyReady)

	for sig := range sigs {
		if sig == syscall.SIGHUP {
			s.reload()
			continue
		}
		log.WithField("signal", sig.String()).Info("stopping: draining every export and syncing")
		break
	}
	notifySystemd(log, daemon.SdNotifyStopping)
	if err := s.stopAll(); err != nil {
		return 1
	}
	return 0
}

// printConfigErrors writes every configuration problem on a line of its own.
func printConfigErrors(w io.Writer, err error) {
	var errs config.Errors
	if errors.As(err, &errs) {
		for _, e := range errs {
			fmt.Fprintf(w, "vublk: %v\n", e)
		}
		return
	}
	fmt.Fprintf(w, "vublk: %v\n", err)
}

// specFromConfig turns a validated [[export]] into what startExport takes.
func specFromConfig(ec config.Export) exportSpec {
	return exportSpec{
		name: ec.Name, socketPath: ec.SocketPath, fd: ec.FD, file: ec.File, size: ec.Size, resize: ec.Resize,
		readOnly: ec.ReadOnly, numQueues: ec.NumQueues, lanes: ec.Lanes, serial: ec.Serial,
		writeback: ec.Writeback(), blockSize: ec.LogicalBlockSize, discard: ec.Discard, writeLog: ec.WriteLog,
		socketUID: ec.SocketUID, socketGID: ec.SocketGID, socketMode: ec.SocketMode,
	}
}

// reload applies the configuration file again: removed exports drain and stop, added ones
// start, one whose size alone changed is resized live, one with other changes restarts, and
// the others are not touched. An invalid file changes nothing.
func (s *service) reload() {
	notifySystemd(s.log, daemon.SdNotifyReloading)
	defer notifySystemd(s.log, daemon.SdNotifyReady)
	cfg, err := config.Load(s.path)
	if err != nil {
		var errs config.Errors
		if errors.As(err, &errs) {
			for _, e := range errs {
				s.log.WithField("config", s.path).Error(e.Error())
			}
		}
		s.log.WithError(err).Error("reload rejected: the new configuration is invalid; the running exports go on unchanged")
		return
	}
	if cfg.Global.LogLevel != s.cfg.Global.LogLevel {
		if lvl, err := logrus.ParseLevel(cfg.Global.LogLevel); err == nil {
			s.log.SetLevel(lvl)
		}
	}
	old := map[string]config.Export{}
	for _, ec := range s.cfg.Exports {
		old[ec.Name] = ec
	}
	next := map[string]config.Export{}
	for _, ec := range cfg.Exports {
		next[ec.Name] = ec
	}
	var added, removed, resized, restarted []string
	// Stop first, so that a restarted or moved export frees its socket and file.
	for _, name := range sortedNames(old) {
		nc, keep := next[name]
		oc := old[name]
		switch {
		case !keep:
			removed = append(removed, name)
		case sameExceptSize(oc, nc):
			continue
		default:
			restarted = append(restarted, name)
		}
		if e := s.exports[name]; e != nil {
			e.stop()
			delete(s.exports, name)
		}
	}
	for _, name := range sortedNames(next) {
		nc := next[name]
		oc, had := old[name]
		if e := s.exports[name]; had && e != nil {
			if oc.Size != nc.Size && nc.Size > 0 {
				if err := e.resize(nc.Size); err != nil {
					e.log.WithError(err).Error("resize failed; the export keeps its size")
					continue
				}
				resized = append(resized, name)
			}
			continue
		}
		e, err := startExport(specFromConfig(nc), s.log)
		if err != nil {
			s.log.WithError(err).Error("cannot start the export")
			continue
		}
		s.exports[name] = e
		if !had {
			added = append(added, name)
		}
	}
	s.cfg = cfg
	s.log.WithFields(logrus.Fields{
		"added": added, "removed": removed, "resized": resized, "restarted": restarted, "exports": len(s.exports),
	}).Info("configuration reloaded")
}

// sameExceptSize reports whether two versions of an export differ at most in their size.
func sameExceptSize(a, b config.Export) bool {
	a.Line, b.Line = 0, 0
	a.Size, b.Size = 0, 0
	return a == b
}

func sortedNames(m map[string]config.Export) []string {
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// stopAll drains and stops every export at once.
func (s *service) stopAll() error {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	for _, e := range s.exports {
		wg.Add(1)
		go func(e *export) {
			defer wg.Done()
			if err := e.stop(); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}(e)
	}
	wg.Wait()
	s.exports = map[string]*export{}
	return errors.Join(errs...)
}
