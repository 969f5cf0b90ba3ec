// Command vublk is a vhost-user-blk back-end: it serves a file or block
// device as a virtio-blk disk to QEMU over a unix socket.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/backend/rbd"
	"github.com/vublk/vublk/config"
	"github.com/vublk/vublk/virtio"
)

// exitUsage is the exit code for bad flags and unusable arguments.
const exitUsage = 2

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

const usage = `vublk: a vhost-user-blk back-end serving a file or block device to QEMU.

Usage:
  vublk serve --socket-path PATH --blk-file PATH [options]
  vublk serve --fd N --blk-file PATH [options]
  vublk serve --vduse NAME [--vduse-bus virtio|vhost] --blk-file PATH [options]
  vublk serve --socket-path PATH --blk-rbd POOL/IMAGE[@SNAP] [--ceph-conf FILE] [options]
  vublk serve --config FILE
  vublk replay --log PATH [--base IMAGE] --out IMAGE [--mark N] [--crash --seed S]
  vublk check --config FILE
  vublk libvirt-xml --config FILE --export NAME [--target vda] [--queues N]
  vublk bench --socket PATH [--rw MODE] [--bs N] [--iodepth N] [--queues N] [--runtime D] [--json]
  vublk --print-capabilities
  vublk help

Run "vublk serve -h" for the options.
`

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	switch args[0] {
	case "serve":
		return serve(args[1:], stdout, stderr)
	case "replay":
		return replay(args[1:], stdout, stderr)
	case "check":
		return check(args[1:], stdout, stderr)
	case "libvirt-xml":
		return libvirtXML(args[1:], stdout, stderr)
	case "bench":
		return bench(args[1:], stdout, stderr)
	case "help", "-h", "--help", "-help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	// The vhost-user back-end program conventions put the options at the top
	// level (vublk --print-capabilities, vublk --fd N --blk-file F).
	if len(args[0]) > 0 && args[0][0] == '-' {
		return serve(args, stdout, stderr)
	}
	fmt.Fprintf(stderr, "vublk: unknown command %q\n%s", args[0], usage)
	return exitUsage
}

// capabilities is the --print-capabilities answer (vhost-user.rst, "Back-end
// program conventions", block device type).
var capabilities = struct {
	Type     string   `json:"type"`
	Features []string `json:"features"`
}{"block", []string{"read-only", "blk-file"}}

type serveOptions struct {
	config      string
	socketPath  string
	fd          int
	blkFile     string
	blkRBD      string
	cephConf    string
	cephUser    string
	cephKeyring string
	rbdTimeout  time.Duration
	rbdCache    bool
	readOnly    bool
	numQueues   int
	lanes       int
	pollMax     time.Duration
	direct      bool
	ioEngine    string
	serial      string
	size        string
	resize      bool
	writeCache  string
	blockSize   int
	noDiscard   bool
	packedRing  bool
	name        string
	writeLog    string
	logLevel    string
	logFormat   string
	printCaps   bool
	cpuProfile  string
	limits      limitFlags
	vduse       string
	vduseBus    string
}

func serve(args []string, stdout, stderr io.Writer) int {
	var o serveOptions
	fs := flag.NewFlagSet("vublk serve", flag.ContinueOnError)
	fs.StringVar(&o.config, "config", "", "serve every export of this TOML file (SIGHUP reloads it); replaces the per-export flags")
	fs.StringVar(&o.socketPath, "socket-path", "", "unix socket to listen on for the vhost-user front-end (QEMU)")
	fs.IntVar(&o.fd, "fd", -1, "inherited listening unix socket descriptor, instead of --socket-path")
	fs.StringVar(&o.blkFile, "blk-file", "", "file or block device to export")
	fs.StringVar(&o.blkRBD, "blk-rbd", "", "Ceph RBD image to export instead: POOL/IMAGE, POOL/NAMESPACE/IMAGE, or POOL/IMAGE@SNAP (read-only)")
	fs.StringVar(&o.cephConf, "ceph-conf", "", "with --blk-rbd: the ceph.conf (default: librados' search, /etc/ceph/ceph.conf)")
	fs.StringVar(&o.cephUser, "ceph-user", "", "with --blk-rbd: the cephx user, without \"client.\" (default admin)")
	fs.StringVar(&o.cephKeyring, "ceph-keyring", "", "with --blk-rbd: the keyring file (default: what the ceph.conf says)")
	fs.BoolVar(&o.rbdCache, "rbd-cache", false, "with --blk-rbd: let librbd's cache run as ceph.conf says (faster writes, but writes completed since the last flush are lost if vublk dies)")
	fs.DurationVar(&o.rbdTimeout, "rbd-timeout", 0, "with --blk-rbd: fail a request the cluster has not answered after this long (e.g. 30s; 0 waits)")
	fs.BoolVar(&o.readOnly, "read-only", false, "export read-only (the guest sees a read-only disk)")
	fs.IntVar(&o.numQueues, "num-queues", 16, "most virtqueues a front-end may use (QEMU's num-queues must not exceed it)")
	fs.IntVar(&o.lanes, "lanes", runtime.NumCPU(), "parallel I/O lanes (file workers)")
	fs.DurationVar(&o.pollMax, "poll-max", 0, "poll a queue's ring for the next request for up to this long (self-tuning, e.g. 32us) before waiting for a kick; 0 never polls")
	fs.BoolVar(&o.direct, "direct", false, "open --blk-file with O_DIRECT: bypass the host page cache")
	fs.StringVar(&o.ioEngine, "io-engine", config.IOEngineLanes, "how reads and writes are issued: lanes (blocking workers) or uring (io_uring)")
	fs.StringVar(&o.serial, "serial", "", "disk serial returned to the guest (at most 20 bytes; default: the file's base name)")
	fs.StringVar(&o.size, "size", "", "create a sparse file of this size if --blk-file does not exist (bytes, or with K/M/G/T)")
	fs.BoolVar(&o.resize, "resize", false, "with --size: also resize an existing regular file")
	fs.StringVar(&o.writeCache, "write-cache", "writeback", "cache mode the guest sees: writeback (it sends flushes) or writethrough")
	fs.IntVar(&o.blockSize, "logical-block-size", 512, "logical block size the guest sees: 512 or 4096")
	fs.BoolVar(&o.noDiscard, "no-discard", false, "do not offer DISCARD and WRITE_ZEROES")
	fs.BoolVar(&o.packedRing, "packed-ring", config.DefaultPackedRing, "offer packed virtqueues (VIRTIO_F_RING_PACKED) to vhost-user front-ends")
	fs.StringVar(&o.name, "name", "", "export name for logs (default: the file's base name)")
	fs.StringVar(&o.writeLog, "write-log", "", "append every completed write, discard, write-zeroes and flush to this log (see vublk replay)")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	fs.BoolVar(&o.printCaps, "print-capabilities", false, "print the back-end capabilities as JSON and exit")
	fs.StringVar(&o.vduse, "vduse", "", "serve the disk to this host's kernel as the VDUSE device NAME (a /dev/vdX through virtio_vdpa), instead of a vhost-user socket")
	fs.StringVar(&o.vduseBus, "vduse-bus", config.VDUSEBusVirtio, "with --vduse: the vdpa driver, virtio (virtio_vdpa: a block device of this host) or vhost (vhost_vdpa: /dev/vhost-vdpa-N for QEMU)")
	fs.StringVar(&o.cpuProfile, "cpuprofile", "", "write a CPU profile of the server to this file until it exits (go tool pprof)")
	o.limits.register(fs)
	if code, ok := parseFlags(fs, args, stdout, stderr); !ok {
		return code
	}
	if o.cpuProfile != "" {
		f, err := os.Create(o.cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintf(stderr, "vublk: --cpuprofile: %v\n", err)
			return exitUsage
		}
		defer func() {
			pprof.StopCPUProfile()
			f.Close()
		}()
	}
	if o.printCaps {
		b, _ := json.Marshal(capabilities)
		fmt.Fprintln(stdout, string(b))
		return 0
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "vublk: "+format+"\n", a...)
		return exitUsage
	}
	if fs.NArg() > 0 {
		return fail("unexpected argument %q", fs.Arg(0))
	}
	if o.config != "" {
		if o.blkFile != "" || o.blkRBD != "" || o.socketPath != "" || o.fd >= 0 || o.vduse != "" {
			return fail("--config cannot be combined with --blk-file, --blk-rbd, --socket-path, --fd or --vduse: put the export in the file")
		}
		return serveConfig(o.config, stderr)
	}
	log, err := newLogger(o.logLevel, o.logFormat, stderr)
	if err != nil {
		return fail("%v", err)
	}
	var rbdSpec rbd.Spec
	if o.blkFile != "" && o.blkRBD != "" {
		return fail("--blk-file and --blk-rbd exclude each other: give one")
	}
	if o.blkRBD != "" {
		if rbdSpec, err = rbd.ParseSpec(o.blkRBD); err != nil {
			return fail("--blk-rbd: %v", err)
		}
		if !rbd.Built {
			return fail("--blk-rbd: %v", rbd.ErrNotBuilt)
		}
		if o.rbdTimeout < 0 || o.rbdTimeout > 0 && o.rbdTimeout < time.Second {
			return fail("--rbd-timeout must be 0 (wait) or at least 1s, not %v", o.rbdTimeout)
		}
		if o.direct || o.ioEngine != config.IOEngineLanes {
			return fail("--direct and --io-engine apply to --blk-file only (RBD reads and writes are librbd aio)")
		}
		if rbdSpec.Snap != "" {
			o.readOnly = true
		}
	} else if o.cephConf != "" || o.cephUser != "" || o.cephKeyring != "" || o.rbdTimeout != 0 || o.rbdCache {
		return fail("--ceph-conf, --ceph-user, --ceph-keyring, --rbd-timeout and --rbd-cache need --blk-rbd")
	}
	switch {
	case o.blkFile == "" && o.blkRBD == "":
		return fail("--blk-file is required (or --blk-rbd for an RBD image)")
	case o.vduse != "" && (o.socketPath != "" || o.fd >= 0):
		return fail("--vduse excludes --socket-path and --fd: a VDUSE export serves this host's kernel, not QEMU")
	case o.vduse == "" && (o.socketPath == "") == (o.fd < 0):
		return fail("exactly one of --socket-path, --fd and --vduse is required")
	case o.vduseBus != config.VDUSEBusVirtio && o.vduseBus != config.VDUSEBusVhost:
		return fail("--vduse-bus must be %s or %s, not %q", config.VDUSEBusVirtio, config.VDUSEBusVhost, o.vduseBus)
	case o.numQueues < 1 || o.numQueues > 64:
		return fail("--num-queues must be between 1 and 64, not %d", o.numQueues)
	case o.lanes < 1 || o.lanes > 1024:
		return fail("--lanes must be between 1 and 1024, not %d", o.lanes)
	case o.ioEngine != config.IOEngineLanes && o.ioEngine != config.IOEngineURing:
		return fail("--io-engine must be %s or %s, not %q", config.IOEngineLanes, config.IOEngineURing, o.ioEngine)
	case o.writeCache != "writeback" && o.writeCache != "writethrough":
		return fail("--write-cache must be writeback or writethrough, not %q", o.writeCache)
	case o.blockSize != 512 && o.blockSize != 4096:
		return fail("--logical-block-size must be 512 or 4096, not %d", o.blockSize)
	case len(o.serial) > virtio.BlkIDBytes:
		return fail("--serial %q is longer than %d bytes", o.serial, virtio.BlkIDBytes)
	}
	limits, err := o.limits.limits()
	if err != nil {
		return fail("%v", err)
	}
	var size int64
	if o.size != "" {
		if size, err = config.ParseSize(o.size); err != nil {
			return fail("--size: %v", err)
		}
		if size == 0 || size%int64(o.blockSize) != 0 {
			return fail("--size %s is not a positive multiple of %d bytes", o.size, o.blockSize)
		}
	}
	if o.socketPath != "" {
		if fi, err := os.Lstat(o.socketPath); err == nil && fi.Mode()&os.ModeSocket == 0 {
			return fail("--socket-path %s exists and is not a socket", o.socketPath)
		}
	}
	if o.blkRBD != "" {
		// The image is looked up when the export starts.
	} else if _, err := os.Stat(o.blkFile); err != nil && (size == 0 || !errors.Is(err, os.ErrNotExist)) {
		if errors.Is(err, os.ErrNotExist) {
			return fail("--blk-file %s does not exist (give --size to create it)", o.blkFile)
		}
		return fail("--blk-file %s: %v", o.blkFile, err)
	}
	if o.name == "" && o.blkRBD != "" {
		o.name = rbdSpec.Image
		if rbdSpec.Snap != "" {
			o.name += "@" + rbdSpec.Snap
		}
	}
	if o.name == "" {
		o.name = filepath.Base(o.blkFile)
	}
	if o.serial == "" {
		o.serial = o.name
		if len(o.serial) > virtio.BlkIDBytes {
			o.serial = o.serial[:virtio.BlkIDBytes]
		}
	}
	return runExport(o, size, limits, log)
}

// parseFlags parses args into fs. -h prints the options to stdout; a bad flag is one line on
// stderr and exit code 2. ok is false when the command must exit with code.
func parseFlags(fs *flag.FlagSet, args []string, stdout, stderr io.Writer) (code int, ok bool) {
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	switch {
	case err == nil:
		return 0, true
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprintf(stdout, "Usage of %s:\n", fs.Name())
		fs.SetOutput(stdout)
		fs.PrintDefaults()
		return 0, false
	default:
		fmt.Fprintf(stderr, "%s: %v (see %s -h)\n", fs.Name(), err, fs.Name())
		return exitUsage, false
	}
}

func newLogger(level, format string, w io.Writer) (*logrus.Logger, error) {
	log := logrus.New()
	log.SetOutput(w)
	lvl, err := logrus.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("--log-level: %v", err)
	}
	log.SetLevel(lvl)
	switch format {
	case "text":
		log.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, DisableColors: true})
	case "json":
		log.SetFormatter(&logrus.JSONFormatter{})
	default:
		return nil, fmt.Errorf("--log-format must be text or json, not %q", format)
	}
	for _, h := range virtio.TestHooks() {
		log.Warn("test hook on: " + h)
	}
	return log, nil
}

// runExport serves one export from flags until SIGINT or SIGTERM.
func runExport(o serveOptions, size int64, limits backend.Limits, logger *logrus.Logger) int {
	// Take over SIGINT and SIGTERM before announcing readiness: from "export ready" on, a signal
	// means drain, sync and exit 0.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	e, err := startExport(exportSpec{
		name: o.name, socketPath: o.socketPath, fd: o.fd, file: o.blkFile, size: size, resize: o.resize,
		readOnly: o.readOnly, numQueues: o.numQueues, lanes: o.lanes, direct: o.direct, ioEngine: o.ioEngine,
		pollMax: o.pollMax, serial: o.serial, writeback: o.writeCache == "writeback", blockSize: o.blockSize, discard: !o.noDiscard, packed: o.packedRing,
		writeLog: o.writeLog, socketUID: -1, socketGID: -1, vduse: o.vduse, vduseBus: o.vduseBus,
		rbd: o.blkRBD, cephConf: o.cephConf, cephUser: o.cephUser, cephKeyring: o.cephKeyring, rbdTimeout: o.rbdTimeout,
		rbdCache: o.rbdCache,
		limits:   limits,
	}, logger)
	if err != nil {
		logger.WithError(err).Error("cannot start the export")
		if errors.As(err, new(engineError)) {
			return 1 // not a usage error: the kernel refused the I/O engine
		}
		return exitUsage
	}
	notifySystemd(logger, daemon.SdNotifyReady)
	code := 0
	select {
	case sig := <-sigs:
		e.log.WithField("signal", sig.String()).Info("stopping: draining requests and syncing")
	case err := <-e.served:
		if err != nil {
			e.log.WithError(err).Error("server failed")
			code = 1
		}
	}
	notifySystemd(logger, daemon.SdNotifyStopping)
	if err := e.stop(); err != nil {
		code = 1
	}
	return code
}
