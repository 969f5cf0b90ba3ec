// Package config reads vublk's TOML configuration file: global settings and any number of
// [[export]] tables, each one disk served on its own vhost-user socket.
//
// Load and Parse apply the defaults and validate everything before anything starts: the
// schema (unknown keys, types, ranges), the file system (backing files, sockets, write logs)
// and the exports against each other (names, sockets, backing files). Every problem is
// reported at once, as Errors, each formatted "file:line: key: message", where key is the
// TOML key with the index of its export, as in "export[1].socket_path".
//
// Relative paths in the file (file, socket_path, write_log) are relative to the directory of
// the configuration file, so a configuration means the same whatever the service's working
// directory; the Config holds them absolute.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/BurntSushi/toml"
)

// Values of Export.WriteCache.
const (
	WriteBack    = "writeback"    // the guest sees a volatile cache and sends flushes
	WriteThrough = "writethrough" // every write is durable before it completes
)

// Values of Export.IOEngine: how an export issues its reads and writes.
const (
	IOEngineLanes = "lanes" // a goroutine per lane blocks in preadv/pwritev
	IOEngineURing = "uring" // io_uring, where the kernel allows it
)

// Values of Export.VDUSEBus: the kernel driver a VDUSE export is bound to.
const (
	VDUSEBusVirtio = "virtio" // virtio_vdpa
	VDUSEBusVhost  = "vhost"  // vhost_vdpa
)

// Limits and defaults, the same as "vublk serve"'s flags.
const (
	DefaultNumQueues        = 16
	MaxNumQueues            = 64
	MaxLanes                = 1024
	DefaultLogicalBlockSize = 512
	// DefaultPackedRing is whether exports offer packed virtqueues (VIRTIO_F_RING_PACKED)
	// unless told.
	DefaultPackedRing = true
	// MaxSerial is VIRTIO_BLK_ID_BYTES (virtio 1.2, 5.2.6 "Device Operation"): the serial a
	// guest reads with VIRTIO_BLK_T_GET_ID.
	MaxSerial = 20
	// MaxSocketPath is the longest unix socket path Linux takes (sun_path is 108 bytes,
	// with the terminating NUL).
	MaxSocketPath = 107
	// MaxName is the longest export name.
	MaxName = 64
)

// Config is a whole configuration file.
type Config struct {
	File    string // the name it was loaded from
	Global  Global
	Exports []Export
	// IOGroups are the [[io_group]] tables: I/O limits shared by the exports that name them.
	IOGroups []IOGroup
}

// Global holds the settings of the [global] table, which apply to the whole service.
type Global struct {
	LogLevel  string // log_level: debug, info, warn or error; default info
	LogFormat string // log_format: text or json; default text
	Lanes     int    // lanes: I/O lanes of exports that do not set their own; default the number of CPUs
	Direct    bool   // direct: O_DIRECT for exports that do not set their own; default false
	IOEngine  string // io_engine: IOEngineLanes (default) or IOEngineURing, for exports that do not set their own
	// MetricsAddress is metrics_address: "host:port", or "unix:PATH" (made absolute), to serve
	// Prometheus metrics on; "" (the default) is off.
	MetricsAddress string
}

// Export is one [[export]] table: one disk on one vhost-user socket. Its fields hold the
// parsed, validated and defaulted values, ready to use; they mirror "vublk serve"'s flags.
type Export struct {
	Name       string // name: unique; used in logs and by "vublk libvirt-xml --export"
	SocketPath string // socket_path: absolute; "" when FD is used
	FD         int    // fd: an inherited listening unix socket; -1 when SocketPath is used
	File       string // file: absolute path of the regular file or block device
	Size       int64  // size in bytes ("20G" or an integer); 0 when not set. Creates a missing file.
	Resize     bool   // resize: also set an existing regular file to Size
	ReadOnly   bool   // read_only
	NumQueues  int    // num_queues: 1 to 64; default 16
	Lanes      int    // lanes: 1 to 1024; 0 or absent in the file means Global.Lanes, filled in here
	Serial     string // serial: at most 20 bytes; default Name, cut to 20 bytes
	WriteCache string // write_cache: WriteBack (default) or WriteThrough
	Direct     bool   // direct: open File with O_DIRECT (no host page cache); absent means Global.Direct
	IOEngine   string // io_engine: IOEngineLanes or IOEngineURing; absent means Global.IOEngine

	LogicalBlockSize int  // logical_block_size: 512 (default) or 4096
	Discard          bool // discard: offer DISCARD and WRITE_ZEROES; default true
	PackedRing       bool // packed_ring: offer VIRTIO_F_RING_PACKED (vhost-user only); default DefaultPackedRing

	// The socket's owner, group and mode, set after it is created (socket_path only): libvirt
	// runs QEMU as its own user, which must be able to connect.
	SocketOwner string      // socket_owner: a user name or numeric id, as written
	SocketGroup string      // socket_group: a group name or numeric id, as written
	SocketUID   int         // SocketOwner resolved; -1 when not set
	SocketGID   int         // SocketGroup resolved; -1 when not set
	SocketMode  os.FileMode // socket_mode: an octal string like "0660"; 0 when not set (leave it to the umask)

	WriteLog string // write_log: absolute path of the write log (see vublk replay); "" is off

	// VDUSE is vduse: the name of a VDUSE device to serve the disk to this host's kernel
	// instead of a vhost-user socket ("" when SocketPath or FD is used).
	VDUSE string
	// VDUSEBus is vduse_bus: VDUSEBusVirtio (default; a /dev/vdX of this host) or VDUSEBusVhost
	// (a /dev/vhost-vdpa-N for QEMU).
	VDUSEBus string

	// An RBD image instead of File: rbd = "pool/image" (or "pool/namespace/image", or
	// "pool/image@snap", served read-only), with the cluster's settings.
	RBD         string        // rbd; "" for a file export
	CephConf    string        // ceph_conf: absolute path of the ceph.conf; "" is librados' default
	CephUser    string        // ceph_user: cephx user without "client."; "" is admin
	CephKeyring string        // ceph_keyring: absolute path of the keyring; "" is what ceph.conf says
	RBDTimeout  time.Duration // rbd_timeout: a request the cluster has not answered by then fails; 0 waits
	RBDCache    bool          // rbd_cache: librbd's cache as ceph.conf says; false (default) turns it off

	// I/O limits (limits.go): the export's own, or those of its io_group (then Limits is
	// zero). Diff treats a change of either as one to apply live.
	Limits  Limits
	IOGroup string // io_group: the name of an [[io_group]]; "" is none

	Line int // the line of the [[export]] header, for messages at run time
}

// Writeback reports whether the guest sees a write-back cache.
func (e *Export) Writeback() bool { return e.WriteCache == WriteBack }

// Lookup returns the export called name, or nil.
func (c *Config) Lookup(name string) *Export {
	for i := range c.Exports {
		if c.Exports[i].Name == name {
			return &c.Exports[i]
		}
	}
	return nil
}

// Load reads and validates the configuration file at path. On failure the error is Errors.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return nil, Errors{{File: path, Msg: fmt.Sprintf("cannot read the configuration: %v", err)}}
	}
	return Parse(path, data)
}

// Parse validates the configuration data read from the file name: name is used in messages,
// and relative paths are taken relative to its directory. It checks the file system as Load
// does. On failure the error is Errors, holding every problem found.
func Parse(name string, data []byte) (*Config, error) {
	dir := "."
	if abs, err := filepath.Abs(name); err == nil {
		dir = filepath.Dir(abs)
	}
	p := &parser{file: name, dir: dir, sized: map[string]bool{}}
	var raw map[string]any
	if _, err := toml.Decode(string(data), &raw); err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, Errors{{File: name, Line: syntaxLine(data, pe), Key: pe.LastKey, Msg: "TOML syntax: " + pe.Message}}
		}
		return nil, Errors{{File: name, Msg: err.Error()}}
	}
	p.lines = scanKeyLines(string(data))
	cfg := p.decode(raw)
	p.validate(cfg)
	if len(p.errs) > 0 {
		return nil, p.errs.sorted()
	}
	return cfg, nil
}

// syntaxLine is the line of a TOML syntax error. The parser counts a newline it stopped at
// ("[global" and then the end of the line) as the next line; the byte offset does not.
func syntaxLine(data []byte, pe toml.ParseError) int {
	if pe.Position.Start < 0 || pe.Position.Start > len(data) {
		return pe.Position.Line
	}
	return 1 + bytes.Count(data[:pe.Position.Start], []byte("\n"))
}

// defaultLanes is Global.Lanes when the file does not set it.
func defaultLanes() int {
	return min(runtime.NumCPU(), MaxLanes)
}
