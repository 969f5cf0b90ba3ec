package config

import (
	"strings"
	"time"

	"github.com/vublk/vublk/backend/rbd"
)

// MaxRBDTimeout is the longest rbd_timeout.
const MaxRBDTimeout = 24 * time.Hour

// decodeRBD reads an export's RBD keys: rbd ("pool/image" or "pool/image@snap"), ceph_conf,
// ceph_user, ceph_keyring and rbd_timeout. The Ceph keys need rbd.
func (p *parser) decodeRBD(t *table, e *Export, rbdThere bool) {
	if s, ok := t.str("rbd"); ok {
		if _, err := rbd.ParseSpec(s); err != nil {
			p.errorf(t.path("rbd"), "%v", err)
		} else if !rbd.Built {
			p.errorf(t.path("rbd"), "%v", rbd.ErrNotBuilt)
		}
		e.RBD = s
	}
	if s, ok := t.filePath("ceph_conf"); ok {
		e.CephConf = s
	}
	if s, ok := t.filePath("ceph_keyring"); ok {
		e.CephKeyring = s
	}
	if s, ok := t.str("ceph_user"); ok {
		if s == "" || strings.ContainsAny(s, "\x00 ") || strings.HasPrefix(s, "client.") {
			p.errorf(t.path("ceph_user"), "%q is not a cephx user name (without \"client.\", e.g. \"admin\")", s)
		}
		e.CephUser = s
	}
	if v, ok := t.get("rbd_timeout"); ok {
		var d time.Duration
		switch v := v.(type) {
		case string:
			var err error
			if d, err = time.ParseDuration(v); err != nil {
				p.errorf(t.path("rbd_timeout"), "%q is not a duration like \"30s\"", v)
				d = -1
			}
		case int64:
			d = time.Duration(v) * time.Second
		default:
			t.typeError("rbd_timeout", `a duration like "30s" or an integer number of seconds`, v)
			d = -1
		}
		if d == 0 || d > 0 && d < time.Second || d > MaxRBDTimeout {
			p.errorf(t.path("rbd_timeout"), "must be between 1s and %v (leave it out to wait as long as the cluster takes)", MaxRBDTimeout)
		} else if d > 0 {
			e.RBDTimeout = d
		}
	}
	if b, ok := t.boolean("rbd_cache"); ok {
		e.RBDCache = b
	}
	if !rbdThere {
		for _, k := range []string{"ceph_conf", "ceph_user", "ceph_keyring", "rbd_timeout", "rbd_cache"} {
			if _, there := t.m[k]; there {
				p.errorf(t.path(k), "applies only to an RBD export (rbd = \"pool/image\")")
			}
		}
	}
}

// RBDSnap reports whether the export serves an RBD snapshot ("pool/image@snap").
func (e *Export) RBDSnap() bool { return e.RBD != "" && strings.Contains(e.RBD, "@") }
