//go:build rbd && cgo

package rbd

// The C side of the binding: librados/librbd handles, and the aio completion queue.
//
// librbd completes an aio request on one of its own threads by calling vublk_complete, which
// must not call into Go (that would bind a Go M to every librbd thread and cost a cgo callback
// per request). It records the result in the request's slot, appends the slot's index to the
// done ring under a mutex, and writes the eventfd only when the ring was empty: the reaper
// goroutine, woken through the netpoller, takes the whole ring in one vublk_reap call. Slots,
// their iovec arrays and the ring are C memory, allocated once per image.

/*
#cgo LDFLAGS: -lrbd -lrados
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include <rados/librados.h>
#include <rbd/librbd.h>

struct vublk_aio;

typedef struct vublk_slot {
	struct vublk_aio *q;
	uint32_t idx;
	int64_t ret;
	struct iovec *iov; // maxiov entries
} vublk_slot;

typedef struct vublk_aio {
	rbd_image_t image;
	int efd;
	pthread_mutex_t mu;
	uint32_t n;     // slots
	uint32_t head;  // first completed index in done
	uint32_t count; // completed, not yet reaped
	uint32_t *done; // ring of completed slot indices (n entries: never more in flight)
	vublk_slot *slots;
	struct iovec *iovs; // n * maxiov
	int maxiov;
} vublk_aio;

static void vublk_complete(rbd_completion_t c, void *arg) {
	vublk_slot *s = arg;
	vublk_aio *q = s->q;
	s->ret = rbd_aio_get_return_value(c);
	rbd_aio_release(c);
	pthread_mutex_lock(&q->mu);
	q->done[(q->head + q->count) % q->n] = s->idx;
	int wake = q->count++ == 0;
	pthread_mutex_unlock(&q->mu);
	if (wake) {
		uint64_t one = 1;
		while (write(q->efd, &one, sizeof one) < 0 && errno == EINTR) {
		}
	}
}

static vublk_aio *vublk_aio_new(rbd_image_t image, int efd, uint32_t n, int maxiov) {
	vublk_aio *q = calloc(1, sizeof *q);
	if (q == NULL) return NULL;
	q->image = image;
	q->efd = efd;
	q->n = n;
	q->maxiov = maxiov;
	q->done = calloc(n, sizeof *q->done);
	q->slots = calloc(n, sizeof *q->slots);
	q->iovs = calloc((size_t)n * maxiov, sizeof *q->iovs);
	if (q->done == NULL || q->slots == NULL || q->iovs == NULL) {
		free(q->done); free(q->slots); free(q->iovs); free(q);
		return NULL;
	}
	pthread_mutex_init(&q->mu, NULL);
	for (uint32_t i = 0; i < n; i++) {
		q->slots[i].q = q;
		q->slots[i].idx = i;
		q->slots[i].iov = q->iovs + (size_t)i * maxiov;
	}
	return q;
}

static void vublk_aio_free(vublk_aio *q) {
	pthread_mutex_destroy(&q->mu);
	free(q->done); free(q->slots); free(q->iovs); free(q);
}

static struct iovec *vublk_slot_iov(vublk_aio *q, uint32_t idx) { return q->slots[idx].iov; }

// vublk_start issues slot idx's request (its iovecs are filled in); 0 or -errno.
static int vublk_start(vublk_aio *q, uint32_t idx, int write, int iovcnt, uint64_t off) {
	rbd_completion_t c;
	int r = rbd_aio_create_completion(&q->slots[idx], vublk_complete, &c);
	if (r < 0) return r;
	struct iovec *iov = q->slots[idx].iov;
	r = write ? rbd_aio_writev(q->image, iov, iovcnt, off, c) : rbd_aio_readv(q->image, iov, iovcnt, off, c);
	if (r < 0) rbd_aio_release(c);
	return r;
}

// vublk_reap moves up to max completions out of the ring: slot indices and results.
static int vublk_reap(vublk_aio *q, uint32_t *idx, int64_t *ret, int max) {
	pthread_mutex_lock(&q->mu);
	int k = 0;
	while (q->count > 0 && k < max) {
		uint32_t i = q->done[q->head];
		q->head = (q->head + 1) % q->n;
		q->count--;
		idx[k] = i;
		ret[k] = q->slots[i].ret;
		k++;
	}
	pthread_mutex_unlock(&q->mu);
	return k;
}

// vublk_rw_wait is a blocking read or write: an aio request waited for on this thread.
static int64_t vublk_rw_wait(rbd_image_t image, int write, const struct iovec *iov, int iovcnt, uint64_t off) {
	rbd_completion_t c;
	int r = rbd_aio_create_completion(NULL, NULL, &c);
	if (r < 0) return r;
	r = write ? rbd_aio_writev(image, iov, iovcnt, off, c) : rbd_aio_readv(image, iov, iovcnt, off, c);
	if (r < 0) {
		rbd_aio_release(c);
		return r;
	}
	rbd_aio_wait_for_complete(c);
	int64_t ret = rbd_aio_get_return_value(c);
	rbd_aio_release(c);
	return ret;
}

// vublk_connect makes the cluster handle: conf file, keyring, timeouts, connect. On failure
// *cluster is shut down and NULL.
// *stage says which step failed: 0 the handle, 1 reading the conf file, 2 an option, 3 connecting.
// extra holds nextra strings, key, value, key, value...: more options, set after vublk's own.
static int vublk_connect(rados_t *cluster, const char *user, const char *conf, const char *keyring, const char *timeout, int nocache, char **extra, int nextra, int *stage) {
	*stage = 0;
	int r = rados_create(cluster, user[0] ? user : NULL);
	if (r < 0) {
		*cluster = NULL;
		return r;
	}
	*stage = 1;
	r = rados_conf_read_file(*cluster, conf[0] ? conf : NULL);
	if (r == 0) *stage = 2;
	if (r == 0 && keyring[0]) r = rados_conf_set(*cluster, "keyring", keyring);
	if (r == 0 && timeout[0]) r = rados_conf_set(*cluster, "rados_osd_op_timeout", timeout);
	if (r == 0 && timeout[0]) r = rados_conf_set(*cluster, "rados_mon_op_timeout", timeout);
	if (r == 0 && timeout[0]) r = rados_conf_set(*cluster, "client_mount_timeout", timeout);
	if (r == 0 && nocache) r = rados_conf_set(*cluster, "rbd_cache", "false");
	// librbd then dispatches an aio request on the calling thread instead of handing it to one
	// of its own first (store_rbd.go, startAIO).
	if (r == 0) r = rados_conf_set(*cluster, "rbd_non_blocking_aio", "false");
	for (int i = 0; r == 0 && i + 1 < nextra; i += 2) r = rados_conf_set(*cluster, extra[i], extra[i + 1]);
	if (r == 0) *stage = 3;
	if (r == 0) r = rados_connect(*cluster);
	if (r < 0) {
		rados_shutdown(*cluster);
		*cluster = NULL;
	}
	return r;
}
*/
import "C"

import (
	"runtime"
	"syscall"
	"unsafe"
)

// librbdVersion is the librbd the binary runs with, "major.minor.extra".
func librbdVersion() (major, minor, extra int) {
	var a, b, c C.int
	C.rbd_version(&a, &b, &c)
	return int(a), int(b), int(c)
}

// errno turns a negative librados/librbd return value into an error.
func errno(r C.int) error {
	if r >= 0 {
		return nil
	}
	return syscall.Errno(-r)
}

// conn is a cluster connection and an I/O context on one pool (and namespace).
type conn struct {
	cluster C.rados_t
	ioctx   C.rados_ioctx_t
}

// connect makes the cluster handle and the I/O context; extra are more options, key, value,
// key, value...
func connect(user, conf, keyring, timeout string, cache bool, extra []string, pool, namespace string) (*conn, error) {
	cu, cc, ck, ct := C.CString(user), C.CString(conf), C.CString(keyring), C.CString(timeout)
	// C memory: a Go slice passed to C may not hold Go pointers.
	cx := unsafe.Slice((**C.char)(C.calloc(C.size_t(len(extra)+1), C.size_t(unsafe.Sizeof((*C.char)(nil))))), len(extra))
	for i, kv := range extra {
		cx[i] = C.CString(kv)
	}
	defer func() {
		C.free(unsafe.Pointer(cu))
		C.free(unsafe.Pointer(cc))
		C.free(unsafe.Pointer(ck))
		C.free(unsafe.Pointer(ct))
		for _, p := range cx {
			C.free(unsafe.Pointer(p))
		}
		C.free(unsafe.Pointer(unsafe.SliceData(cx)))
	}()
	c := &conn{}
	var stage C.int
	nocache := C.int(1)
	if cache {
		nocache = 0
	}
	if r := C.vublk_connect(&c.cluster, cu, cc, ck, ct, nocache, unsafe.SliceData(cx), C.int(len(cx)), &stage); r < 0 {
		what := [...]string{"create the cluster handle", "read the ceph.conf " + conf, "set the cluster options", "connect to the cluster"}[stage]
		if stage == 1 && conf == "" {
			what = "find a ceph.conf (give --ceph-conf or ceph_conf)"
		}
		return nil, opError(what, errno(r))
	}
	cp := C.CString(pool)
	defer C.free(unsafe.Pointer(cp))
	if r := C.rados_ioctx_create(c.cluster, cp, &c.ioctx); r < 0 {
		C.rados_shutdown(c.cluster)
		return nil, opError("open pool "+pool, errno(r))
	}
	if namespace != "" {
		cn := C.CString(namespace)
		C.rados_ioctx_set_namespace(c.ioctx, cn)
		C.free(unsafe.Pointer(cn))
	}
	return c, nil
}

// confGet is an option's value on the cluster handle (what librbd reads when it opens an image).
func (c *conn) confGet(key string) (string, error) {
	ck := C.CString(key)
	defer C.free(unsafe.Pointer(ck))
	var buf [256]C.char
	if r := C.rados_conf_get(c.cluster, ck, &buf[0], C.size_t(len(buf))); r < 0 {
		return "", errno(r)
	}
	return C.GoString(&buf[0]), nil
}

func (c *conn) close() {
	C.rados_ioctx_destroy(c.ioctx)
	C.rados_shutdown(c.cluster)
}

// create makes a format 2 image with only the layering feature: no exclusive lock, so that a
// vublk restarted after SIGKILL opens it at once instead of waiting for the dead owner's watch
// to time out.
func (c *conn) create(name string, size int64) error {
	cn := C.CString(name)
	defer C.free(unsafe.Pointer(cn))
	var order C.int
	return errno(C.rbd_create2(c.ioctx, cn, C.uint64_t(size), C.RBD_FEATURE_LAYERING, &order))
}

// image is an open RBD image.
type image struct{ img C.rbd_image_t }

func (c *conn) open(name, snap string, readOnly bool) (*image, error) {
	cn := C.CString(name)
	defer C.free(unsafe.Pointer(cn))
	var cs *C.char
	if snap != "" {
		cs = C.CString(snap)
		defer C.free(unsafe.Pointer(cs))
	}
	im := &image{}
	var r C.int
	if readOnly || snap != "" {
		r = C.rbd_open_read_only(c.ioctx, cn, &im.img, cs)
	} else {
		r = C.rbd_open(c.ioctx, cn, &im.img, cs)
	}
	if r < 0 {
		return nil, errno(r)
	}
	return im, nil
}

func (im *image) close() error { return errno(C.rbd_close(im.img)) }

func (im *image) size() (int64, error) {
	var n C.uint64_t
	if r := C.rbd_get_size(im.img, &n); r < 0 {
		return 0, errno(r)
	}
	return int64(n), nil
}

func (im *image) resize(size int64) error { return errno(C.rbd_resize(im.img, C.uint64_t(size))) }

func (im *image) flush() error { return errno(C.rbd_flush(im.img)) }

func (im *image) discard(off, n int64) error {
	return errno(C.rbd_discard(im.img, C.uint64_t(off), C.uint64_t(n)))
}

func (im *image) writeZeroes(off, n int64, thick bool) error {
	var flags C.int
	if thick {
		flags = C.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
	}
	r := C.rbd_write_zeroes(im.img, C.uint64_t(off), C.size_t(n), flags, 0)
	if r < 0 {
		return syscall.Errno(-r)
	}
	return nil
}

// rwWait is a blocking vectored read or write of bufs at off; it returns the bytes moved.
func (im *image) rwWait(write bool, bufs [][]byte, off int64) (int64, error) {
	var pin runtime.Pinner
	defer pin.Unpin()
	iov := make([]C.struct_iovec, 0, len(bufs))
	for _, b := range bufs {
		if len(b) == 0 {
			continue
		}
		pin.Pin(&b[0])
		iov = append(iov, C.struct_iovec{iov_base: unsafe.Pointer(&b[0]), iov_len: C.size_t(len(b))})
	}
	if len(iov) == 0 {
		return 0, nil
	}
	w := C.int(0)
	if write {
		w = 1
	}
	r := C.vublk_rw_wait(im.img, w, &iov[0], C.int(len(iov)), C.uint64_t(off))
	if r < 0 {
		return 0, syscall.Errno(-r)
	}
	return int64(r), nil
}

// aioQueue is the C side of one image's aio slots.
type aioQueue struct {
	q      *C.vublk_aio
	maxIOV int
}

func newAIOQueue(im *image, efd int, slots, maxIOV int) *aioQueue {
	q := C.vublk_aio_new(im.img, C.int(efd), C.uint32_t(slots), C.int(maxIOV))
	if q == nil {
		return nil
	}
	return &aioQueue{q: q, maxIOV: maxIOV}
}

func (a *aioQueue) free() { C.vublk_aio_free(a.q) }

// start issues a read or write of bufs (at most maxIOV non-empty ones, pinned by the caller
// until the request completes) from slot idx.
func (a *aioQueue) start(idx uint32, write bool, bufs [][]byte, off int64) error {
	iov := unsafe.Slice(C.vublk_slot_iov(a.q, C.uint32_t(idx)), a.maxIOV)
	n := 0
	for _, b := range bufs {
		if len(b) == 0 {
			continue
		}
		iov[n] = C.struct_iovec{iov_base: unsafe.Pointer(&b[0]), iov_len: C.size_t(len(b))}
		n++
	}
	w := C.int(0)
	if write {
		w = 1
	}
	return errno(C.vublk_start(a.q, C.uint32_t(idx), w, C.int(n), C.uint64_t(off)))
}

// reap moves completed requests into idx and ret (of equal length); it returns how many.
func (a *aioQueue) reap(idx []uint32, ret []int64) int {
	return int(C.vublk_reap(a.q, (*C.uint32_t)(unsafe.Pointer(&idx[0])), (*C.int64_t)(unsafe.Pointer(&ret[0])), C.int(len(idx))))
}
