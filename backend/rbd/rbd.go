// Package rbd is a backend.Store on a Ceph RBD image, through librbd.
//
// Reads and writes are librbd aio requests (rbd_aio_readv, rbd_aio_writev) issued from the
// submitting goroutine: the store implements backend.AsyncIO, so no lane and no OS thread waits
// for a request in flight. librbd completes them on its own threads into a C callback that
// queues the completion and wakes one reaper goroutine through an eventfd (in the Go
// netpoller); the reaper takes every queued completion in one call and completes them. Sync is
// rbd_flush: it returns once every write librbd acknowledged before it (its writeback cache
// included) is on the OSDs.
//
// The librbd code needs cgo, librbd-dev and the build tag "rbd" (the Makefile sets both). A
// build without them has the same API, and Open fails with ErrNotBuilt.
package rbd

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// ErrNotBuilt is returned by Open in a vublk built without librbd.
var ErrNotBuilt = errors.New("built without RBD support: build with `make` (cgo, librbd-dev), i.e. go build -tags rbd")

// Spec names an image, or a snapshot of it: "pool/image" or "pool/image@snap". A pool may be
// followed by a namespace: "pool/namespace/image".
type Spec struct {
	Pool      string
	Namespace string
	Image     string
	Snap      string // "": the image itself
}

// ParseSpec parses "pool[/namespace]/image[@snap]".
func ParseSpec(s string) (Spec, error) {
	var sp Spec
	rest, snap, hasSnap := strings.Cut(s, "@")
	if hasSnap {
		if snap == "" {
			return sp, fmt.Errorf("%q: empty snapshot name after @", s)
		}
		sp.Snap = snap
	}
	parts := strings.Split(rest, "/")
	switch len(parts) {
	case 2:
		sp.Pool, sp.Image = parts[0], parts[1]
	case 3:
		sp.Pool, sp.Namespace, sp.Image = parts[0], parts[1], parts[2]
	default:
		return sp, fmt.Errorf("%q is not pool/image, pool/namespace/image or pool/image@snap", s)
	}
	for _, p := range []string{sp.Pool, sp.Namespace, sp.Image, sp.Snap} {
		if strings.ContainsAny(p, "\x00@") {
			return sp, fmt.Errorf("%q: a name may not contain NUL or @", s)
		}
	}
	if sp.Pool == "" || sp.Image == "" || len(parts) == 3 && sp.Namespace == "" {
		return sp, fmt.Errorf("%q: empty pool, namespace or image name", s)
	}
	return sp, nil
}

// String is the spec as ParseSpec reads it.
func (sp Spec) String() string {
	s := sp.Pool + "/"
	if sp.Namespace != "" {
		s += sp.Namespace + "/"
	}
	s += sp.Image
	if sp.Snap != "" {
		s += "@" + sp.Snap
	}
	return s
}

// Options say how Open connects and opens the image.
type Options struct {
	// ConfFile is the ceph.conf to read ("": librados' default search, /etc/ceph/ceph.conf).
	ConfFile string
	// User is the cephx user without "client." ("": admin).
	User string
	// Keyring is the keyring file ("": what ConfFile says, or librados' default).
	Keyring string
	// ReadOnly opens the image read-only; a snapshot is always read-only.
	ReadOnly bool
	// CreateSize, when positive, creates the image with this size if it does not exist. An
	// existing image keeps its size unless Resize.
	CreateSize int64
	// Resize sets an existing image to CreateSize.
	Resize bool
	// Timeout bounds every librados operation (rados_osd_op_timeout, rados_mon_op_timeout,
	// client_mount_timeout): a request the cluster has not answered by then fails (ETIMEDOUT),
	// and so does a connection that cannot be made. 0 waits as long as it takes (requests hang
	// while the cluster is unavailable and go on when it is back).
	Timeout time.Duration
	// Cache lets librbd's cache run as ceph.conf says (rbd_cache, rbd_cache_policy): librbd then
	// acknowledges writes before the OSDs have them, and a vublk that dies (SIGKILL, a crash)
	// loses the writes it completed to the guest since its last flush, without the guest
	// knowing: a restarted vublk cannot give them back. Off (the default) sets rbd_cache=false:
	// a write completes once the OSDs have it, so a restarted vublk loses nothing the guest saw
	// complete, as with a file in the host's page cache.
	Cache bool
	// Slots is how many reads and writes may be in flight in librbd at once (default 256);
	// more wait on the lanes.
	Slots int
	// NoAIO makes reads and writes blocking librbd calls on the lanes, one OS thread waiting per
	// request in flight (what a binding without aio does). For comparison only.
	NoAIO bool
	// ClientConf are more librados/librbd options, "key=value", set after vublk's own
	// (rbd_cache, the timeouts, rbd_non_blocking_aio=false), which they override. For
	// measurements and tests.
	ClientConf []string
}
