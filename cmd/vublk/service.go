package main

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"slices"
	"sync"
	"syscall"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/config"
	"github.com/vublk/vublk/metrics"
)

// service runs every export of a configuration file. Exports are independent: one that fails
// to start on reload, or whose front-end misbehaves, leaves the others serving.
type service struct {
	path    string
	log     *logrus.Logger
	cfg     *config.Config
	exports map[string]*export
	// Metrics, when the configuration gives an address: one registry for every export.
	reg     *prometheus.Registry
	metrics *metrics.Server
	mx      map[string]*metrics.Exporter
	// groups are the throttles of the [[io_group]] tables, shared by their exports; a group
	// keeps its throttle (and the requests waiting in it) across reloads.
	groups   map[string]*backend.Throttle
	groupsMx map[string]*metrics.GroupExporter
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

	s := &service{path: path, log: log, cfg: cfg, exports: map[string]*export{}, mx: map[string]*metrics.Exporter{},
		groups: map[string]*backend.Throttle{}, groupsMx: map[string]*metrics.GroupExporter{}}
	if addr := cfg.Global.MetricsAddress; addr != "" {
		s.reg = metrics.NewRegistry()
		if s.metrics, err = metrics.Serve(addr, s.reg); err != nil {
			log.WithError(err).Error("cannot serve metrics")
			return exitUsage
		}
		defer s.metrics.Close()
		log.WithField("url", s.metrics.URL()).Info("serving metrics")
	}
	s.applyGroups(cfg)
	for _, ec := range cfg.Exports {
		if err := s.start(ec); err != nil {
			log.WithError(err).Error("cannot start the export; stopping")
			s.stopAll()
			return exitUsage
		}
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

// start starts one export and its metrics.
func (s *service) start(ec config.Export) error {
	spec := specFromConfig(ec)
	spec.throttle = s.groups[ec.IOGroup]
	e, err := startExport(spec, s.log)
	if err != nil {
		return err
	}
	s.exports[ec.Name] = e
	if s.reg != nil {
		x := metrics.NewExporter(ec.Name, e.engine, e.dev)
		if err := x.Register(s.reg); err != nil {
			e.log.WithError(err).Warn("no metrics for this export")
		} else {
			s.mx[ec.Name] = x
		}
	}
	return nil
}

// stop drains and stops one export and removes its metrics.
func (s *service) stop(name string) error {
	e := s.exports[name]
	if e == nil {
		return nil
	}
	if x := s.mx[name]; x != nil {
		x.Unregister(s.reg)
		delete(s.mx, name)
	}
	delete(s.exports, name)
	return e.stop()
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
		readOnly: ec.ReadOnly, numQueues: ec.NumQueues, lanes: ec.Lanes, direct: ec.Direct, ioEngine: ec.IOEngine,
		serial: ec.Serial, writeback: ec.Writeback(), blockSize: ec.LogicalBlockSize, discard: ec.Discard, packed: ec.PackedRing,
		writeLog: ec.WriteLog, socketUID: ec.SocketUID, socketGID: ec.SocketGID, socketMode: ec.SocketMode,
		vduse: ec.VDUSE, vduseBus: ec.VDUSEBus,
		rbd: ec.RBD, cephConf: ec.CephConf, cephUser: ec.CephUser, cephKeyring: ec.CephKeyring, rbdTimeout: ec.RBDTimeout,
		rbdCache: ec.RBDCache,
		limits:   backendLimits(ec.Limits),
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
	ch := config.Diff(s.cfg, cfg)
	if ch.Global && cfg.Global.MetricsAddress != s.cfg.Global.MetricsAddress {
		s.log.Warn("metrics_address changed: it takes effect when vublk restarts")
	}
	s.applyGroups(cfg)
	// Limits change live: the export goes on, with the connection and the requests in flight.
	for _, name := range ch.Limited {
		if e, nc := s.exports[name], cfg.Lookup(name); e != nil {
			e.setLimits(backendLimits(nc.Limits), s.groups[nc.IOGroup])
			e.log.WithFields(logrus.Fields{"io_group": nc.IOGroup, "limited": e.engine.Throttle() != nil}).Info("I/O limits changed")
		}
	}
	// Stop first, so that a restarted or moved export frees its socket and file.
	for _, name := range append(slices.Clone(ch.Removed), ch.Changed...) {
		s.stop(name)
	}
	var failed []string
	for _, name := range ch.Resized {
		e := s.exports[name]
		nc := cfg.Lookup(name)
		if e == nil || nc.Size == 0 {
			continue
		}
		if err := e.resize(nc.Size); err != nil {
			e.log.WithError(err).Error("resize failed; the export keeps its size")
			failed = append(failed, name)
		}
	}
	// Start what is new or changed, and anything that is configured but not running (it failed
	// to start on an earlier reload).
	for _, nc := range cfg.Exports {
		if s.exports[nc.Name] != nil {
			continue
		}
		if err := s.start(nc); err != nil {
			s.log.WithError(err).Error("cannot start the export")
			failed = append(failed, nc.Name)
		}
	}
	s.cfg = cfg
	s.log.WithFields(logrus.Fields{
		"added": ch.Added, "removed": ch.Removed, "resized": ch.Resized, "restarted": ch.Changed, "limits": ch.Limited,
		"io_groups_changed": ch.IOGroups,
		"failed":            failed, "exports": len(s.exports),
	}).Info("configuration reloaded")
}

// stopAll drains and stops every export at once.
func (s *service) stopAll() error {
	var wg sync.WaitGroup
	errs := make(chan error, len(s.exports))
	for _, name := range slices.Sorted(maps.Keys(s.exports)) {
		wg.Add(1)
		go func(e *export) {
			defer wg.Done()
			errs <- e.stop()
		}(s.exports[name])
		if x := s.mx[name]; x != nil {
			x.Unregister(s.reg)
		}
	}
	wg.Wait()
	close(errs)
	s.exports, s.mx = map[string]*export{}, map[string]*metrics.Exporter{}
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	return errors.Join(all...)
}

// applyGroups makes the throttles of cfg's [[io_group]] tables: an existing group takes its new
// limits live, a new one gets a throttle (and metrics), and a group no longer in the file is
// forgotten (its exports have left it: they are restarted, or get their new limits, by the
// caller).
func (s *service) applyGroups(cfg *config.Config) {
	keep := map[string]bool{}
	for _, g := range cfg.IOGroups {
		keep[g.Name] = true
		l := backendLimits(g.Limits)
		if t := s.groups[g.Name]; t != nil {
			if t.Limits() != l {
				t.SetLimits(l)
				s.log.WithField("io_group", g.Name).Info("I/O group limits changed")
			}
			continue
		}
		t := backend.NewThrottle(l)
		s.groups[g.Name] = t
		if s.reg != nil {
			x := metrics.NewGroupExporter(g.Name, t)
			if err := s.reg.Register(x); err != nil {
				s.log.WithError(err).WithField("io_group", g.Name).Warn("no metrics for this I/O group")
			} else {
				s.groupsMx[g.Name] = x
			}
		}
	}
	for name := range s.groups {
		if !keep[name] {
			delete(s.groups, name)
			if x := s.groupsMx[name]; x != nil {
				s.reg.Unregister(x)
				delete(s.groupsMx, name)
			}
		}
	}
}
