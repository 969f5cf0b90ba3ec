package config

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// validate checks what decode cannot see in the document alone: the file system, and the
// exports against each other.
//
// Paths vublk creates (a missing backing file with a size, the socket, the write log) need not
// have their directories when the file is checked: systemd makes /run/vublk when it starts the
// service (RuntimeDirectory=), after ExecStartPre's "vublk check", and a fresh host has no
// /var/lib/vublk until the operator (or StateDirectory=) makes it. The directories must exist
// when the service starts; vublk does not create them. Only a path that cannot work whatever is
// created is refused here: one below an existing file that is not a directory.
func (p *parser) validate(cfg *Config) {
	if path, ok := strings.CutPrefix(cfg.Global.MetricsAddress, "unix:"); ok {
		p.checkSocketPath("global.metrics_address", path)
	}
	for i := range cfg.Exports {
		p.validateExport(fmt.Sprintf("export[%d]", i), &cfg.Exports[i])
	}
	p.crossCheck(cfg)
	p.checkIOGroups(cfg)
}

func (p *parser) validateExport(key string, e *Export) {
	if e.SocketPath != "" {
		p.checkSocketPath(key+".socket_path", e.SocketPath)
	}

	if e.File != "" {
		fi, err := os.Stat(e.File)
		switch {
		case err == nil && fi.IsDir():
			p.errorf(key+".file", "%s is a directory, not a file or block device", e.File)
		case err == nil && !fi.Mode().IsRegular() && !isBlockDevice(fi):
			p.errorf(key+".file", "%s is not a regular file or block device", e.File)
		case err == nil && isBlockDevice(fi) && e.Resize:
			p.errorf(key+".resize", "%s is a block device: resize applies only to regular files", e.File)
		case err == nil:
		case !errors.Is(err, fs.ErrNotExist):
			p.checkMissing(key+".file", e.File, err)
		case e.ReadOnly:
			p.errorf(key+".file", "%s does not exist, and a read-only export cannot create it", e.File)
		case !p.sized[key]:
			p.errorf(key+".file", "%s does not exist (set size to create it)", e.File)
		case e.Size == 0:
			// The size was refused, and said so.
		default:
			p.checkMissing(key+".file", e.File, err)
		}
	}

	for _, f := range []struct{ key, path string }{{"ceph_conf", e.CephConf}, {"ceph_keyring", e.CephKeyring}} {
		if f.path == "" {
			continue
		}
		if fi, err := os.Stat(f.path); err != nil {
			p.errorf(key+"."+f.key, "%s: %v", f.path, unwrapPath(err))
		} else if !fi.Mode().IsRegular() {
			p.errorf(key+"."+f.key, "%s is not a regular file", f.path)
		}
	}

	if e.WriteLog != "" {
		fi, err := os.Stat(e.WriteLog)
		switch {
		case err == nil && !fi.Mode().IsRegular():
			p.errorf(key+".write_log", "%s exists and is not a regular file", e.WriteLog)
		case err != nil:
			p.checkMissing(key+".write_log", e.WriteLog, err)
		}
	}
}

// checkSocketPath accepts a socket path that does not exist yet or holds a stale socket (it
// is replaced at start), not another kind of file.
func (p *parser) checkSocketPath(key, path string) {
	fi, err := os.Lstat(path)
	switch {
	case err == nil && fi.Mode()&fs.ModeSocket == 0:
		p.errorf(key, "%s exists and is not a socket", path)
	case err != nil:
		p.checkMissing(key, path, err)
	}
}

// checkMissing reports a stat error of a path vublk would create: not existing is fine unless
// an existing ancestor is not a directory; anything else (permissions) is a problem.
func (p *parser) checkMissing(key, path string, err error) {
	if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTDIR) {
		p.errorf(key, "%s: %v", path, unwrapPath(err))
		return
	}
	for dir := filepath.Dir(path); ; dir = filepath.Dir(dir) {
		fi, err := os.Stat(dir)
		if err == nil {
			if !fi.IsDir() {
				p.errorf(key, "cannot create %s: %s is not a directory", path, dir)
			}
			return
		}
		if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTDIR) {
			return // e.g. no permission to look: the service may have it
		}
		if dir == filepath.Dir(dir) {
			return
		}
	}
}

func isBlockDevice(fi fs.FileInfo) bool {
	return fi.Mode()&fs.ModeDevice != 0 && fi.Mode()&fs.ModeCharDevice == 0
}

func unwrapPath(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// claim is a path one export uses: its backing file, its socket or its write log. No two
// claims may be the same file.
type claim struct {
	export string // the export's name
	index  int
	key    string // "export[1].file"
	what   string // "file", "socket", "write log"
	path   string
	fi     fs.FileInfo // nil if it does not exist (yet)
}

// crossCheck finds exports that collide: the same name, the same inherited fd, or one file
// used twice, as the backing file, socket or write log of one or two exports. Paths are
// compared cleaned and absolute, and by identity (os.SameFile) when both exist, which sees
// through symlinks and hard links.
func (p *parser) crossCheck(cfg *Config) {
	names := map[string]int{}
	fds := map[int]int{}
	vduses := map[string]int{}
	var claims []claim
	images := map[string]int{} // writable RBD images, by "pool/image" and cluster
	if path, ok := strings.CutPrefix(cfg.Global.MetricsAddress, "unix:"); ok {
		c := claim{export: "", index: -1, key: "global.metrics_address", what: "metrics socket", path: path}
		if fi, err := os.Stat(path); err == nil {
			c.fi = fi
		}
		claims = append(claims, c)
	}
	for i := range cfg.Exports {
		e := &cfg.Exports[i]
		key := fmt.Sprintf("export[%d]", i)
		if e.Name != "" {
			if j, dup := names[e.Name]; dup {
				p.errorf(key+".name", "duplicate export name %q (also export[%d], line %d)", e.Name, j, cfg.Exports[j].Line)
			} else {
				names[e.Name] = i
			}
		}
		if e.VDUSE != "" {
			if j, dup := vduses[e.VDUSE]; dup {
				p.errorf(key+".vduse", "VDUSE device %q is also export %q's (line %d)", e.VDUSE, cfg.Exports[j].Name, cfg.Exports[j].Line)
			} else {
				vduses[e.VDUSE] = i
			}
		}
		if e.RBD != "" && !e.RBDSnap() && !e.ReadOnly {
			img := e.CephConf + "\x00" + e.RBD
			if j, dup := images[img]; dup {
				p.errorf(key+".rbd", "%s is also the image of export %q (line %d): two exports on one image would corrupt it", e.RBD, cfg.Exports[j].Name, cfg.Exports[j].Line)
			} else {
				images[img] = i
			}
		}
		if e.FD >= 0 {
			if j, dup := fds[e.FD]; dup {
				p.errorf(key+".fd", "fd %d is also export %q's (line %d)", e.FD, cfg.Exports[j].Name, cfg.Exports[j].Line)
			} else {
				fds[e.FD] = i
			}
		}
		for _, c := range []claim{
			{key: key + ".file", what: "file", path: e.File},
			{key: key + ".socket_path", what: "socket", path: e.SocketPath},
			{key: key + ".write_log", what: "write log", path: e.WriteLog},
		} {
			if c.path == "" {
				continue
			}
			c.export, c.index = e.Name, i
			if fi, err := os.Stat(c.path); err == nil {
				c.fi = fi
			}
			if o := findClaim(claims, c); o != nil {
				line := p.lines.lineOf(o.key)
				switch {
				case o.index == i:
					p.errorf(c.key, "%s is also this export's %s", c.path, o.what)
				case o.what == "file" && c.what == "file":
					p.errorf(c.key, "%s is also the backing file of export %q (line %d): two exports on one file would corrupt it", c.path, o.export, line)
				case o.index < 0:
					p.errorf(c.key, "%s is also the %s (line %d)", c.path, o.what, line)
				default:
					p.errorf(c.key, "%s is also export %q's %s (line %d)", c.path, o.export, o.what, line)
				}
				continue
			}
			claims = append(claims, c)
		}
	}
}

func findClaim(claims []claim, c claim) *claim {
	for i := range claims {
		o := &claims[i]
		if o.path == c.path || o.fi != nil && c.fi != nil && os.SameFile(o.fi, c.fi) {
			return o
		}
	}
	return nil
}
