package backend

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"os"
	"sync"
)

// The write log records every completed write, discard and write-zeroes of
// an export, and a mark for every sync that made them durable, in the order
// they completed (like Linux dm-log-writes and QEMU's blklogwrites). Replaying
// it rebuilds the disk as of any mark, or as any state a crash between two
// marks could have left.
//
// Format, all integers little-endian:
//
//	file header (32 bytes): magic "VUBLKLOG", version u32 (1), reserved u32,
//	                        disk size u64, reserved u64
//	record header (40 bytes): type u8, reserved [7]u8, sequence u64,
//	                          offset u64, length u64, mark u64
//	record data: length bytes, for writes only
//	record trailer: CRC-32C u32 of the record header and data
//
// Types: 1 write, 2 discard, 3 write-zeroes, 4 flush mark. Sequence numbers
// start at 1 and grow by one per record. A flush mark's mark field numbers
// the marks from 1; other records carry the number of the last mark before
// them. Discards and write-zeroes read back as zeros.

const (
	logMagic      = "VUBLKLOG"
	logVersion    = 1
	logHeaderSize = 32
	recHeaderSize = 40
	recTrailer    = 4
	// maxLogRecord bounds one write record, so that a corrupt length is
	// reported instead of allocated.
	maxLogRecord = 1 << 30
)

// LogRecordType is the kind of a write-log record.
type LogRecordType uint8

// Record types.
const (
	LogWrite       LogRecordType = 1
	LogDiscard     LogRecordType = 2
	LogWriteZeroes LogRecordType = 3
	LogFlush       LogRecordType = 4
)

func (t LogRecordType) String() string {
	switch t {
	case LogWrite:
		return "write"
	case LogDiscard:
		return "discard"
	case LogWriteZeroes:
		return "write-zeroes"
	case LogFlush:
		return "flush"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// ErrBadLog is returned when a write log is corrupt or truncated; the error
// names the byte offset.
var ErrBadLog = errors.New("bad write log")

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// LoggingStore wraps a Store and appends every completed modification and
// every successful sync to a write log. It does not change what the guest
// sees: each operation goes to the inner store first and is logged only if
// it succeeded.
type LoggingStore struct {
	Store
	mu   sync.Mutex
	f    *os.File
	w    *bufio.Writer
	seq  uint64
	mark uint64
	err  error // first log write error; the log is then abandoned
}

// NewLoggingStore creates (truncates) the log at path and wraps inner.
func NewLoggingStore(inner Store, path string) (*LoggingStore, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, fmt.Errorf("write log: %w", err)
	}
	s := &LoggingStore{Store: inner, f: f, w: bufio.NewWriterSize(f, 1<<20)}
	var h [logHeaderSize]byte
	copy(h[:], logMagic)
	binary.LittleEndian.PutUint32(h[8:], logVersion)
	binary.LittleEndian.PutUint64(h[16:], uint64(inner.Size()))
	if _, err := s.w.Write(h[:]); err != nil {
		f.Close()
		return nil, fmt.Errorf("write log: %w", err)
	}
	return s, nil
}

func (s *LoggingStore) append(t LogRecordType, off, n int64, bufs [][]byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return
	}
	s.seq++
	if t == LogFlush {
		s.mark++
	}
	var h [recHeaderSize]byte
	h[0] = byte(t)
	binary.LittleEndian.PutUint64(h[8:], s.seq)
	binary.LittleEndian.PutUint64(h[16:], uint64(off))
	binary.LittleEndian.PutUint64(h[24:], uint64(n))
	binary.LittleEndian.PutUint64(h[32:], s.mark)
	crc := crc32.Update(0, crcTable, h[:])
	s.write(h[:])
	for _, b := range bufs {
		crc = crc32.Update(crc, crcTable, b)
		s.write(b)
	}
	var tr [recTrailer]byte
	binary.LittleEndian.PutUint32(tr[:], crc)
	s.write(tr[:])
}

func (s *LoggingStore) write(b []byte) {
	if s.err == nil {
		_, s.err = s.w.Write(b)
	}
}

// WriteAt implements Store.
func (s *LoggingStore) WriteAt(bufs [][]byte, off int64) error {
	if err := s.Store.WriteAt(bufs, off); err != nil {
		return err
	}
	s.append(LogWrite, off, totalLen(bufs), bufs)
	return nil
}

// WriteAtDurable implements DurableWriter: a durable write is logged as a
// write followed by a mark.
func (s *LoggingStore) WriteAtDurable(bufs [][]byte, off int64) error {
	if dw, ok := s.Store.(DurableWriter); ok {
		if err := dw.WriteAtDurable(bufs, off); err != nil {
			return err
		}
		s.append(LogWrite, off, totalLen(bufs), bufs)
		s.append(LogFlush, 0, 0, nil)
		return nil
	}
	if err := s.WriteAt(bufs, off); err != nil {
		return err
	}
	return s.Sync()
}

// Discard implements Discarder.
func (s *LoggingStore) Discard(off, n int64) error {
	if d, ok := s.Store.(Discarder); ok {
		if err := d.Discard(off, n); err != nil {
			return err
		}
		s.append(LogDiscard, off, n, nil)
	}
	return nil
}

// WriteZeroes implements ZeroWriter.
func (s *LoggingStore) WriteZeroes(off, n int64, unmap bool) error {
	var err error
	if z, ok := s.Store.(ZeroWriter); ok {
		err = z.WriteZeroes(off, n, unmap)
	} else {
		err = writeZeroes(s.Store, off, n)
	}
	if err != nil {
		return err
	}
	s.append(LogWriteZeroes, off, n, nil)
	return nil
}

// Sync implements Store: a successful sync appends a flush mark and pushes
// the log to the kernel.
func (s *LoggingStore) Sync() error {
	if err := s.Store.Sync(); err != nil {
		return err
	}
	s.append(LogFlush, 0, 0, nil)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		s.err = s.w.Flush()
	}
	return nil
}

// LogErr returns the first error writing the log, if any.
func (s *LoggingStore) LogErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Close flushes and closes the log, then closes the inner store.
func (s *LoggingStore) Close() error {
	s.mu.Lock()
	if s.err == nil {
		s.err = s.w.Flush()
	}
	lerr := s.err
	cerr := s.f.Close()
	s.mu.Unlock()
	return errors.Join(s.Store.Close(), lerr, cerr)
}

// LogRecord is one decoded record.
type LogRecord struct {
	Type   LogRecordType
	Seq    uint64
	Offset int64
	Length int64
	Mark   uint64
	Data   []byte // writes only
	End    int64  // the log file offset just past this record
}

// WriteLog is a decoded write log.
type WriteLog struct {
	DiskSize int64
	Records  []LogRecord
	Marks    int // number of flush marks
}

// ReadWriteLog reads and checks a whole log. Any corruption or truncation is
// an ErrBadLog naming the offset; nothing is silently skipped.
func ReadWriteLog(r io.Reader) (*WriteLog, error) {
	br := bufio.NewReaderSize(r, 1<<20)
	var pos int64
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w at offset %d: %s", ErrBadLog, pos, fmt.Sprintf(format, a...))
	}
	var h [logHeaderSize]byte
	if _, err := io.ReadFull(br, h[:]); err != nil {
		return nil, bad("file header: %v", err)
	}
	if string(h[:8]) != logMagic {
		return nil, bad("not a vublk write log (magic %q)", h[:8])
	}
	if v := binary.LittleEndian.Uint32(h[8:]); v != logVersion {
		return nil, bad("version %d, this vublk reads version %d", v, logVersion)
	}
	l := &WriteLog{DiskSize: int64(binary.LittleEndian.Uint64(h[16:]))}
	if l.DiskSize < 0 {
		return nil, bad("disk size %d", l.DiskSize)
	}
	pos = logHeaderSize
	for {
		var rh [recHeaderSize]byte
		n, err := io.ReadFull(br, rh[:])
		if err == io.EOF {
			return l, nil
		}
		if err != nil {
			return nil, bad("truncated record header (%d of %d bytes)", n, recHeaderSize)
		}
		rec := LogRecord{
			Type:   LogRecordType(rh[0]),
			Seq:    binary.LittleEndian.Uint64(rh[8:]),
			Offset: int64(binary.LittleEndian.Uint64(rh[16:])),
			Length: int64(binary.LittleEndian.Uint64(rh[24:])),
			Mark:   binary.LittleEndian.Uint64(rh[32:]),
		}
		switch {
		case rec.Type < LogWrite || rec.Type > LogFlush:
			return nil, bad("unknown record type %d", rh[0])
		case rec.Seq != uint64(len(l.Records))+1:
			return nil, bad("sequence %d, want %d", rec.Seq, len(l.Records)+1)
		case rec.Type != LogFlush && (rec.Offset < 0 || rec.Length < 0 || rec.Offset > l.DiskSize || rec.Length > l.DiskSize-rec.Offset):
			return nil, bad("%v of %d bytes at %d outside the %d-byte disk", rec.Type, rec.Length, rec.Offset, l.DiskSize)
		case rec.Type == LogWrite && rec.Length > maxLogRecord:
			return nil, bad("write record of %d bytes", rec.Length)
		}
		wantMark := uint64(l.Marks)
		if rec.Type == LogFlush {
			wantMark++
		}
		if rec.Mark != wantMark {
			return nil, bad("record %d carries mark %d, want %d", rec.Seq, rec.Mark, wantMark)
		}
		crc := crc32.Update(0, crcTable, rh[:])
		if rec.Type == LogWrite {
			rec.Data = make([]byte, rec.Length)
			if n, err := io.ReadFull(br, rec.Data); err != nil {
				return nil, bad("record %d: truncated data (%d of %d bytes)", rec.Seq, n, rec.Length)
			}
			crc = crc32.Update(crc, crcTable, rec.Data)
		}
		var tr [recTrailer]byte
		if _, err := io.ReadFull(br, tr[:]); err != nil {
			return nil, bad("record %d: truncated checksum", rec.Seq)
		}
		if got := binary.LittleEndian.Uint32(tr[:]); got != crc {
			return nil, bad("record %d: checksum %#x, want %#x", rec.Seq, got, crc)
		}
		if rec.Type == LogFlush {
			l.Marks++
		}
		pos += recHeaderSize + recTrailer + int64(len(rec.Data))
		rec.End = pos
		l.Records = append(l.Records, rec)
	}
}

// apply applies one record (or, for a torn crash, the sectors keep selects)
// to img.
func (r *LogRecord) apply(img []byte, keep func() bool) {
	if r.Type == LogFlush {
		return
	}
	for start := r.Offset; start < r.Offset+r.Length; {
		end := r.Offset + r.Length
		if keep != nil {
			end = min((start/CrashSector+1)*CrashSector, end)
		}
		if keep == nil || keep() {
			if r.Type == LogWrite {
				copy(img[start:end], r.Data[start-r.Offset:end-r.Offset])
			} else {
				clear(img[start:end])
			}
		}
		start = end
	}
}

// ReplayToMark applies to img (the disk before logging started) every record
// up to and including flush mark `mark` (0: none; -1: every record).
func (l *WriteLog) ReplayToMark(img []byte, mark int) error {
	if mark > l.Marks {
		return fmt.Errorf("mark %d does not exist: the log has %d marks", mark, l.Marks)
	}
	end := len(l.Records)
	if mark >= 0 {
		end = l.markIndex(mark) + 1
	}
	for i := range end {
		l.Records[i].apply(img, nil)
	}
	return nil
}

// markIndex returns the index of flush mark m's record (-1 for mark 0).
func (l *WriteLog) markIndex(m int) int {
	if m == 0 {
		return -1
	}
	for i := range l.Records {
		if l.Records[i].Type == LogFlush && l.Records[i].Mark == uint64(m) {
			return i
		}
	}
	return len(l.Records)
}

// ReplayCrash applies every record up to mark `mark`, then a random legal
// crash state of what followed it until the next mark (or the end): each
// later record is kept whole, dropped, or torn at sector granularity.
func (l *WriteLog) ReplayCrash(img []byte, mark int, rng *rand.Rand) error {
	if mark < 0 || mark > l.Marks {
		return fmt.Errorf("mark %d does not exist: the log has %d marks", mark, l.Marks)
	}
	start := l.markIndex(mark) + 1
	for i := 0; i < start; i++ {
		l.Records[i].apply(img, nil)
	}
	for i := start; i < len(l.Records); i++ {
		r := &l.Records[i]
		if r.Type == LogFlush {
			break
		}
		switch rng.IntN(3) {
		case 0:
		case 1:
			r.apply(img, nil)
		case 2:
			r.apply(img, func() bool { return rng.IntN(2) == 0 })
		}
	}
	return nil
}
