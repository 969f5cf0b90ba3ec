package vduse

import (
	"fmt"

	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/virtio"
)

// resume takes over a device whose vublk died. The kernel kept everything on its side: the
// vdpa device and its driver, the rings, the IOTLB, and the requests that vublk had read and
// not answered (they are read again). What the kernel cannot say — the status the driver
// last set, which chains were popped and not completed — comes from the inflight record: the
// queues restart where that vublk stopped, and the chains it had in flight run again, in the
// order they were popped. A chain may so reach the file twice, which is harmless for block
// writes and flushes; the driver sees each complete once.
func (d *Device) resume() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.status = d.state.status()
	if d.status&statusDriverOK == 0 {
		d.log.WithField("status", fmt.Sprintf("%#x", d.status)).Info("took the device over; the driver has not started it yet")
		return nil
	}
	b := make([]byte, 8)
	if _, err := ioctl(d.fd, ioctlGetFeatures, b); err != nil {
		return fmt.Errorf("VDUSE_DEV_GET_FEATURES: %w", err)
	}
	d.features = leUint64(b)
	d.blk.SetFeatures(d.features)
	resubmitted := 0
	for _, q := range d.queues {
		b := make([]byte, vqInfoSize)
		b[0], b[1] = byte(q.index), byte(q.index>>8)
		if _, err := ioctl(d.fd, ioctlVQGetInfo, b); err != nil {
			return fmt.Errorf("VDUSE_VQ_GET_INFO %d: %w", q.index, err)
		}
		var info vqInfo
		info.unmarshal(b)
		if !info.ready || info.num == 0 {
			continue
		}
		q.configured = true
		q.num = int(info.num)
		q.addrs = virtio.RingAddrs{Desc: info.descAddr, Avail: info.driverAddr, Used: info.deviceAddr}
		ring, err := virtio.NewSplitQueue(d.mem, q.num, q.addrs, false, 0)
		if err != nil {
			return fmt.Errorf("queue %d: %w", q.index, err)
		}
		log := d.state.queue(q.index, q.num)
		if log == nil {
			q.base = ring.UsedIdx()
			d.log.WithField("queue", q.index).Warn("no inflight record for this ring: requests in flight when vublk died are lost")
		} else {
			q.base, q.resubmit = log.recover(ring.UsedIdx(), q.num)
		}
		resubmitted += len(q.resubmit)
		d.log.WithFields(logrus.Fields{"queue": q.index, "used": ring.UsedIdx(), "base": q.base,
			"resubmitted": len(q.resubmit)}).Info("queue taken over")
		if err := q.start(); err != nil {
			return fmt.Errorf("queue %d: %w", q.index, err)
		}
	}
	d.log.WithField("resubmitted", resubmitted).Info("took the device over from a vublk that died")
	return nil
}
