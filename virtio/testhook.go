//go:build !vublk_testhooks

package virtio

// skipDataLog is always false in a normal build; see testhook_on.go.
const skipDataLog = false
