package vduse

import (
	"encoding/binary"
	"errors"
	"testing"
)

func rawRequest(typ, id uint32, union []byte) []byte {
	b := make([]byte, requestSize)
	binary.LittleEndian.PutUint32(b[0:], typ)
	binary.LittleEndian.PutUint32(b[4:], id)
	copy(b[24:], union)
	return b
}

func TestParseRequest(t *testing.T) {
	u64s := func(a, b uint64) []byte {
		x := make([]byte, 16)
		binary.LittleEndian.PutUint64(x, a)
		binary.LittleEndian.PutUint64(x[8:], b)
		return x
	}
	for _, tc := range []struct {
		name string
		b    []byte
		want request
		err  bool
	}{
		{"vq state", rawRequest(reqGetVQState, 7, []byte{3, 0, 0, 0}), request{typ: reqGetVQState, id: 7, index: 3}, false},
		{"status", rawRequest(reqSetStatus, 8, []byte{0x0f}), request{typ: reqSetStatus, id: 8, status: 0x0f}, false},
		{"iotlb", rawRequest(reqUpdateIOTLB, 9, u64s(0x1000, 0x1fff)), request{typ: reqUpdateIOTLB, id: 9, start: 0x1000, last: 0x1fff}, false},
		{"iotlb all", rawRequest(reqUpdateIOTLB, 9, u64s(0, ^uint64(0))), request{typ: reqUpdateIOTLB, id: 9, last: ^uint64(0)}, false},
		{"iotlb reversed", rawRequest(reqUpdateIOTLB, 9, u64s(2, 1)), request{}, true},
		{"unknown type", rawRequest(3, 1, nil), request{}, true},
		{"short", make([]byte, requestSize-1), request{}, true},
		{"long", make([]byte, requestSize+1), request{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r request
			err := parseRequest(tc.b, &r)
			if tc.err {
				if !errors.Is(err, ErrBadRequest) {
					t.Fatalf("err %v, want ErrBadRequest", err)
				}
				return
			}
			if err != nil || r != tc.want {
				t.Fatalf("got %+v, %v; want %+v", r, err, tc.want)
			}
		})
	}
}

func TestResponseLayout(t *testing.T) {
	b := response(0x01020304, resultFailed, 2, 0xabcd)
	if len(b) != responseSize || binary.LittleEndian.Uint32(b) != 0x01020304 || binary.LittleEndian.Uint32(b[4:]) != resultFailed ||
		binary.LittleEndian.Uint32(b[24:]) != 2 || binary.LittleEndian.Uint16(b[28:]) != 0xabcd {
		t.Fatalf("response % x", b[:32])
	}
	for _, x := range b[8:24] {
		if x != 0 {
			t.Fatal("reserved bytes are not zero (the kernel refuses the response)")
		}
	}
}

func TestDevConfig(t *testing.T) {
	c := devConfig{name: "vd0", deviceID: virtioIDBlock, features: 1<<32 | 1<<33, vqNum: 2, vqAlign: 4096, config: []byte{1, 2, 3}}
	b, err := c.marshal()
	if err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	if string(b[:4]) != "vd0\x00" || le.Uint32(b[260:]) != 2 || le.Uint64(b[264:]) != 1<<32|1<<33 ||
		le.Uint32(b[272:]) != 2 || le.Uint32(b[276:]) != 4096 || le.Uint32(b[332:]) != 3 || string(b[336:]) != "\x01\x02\x03" {
		t.Fatalf("layout wrong")
	}
	for _, name := range []string{"", string(make([]byte, nameMax))} {
		c.name = name
		if _, err := c.marshal(); !errors.Is(err, ErrBadName) {
			t.Errorf("name of %d bytes: err %v", len(name), err)
		}
	}
	if f := deviceFeatures(1<<blkFConfigWCE | 1<<9); f != 1<<9|1<<fAccessPlatform {
		t.Errorf("deviceFeatures %#x", f)
	}
}

func FuzzParseRequest(f *testing.F) {
	f.Add(rawRequest(reqGetVQState, 1, []byte{1}))
	f.Add(rawRequest(reqSetStatus, 2, []byte{0x0f}))
	f.Add(rawRequest(reqUpdateIOTLB, 3, make([]byte, 16)))
	f.Fuzz(func(t *testing.T, b []byte) {
		var r request
		if err := parseRequest(b, &r); err == nil {
			if len(b) != requestSize || r.typ > reqUpdateIOTLB || (r.typ == reqUpdateIOTLB && r.last < r.start) {
				t.Fatalf("accepted %+v from %d bytes", r, len(b))
			}
		}
	})
}
