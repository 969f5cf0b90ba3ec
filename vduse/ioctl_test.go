package vduse

import (
	"fmt"
	"testing"
)

// TestIoctlNumbers compares the request numbers and structure sizes with what a C program
// built against the kernel's include/uapi/linux/vduse.h prints (Debian 12's linux-libc-dev).
func TestIoctlNumbers(t *testing.T) {
	got := fmt.Sprintf("%x %x %x %x %x %x %x %x %x %x %x %x", ioctlGetAPIVersion, ioctlSetAPIVersion,
		ioctlCreateDev, ioctlDestroyDev, ioctlIOTLBGetFD, ioctlGetFeatures, ioctlSetConfig,
		ioctlInjectConfigIRQ, ioctlVQSetup, ioctlVQGetInfo, ioctlVQSetupKickFD, ioctlVQInjectIRQ)
	want := "80088100 40088101 41508102 41008103 c0208110 80088111 40088112 8113 40208114 c0308115 40088116 40048117"
	if got != want {
		t.Errorf("ioctl numbers\n got %s\nwant %s", got, want)
	}
	sizes := fmt.Sprint(devConfigSize, iotlbEntrySize, vqConfigSize, vqInfoSize, requestSize, responseSize)
	if want := "336 32 32 48 152 152"; sizes != want {
		t.Errorf("sizes %s, want %s", sizes, want)
	}
}
