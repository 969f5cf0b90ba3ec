//go:build !rbd || !cgo

package rbd

import "github.com/vublk/vublk/backend"

// Built reports whether this vublk can open RBD images.
const Built = false

// Open fails with ErrNotBuilt: this vublk was built without librbd.
func Open(spec Spec, opt Options) (*Store, error) {
	return nil, ErrNotBuilt
}

// Store is an RBD image; without librbd there never is one.
type Store struct{ backend.Store }

// Resize is not available without librbd.
func (s *Store) Resize(size int64) error { return ErrNotBuilt }

// ReadOnly is not available without librbd.
func (s *Store) ReadOnly() bool { return true }

// LibraryVersion is "" without librbd.
func LibraryVersion() string { return "" }
