package main

import (
	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/sirupsen/logrus"
)

// notifySystemd tells systemd (a Type=notify unit) the daemon's state: daemon.SdNotifyReady once
// every socket listens, SdNotifyReloading and SdNotifyStopping. Without NOTIFY_SOCKET it does
// nothing.
func notifySystemd(log *logrus.Logger, state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		log.WithError(err).Warn("systemd notification failed")
	}
}
