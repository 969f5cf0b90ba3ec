package config

import (
	"fmt"
	"math"
	"os"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// parser turns the document toml decoded into a Config, collecting every problem.
//
// The document is decoded into plain maps rather than structs on purpose: the toml struct
// decoder stops at the first type mismatch, matches keys case-insensitively (NAME would pass for
// name), and its MetaData.Undecoded names keys without the index of their [[export]], so
// neither the line nor the export of an unknown key could be told. Here each table's keys are
// checked against the schema by hand.
type parser struct {
	file  string
	dir   string // relative paths are relative to it
	lines keyLines
	errs  Errors
	sized map[string]bool // exports ("export[1]") with a size, even one that was refused
}

func (p *parser) errorf(key, format string, a ...any) {
	p.errs = append(p.errs, &Error{File: p.file, Line: p.lines.lineOf(key), Key: key, Msg: fmt.Sprintf(format, a...)})
}

// table is one TOML table being read; every key asked for is known, the others are not.
type table struct {
	p     *parser
	key   string // "global", "export[1]"
	m     map[string]any
	known map[string]bool
}

func (p *parser) table(key string, m map[string]any) *table {
	return &table{p: p, key: key, m: m, known: map[string]bool{}}
}

func (t *table) path(k string) string { return joinKey(t.key, k) }

// get returns the raw value of k, if it is there.
func (t *table) get(k string) (any, bool) {
	t.known[k] = true
	v, ok := t.m[k]
	return v, ok
}

func (t *table) typeError(k, want string, v any) {
	t.p.errorf(t.path(k), "must be %s, not %s", want, tomlType(v))
}

func (t *table) str(k string) (string, bool) {
	v, ok := t.get(k)
	if !ok {
		return "", false
	}
	s, ok := v.(string)
	if !ok {
		t.typeError(k, "a string", v)
	}
	return s, ok
}

func (t *table) boolean(k string) (bool, bool) {
	v, ok := t.get(k)
	if !ok {
		return false, false
	}
	b, ok := v.(bool)
	if !ok {
		t.typeError(k, "true or false", v)
	}
	return b, ok
}

// integer returns k if it is an integer in [lo, hi].
func (t *table) integer(k string, lo, hi int64) (int, bool) {
	v, ok := t.get(k)
	if !ok {
		return 0, false
	}
	n, ok := v.(int64)
	if !ok {
		t.typeError(k, "an integer", v)
		return 0, false
	}
	if n < lo || n > hi {
		if hi == math.MaxInt32 {
			t.p.errorf(t.path(k), "must be at least %d, not %d", lo, n)
		} else {
			t.p.errorf(t.path(k), "must be between %d and %d, not %d", lo, hi, n)
		}
		return 0, false
	}
	return int(n), true
}

// oneOf returns k if it is one of the strings in allowed.
func (t *table) oneOf(k string, allowed ...string) (string, bool) {
	s, ok := t.str(k)
	if !ok {
		return "", false
	}
	for _, a := range allowed {
		if s == a {
			return s, true
		}
	}
	t.p.errorf(t.path(k), "must be %s, not %q", orList(allowed), s)
	return "", false
}

// filePath returns k as an absolute path, relative paths taken from the configuration's
// directory.
func (t *table) filePath(k string) (string, bool) {
	s, ok := t.str(k)
	if !ok {
		return "", false
	}
	if s == "" {
		t.p.errorf(t.path(k), "is empty")
		return "", false
	}
	if strings.IndexByte(s, 0) >= 0 {
		t.p.errorf(t.path(k), "contains a NUL byte")
		return "", false
	}
	if !filepath.IsAbs(s) {
		s = filepath.Join(t.p.dir, s)
	}
	return filepath.Clean(s), true
}

// unknown reports every key of the table that was not asked for, in the order of the file.
func (t *table) unknown() {
	var keys []string
	for k := range t.m {
		if !t.known[k] {
			keys = append(keys, k)
		}
	}
	sort.Slice(keys, func(i, j int) bool {
		li, lj := t.p.lines.lineOf(t.path(keys[i])), t.p.lines.lineOf(t.path(keys[j]))
		return li < lj || li == lj && keys[i] < keys[j]
	})
	for _, k := range keys {
		msg := "unknown key"
		if s := t.suggest(k); s != "" {
			msg += fmt.Sprintf(" (did you mean %s?)", s)
		}
		t.p.errorf(t.path(k), "%s", msg)
	}
}

// suggest finds the known key k was probably meant to be: another case, dashes for underscores.
func (t *table) suggest(k string) string {
	norm := strings.ToLower(strings.ReplaceAll(k, "-", "_"))
	for known := range t.known {
		if norm == known {
			return known
		}
	}
	return ""
}

// decode reads the whole document into a Config. Only problems in the document itself are
// found here; validate looks at the file system and at the exports together.
func (p *parser) decode(raw map[string]any) *Config {
	cfg := &Config{File: p.file}
	root := p.table("", raw)

	cfg.Global = Global{LogLevel: "info", LogFormat: "text", Lanes: defaultLanes(), IOEngine: IOEngineLanes}
	if v, ok := root.get("global"); ok {
		if m, ok := v.(map[string]any); ok {
			p.decodeGlobal(&cfg.Global, p.table("global", m))
		} else {
			root.typeError("global", "a table ([global])", v)
		}
	}

	p.decodeIOGroups(root, cfg)
	if v, ok := root.get("export"); ok {
		tables, ok := tableArray(v)
		if !ok {
			root.typeError("export", "an array of tables ([[export]])", v)
		}
		for i, m := range tables {
			cfg.Exports = append(cfg.Exports, p.decodeExport(p.table(fmt.Sprintf("export[%d]", i), m), &cfg.Global))
		}
	}
	root.unknown()
	if len(cfg.Exports) == 0 && len(p.errs) == 0 {
		p.errs = append(p.errs, &Error{File: p.file, Key: "export", Msg: "no [[export]] tables: nothing to serve"})
	}
	return cfg
}

// tableArray accepts [[export]] tables and export = [{...}, {...}].
func tableArray(v any) ([]map[string]any, bool) {
	switch v := v.(type) {
	case []map[string]any:
		return v, true
	case []any:
		tables := make([]map[string]any, 0, len(v))
		for _, e := range v {
			m, ok := e.(map[string]any)
			if !ok {
				return nil, false
			}
			tables = append(tables, m)
		}
		return tables, true
	}
	return nil, false
}

func (p *parser) decodeGlobal(g *Global, t *table) {
	if s, ok := t.oneOf("log_level", "debug", "info", "warn", "error"); ok {
		g.LogLevel = s
	}
	if s, ok := t.oneOf("log_format", "text", "json"); ok {
		g.LogFormat = s
	}
	if n, ok := t.integer("lanes", 1, MaxLanes); ok {
		g.Lanes = n
	}
	if b, ok := t.boolean("direct"); ok {
		g.Direct = b
	}
	if s, ok := t.oneOf("io_engine", IOEngineLanes, IOEngineURing); ok {
		g.IOEngine = s
	}
	if s, ok := t.str("metrics_address"); ok && s != "" {
		if path, isUnix := strings.CutPrefix(s, "unix:"); isUnix {
			if path == "" {
				p.errorf(t.path("metrics_address"), "%q: give the socket path after unix:", s)
			} else {
				if !filepath.IsAbs(path) {
					path = filepath.Join(p.dir, path)
				}
				path = filepath.Clean(path)
				if len(path) > MaxSocketPath {
					p.errorf(t.path("metrics_address"), "%s is %d bytes long; a unix socket path has at most %d", path, len(path), MaxSocketPath)
				}
				g.MetricsAddress = "unix:" + path
			}
		} else if err := checkHostPort(s); err != nil {
			p.errorf(t.path("metrics_address"), "%v", err)
		} else {
			g.MetricsAddress = s
		}
	}
	t.unknown()
}

// checkHostPort accepts what net.Listen("tcp", s) takes with a fixed port: "host:port",
// ":port", "[::1]:port". (metrics_address may also be "unix:PATH".)
func checkHostPort(s string) error {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return fmt.Errorf("%q is not host:port (\":9100\" listens on every address)", s)
	}
	host, port := s[:i], s[i+1:]
	if strings.HasPrefix(host, "[") != strings.HasSuffix(host, "]") || strings.ContainsAny(strings.Trim(host, "[]"), "[] ") {
		return fmt.Errorf("%q: bad host %q", s, host)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("%q: bad port %q", s, port)
	}
	return nil
}

func (p *parser) decodeExport(t *table, g *Global) Export {
	e := Export{
		FD:               -1,
		NumQueues:        DefaultNumQueues,
		WriteCache:       WriteBack,
		LogicalBlockSize: DefaultLogicalBlockSize,
		Discard:          true,
		PackedRing:       DefaultPackedRing,
		SocketUID:        -1,
		SocketGID:        -1,
		Line:             p.lines.lineOf(t.key),
	}
	if s, ok := t.str("name"); ok {
		if err := checkName(s); err != nil {
			p.errorf(t.path("name"), "%v", err)
		}
		e.Name = s
	} else if _, there := t.m["name"]; !there {
		p.errorf(t.path("name"), "missing: every export needs a name")
	}

	sock, hasSock := t.filePath("socket_path")
	if hasSock {
		e.SocketPath = sock
		if len(sock) > MaxSocketPath {
			p.errorf(t.path("socket_path"), "%s is %d bytes long; a unix socket path has at most %d", sock, len(sock), MaxSocketPath)
		}
	}
	fd, hasFD := t.integer("fd", 0, math.MaxInt32)
	if hasFD {
		e.FD = fd
	}
	_, sockThere := t.m["socket_path"]
	_, fdThere := t.m["fd"]
	_, vduseThere := t.m["vduse"]
	if s, ok := t.str("vduse"); ok {
		if err := checkVDUSEName(s); err != nil {
			p.errorf(t.path("vduse"), "%v", err)
		}
		e.VDUSE = s
	}
	if s, ok := t.str("vduse_bus"); ok {
		if s != VDUSEBusVirtio && s != VDUSEBusVhost {
			p.errorf(t.path("vduse_bus"), "must be %q or %q, not %q", VDUSEBusVirtio, VDUSEBusVhost, s)
		}
		e.VDUSEBus = s
		if !vduseThere {
			p.errorf(t.path("vduse_bus"), "applies only to vduse exports")
		}
	} else if vduseThere {
		e.VDUSEBus = VDUSEBusVirtio
	}
	switch {
	case sockThere && fdThere:
		p.errorf(t.path("fd"), "socket_path and fd exclude each other: give one")
	case vduseThere && (sockThere || fdThere):
		p.errorf(t.path("vduse"), "vduse excludes socket_path and fd: a VDUSE export serves this host's kernel, not QEMU")
	case !sockThere && !fdThere && !vduseThere:
		p.errorf(t.path("socket_path"), "missing: give socket_path (or fd, an inherited listening socket, or vduse, a VDUSE device name)")
	}

	_, rbdThere := t.m["rbd"]
	if f, ok := t.filePath("file"); ok {
		e.File = f
		if rbdThere {
			p.errorf(t.path("rbd"), "file and rbd exclude each other: give one")
		}
	} else if _, there := t.m["file"]; !there && !rbdThere {
		p.errorf(t.path("file"), "missing: give the file or block device to export (or rbd, an RBD image)")
	}
	p.decodeRBD(t, &e, rbdThere)

	if n, ok := t.oneOfInt("logical_block_size", 512, 4096); ok {
		e.LogicalBlockSize = n
	}
	if v, ok := t.get("size"); ok {
		e.Size = p.size(t, v, e.LogicalBlockSize)
		p.sized[t.key] = true
	}
	if b, ok := t.boolean("resize"); ok {
		e.Resize = b
		if b && e.Size == 0 {
			if _, there := t.m["size"]; !there {
				p.errorf(t.path("resize"), "resize needs size: the size to set the file to")
			}
		}
	}
	if b, ok := t.boolean("read_only"); ok {
		e.ReadOnly = b
		if b && e.Resize {
			p.errorf(t.path("resize"), "a read-only export cannot resize its file")
		}
	}
	if e.RBDSnap() && !e.ReadOnly {
		e.ReadOnly = true // a snapshot is served read-only
		if e.Resize {
			p.errorf(t.path("resize"), "a snapshot is read-only: it cannot be resized")
		}
	}
	if n, ok := t.integer("num_queues", 1, MaxNumQueues); ok {
		e.NumQueues = n
	}
	e.Lanes = g.Lanes
	if n, ok := t.integer("lanes", 0, MaxLanes); ok && n > 0 {
		e.Lanes = n
	}
	if s, ok := t.str("serial"); ok {
		if len(s) > MaxSerial {
			p.errorf(t.path("serial"), "%q is %d bytes long; a virtio-blk serial has at most %d", s, len(s), MaxSerial)
		}
		e.Serial = s
	} else {
		e.Serial = e.Name
		if len(e.Serial) > MaxSerial {
			e.Serial = e.Serial[:MaxSerial]
		}
	}
	if s, ok := t.oneOf("write_cache", WriteBack, WriteThrough); ok {
		e.WriteCache = s
	}
	e.Direct = g.Direct
	if b, ok := t.boolean("direct"); ok {
		e.Direct = b
	}
	e.IOEngine = g.IOEngine
	if s, ok := t.oneOf("io_engine", IOEngineLanes, IOEngineURing); ok {
		e.IOEngine = s
	}
	if b, ok := t.boolean("discard"); ok {
		e.Discard = b
	}
	if b, ok := t.boolean("packed_ring"); ok {
		e.PackedRing = b
	}

	if s, ok := t.str("socket_owner"); ok {
		e.SocketOwner = s
		if uid, err := lookupID(s, lookupUser); err != nil {
			p.errorf(t.path("socket_owner"), "%v", err)
		} else {
			e.SocketUID = uid
		}
	}
	if s, ok := t.str("socket_group"); ok {
		e.SocketGroup = s
		if gid, err := lookupID(s, lookupGroup); err != nil {
			p.errorf(t.path("socket_group"), "%v", err)
		} else {
			e.SocketGID = gid
		}
	}
	if v, ok := t.get("socket_mode"); ok {
		e.SocketMode = p.mode(t, v)
	}
	if fdThere && !sockThere {
		for _, k := range []string{"socket_owner", "socket_group", "socket_mode"} {
			if _, there := t.m[k]; there {
				p.errorf(t.path(k), "applies only to socket_path: vublk does not create an inherited socket")
			}
		}
	}

	if s, ok := t.filePath("write_log"); ok {
		e.WriteLog = s
	}
	e.Limits = p.limits(t)
	if s, ok := t.str("io_group"); ok {
		e.IOGroup = s
	}
	t.unknown()
	return e
}

// oneOfInt returns k if it is an integer among allowed.
func (t *table) oneOfInt(k string, allowed ...int64) (int, bool) {
	v, ok := t.get(k)
	if !ok {
		return 0, false
	}
	n, ok := v.(int64)
	if !ok {
		t.typeError(k, "an integer", v)
		return 0, false
	}
	var s []string
	for _, a := range allowed {
		if n == a {
			return int(n), true
		}
		s = append(s, strconv.FormatInt(a, 10))
	}
	t.p.errorf(t.path(k), "must be %s, not %d", orList(s), n)
	return 0, false
}

// size reads size: "20G" (see ParseSize) or an integer number of bytes, a positive multiple of
// the logical block size. It returns 0 after reporting a problem.
func (p *parser) size(t *table, v any, blockSize int) int64 {
	key := t.path("size")
	var n int64
	switch v := v.(type) {
	case string:
		var err error
		if n, err = ParseSize(v); err != nil {
			p.errorf(key, "%v", err)
			return 0
		}
	case int64:
		n = v
	default:
		t.typeError("size", `a size like "20G" or an integer number of bytes`, v)
		return 0
	}
	if n <= 0 || n%int64(blockSize) != 0 {
		p.errorf(key, "%v is not a positive multiple of the logical block size, %d bytes", v, blockSize)
		return 0
	}
	return n
}

// mode reads socket_mode, an octal string such as "0660". A TOML integer is refused: 660
// would be decimal and 0o660 cannot be told from 432.
func (p *parser) mode(t *table, v any) os.FileMode {
	key := t.path("socket_mode")
	s, ok := v.(string)
	if !ok {
		p.errorf(key, "must be an octal string like \"0660\", not %s", tomlType(v))
		return 0
	}
	m, err := strconv.ParseUint(strings.TrimPrefix(s, "0o"), 8, 32)
	if err != nil || s == "" {
		p.errorf(key, "%q is not an octal mode like \"0660\"", s)
		return 0
	}
	if m > 0o777 || m == 0 {
		p.errorf(key, "%q must be between 0001 and 0777 (permission bits only)", s)
		return 0
	}
	return os.FileMode(m)
}

// checkName accepts names that are safe in logs, metric labels and file names.
func checkName(s string) error {
	if s == "" {
		return fmt.Errorf("is empty")
	}
	if len(s) > MaxName {
		return fmt.Errorf("%q is longer than %d bytes", s, MaxName)
	}
	for i := 0; i < len(s); i++ {
		if !isBareKeyChar(s[i]) && s[i] != '.' {
			return fmt.Errorf("%q: use only letters, digits, '.', '_' and '-'", s)
		}
	}
	return nil
}

type idKind int

const (
	lookupUser idKind = iota
	lookupGroup
)

// lookupID resolves a user or group name to its numeric id. A number is taken as an id as it is:
// chown needs no passwd entry for it.
func lookupID(s string, kind idKind) (int, error) {
	what := "user"
	if kind == lookupGroup {
		what = "group"
	}
	if s == "" {
		return 0, fmt.Errorf("is empty")
	}
	if n, err := strconv.ParseUint(s, 10, 31); err == nil {
		return int(n), nil
	}
	var id string
	if kind == lookupUser {
		u, err := user.Lookup(s)
		if err != nil {
			return 0, fmt.Errorf("no %s %q on this host", what, s)
		}
		id = u.Uid
	} else {
		g, err := user.LookupGroup(s)
		if err != nil {
			return 0, fmt.Errorf("no %s %q on this host", what, s)
		}
		id = g.Gid
	}
	n, err := strconv.Atoi(id)
	if err != nil {
		return 0, fmt.Errorf("%s %q has the id %q, not a number", what, s, id)
	}
	return n, nil
}

// tomlType names the TOML type of a decoded value, for messages.
func tomlType(v any) string {
	switch v.(type) {
	case string:
		return "a string"
	case int64:
		return "an integer"
	case float64:
		return "a float"
	case bool:
		return "a boolean"
	case time.Time:
		return "a date-time"
	case map[string]any:
		return "a table"
	case []map[string]any:
		return "an array of tables"
	case []any:
		return "an array"
	}
	return fmt.Sprintf("a %T", v)
}

func orList(s []string) string {
	switch len(s) {
	case 0:
		return "nothing"
	case 1:
		return s[0]
	}
	return strings.Join(s[:len(s)-1], ", ") + " or " + s[len(s)-1]
}

// checkVDUSEName accepts a VDUSE device name: it names /dev/vduse/NAME and the vdpa device.
func checkVDUSEName(s string) error {
	if s == "" || len(s) > MaxName {
		return fmt.Errorf("%q: a VDUSE device name has 1 to %d bytes", s, MaxName)
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') || s == "." || s == ".." || s == "control" {
			return fmt.Errorf("%q: a VDUSE device name is letters, digits, '-', '_' and '.', and not \"control\"", s)
		}
	}
	return nil
}
